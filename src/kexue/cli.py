"""The ``kexue`` command line (typer + rich).

Bad arguments exit with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

try:  # typer >= 0.22 vendors its own click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from kexue import __version__

app = typer.Typer(
    name="kexue",
    help="Measured, tested tools for probabilistic deep learning.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


# Command groups of the capabilities: ``kexue <name> ...`` -> "module:attribute" of a typer app.
# Each capability adds its own line.
COMMAND_GROUPS: dict[str, str] = {
    "diffusion": "kexue.diffusion.cli:app",
    "lst": "kexue.lst.cli:app",
    "hubness": "kexue.hubness.cli:app",
}


def _add_groups() -> None:
    import importlib

    for name, target in COMMAND_GROUPS.items():
        module, attribute = target.split(":")
        app.add_typer(getattr(importlib.import_module(module), attribute), name=name)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"kexue {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """kexue: measured, tested tools for probabilistic deep learning."""


@app.command()
def tour(
    sections: Annotated[
        list[str] | None,
        typer.Argument(help="Sections to run (default: all). Known: see `kexue tour --list`."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for report.html, results.json, PNGs.")
    ] = Path("tour-report"),
    seed: Annotated[int, typer.Option(help="Seed of every random choice in the tour.")] = 0,
    list_sections: Annotated[
        bool, typer.Option("--list", help="List the sections and exit.")
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")] = False,
) -> None:
    """Run the tour: each capability's claim, tested and measured, in one HTML report."""
    from kexue.tour.runner import SECTIONS, run_tour, unknown_sections

    if list_sections:
        for name in SECTIONS:
            typer.echo(name)
        return
    names = sections or list(SECTIONS)
    bad = unknown_sections(names)
    if bad:
        raise typer.BadParameter(
            f"unknown section {bad[0]!r}; choose from {', '.join(SECTIONS)}", param_hint="SECTION"
        )
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a folder", param_hint="--out")
    results = run_tour(names, out, seed=seed, progress=not no_progress)
    for section in results:
        typer.echo(f"{section.name:>10}: {section.verdict or 'done'}")
    typer.echo(f"report: {out / 'report.html'}")


_add_groups()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning usage errors into one line and exit status 2."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="kexue", standalone_mode=False)
    except NoArgsIsHelpError:
        sys.exit(0)  # the help text was shown
    except UsageError as err:
        hint = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
        message = " ".join(err.format_message().split())
        typer.echo(f"kexue: error: {message}{hint}", err=True)
        sys.exit(2)
    except ClickException as err:
        typer.echo(f"kexue: error: {' '.join(err.format_message().split())}", err=True)
        sys.exit(err.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("kexue: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
