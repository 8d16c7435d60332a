"""The ``kexue`` command line (typer + rich).

Bad arguments exit with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:  # the installed typer (>= 0.22) vendors its own click
    from typer._click import Command, Context
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
else:
    try:  # typer >= 0.22 vendors its own click
        from typer._click import Command, Context
        from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
    except ImportError:  # pragma: no cover - older typer on top of click
        from click import Command, Context
        from click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from typer.core import TyperCommand, TyperGroup

from kexue import __version__
from kexue.exceptions import MissingExtraError
from kexue.extras import install_hint


@dataclass(frozen=True)
class CommandGroup:
    """A capability's command group: ``"module:attribute"`` of its typer app, the extra it
    needs and its one-line summary (shown by ``kexue --help`` without importing it)."""

    target: str
    extra: str
    help: str
    requires: tuple[str, ...] = ()  # top-level modules of the extra, checked before import


# ``kexue <name> ...``; each capability adds its own line.
COMMAND_GROUPS: dict[str, CommandGroup] = {
    "diffusion": CommandGroup(
        "kexue.diffusion.cli:app",
        "diffusion",
        "Diffusion models: train, sample, export, optimal variance, NLL, variance heads.",
        ("safetensors", "accelerate", "diffusers", "scipy", "PIL", "mlxtend", "sklearn"),
    ),
    "lst": CommandGroup(
        "kexue.lst.cli:app",
        "lst",
        "Ladder Side-Tuning of frozen Hugging Face transformers.",
        ("transformers", "peft", "safetensors", "accelerate"),
    ),
    "hubness": CommandGroup(
        "kexue.hubness.cli:app",
        "hubness",
        "Hubness measures of a point set; hub-prior latents.",
        ("faiss", "scipy", "sklearn", "safetensors", "mlxtend"),
    ),
}


def _hide_flag_types(command: Command, ctx: Context) -> Command:
    """Show plain flags without a type (typer labels them ``<bool>``), in the whole tree."""
    for param in [*command.params, command.get_help_option(ctx)]:
        if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _hide_flag_types(sub, ctx)
    return command


def _installed(module: str) -> bool:
    """True when ``module`` can be imported (found without importing it)."""
    if module in sys.modules:
        return sys.modules[module] is not None  # None marks a blocked import
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _missing_extra_command(name: str, group: CommandGroup, message: str) -> Command:
    def fail() -> None:
        raise UsageError(message)

    return TyperCommand(
        name,
        callback=fail,
        help=f"{group.help} (not installed: pip install 'kexue[{group.extra}]')",
        add_help_option=False,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


class KexueGroup(TyperGroup):
    """The root group: capability groups are imported only when run, so ``kexue --help``
    is fast and lists every group on any install; a group whose extra is missing exits 2
    with one line naming the extra."""

    _listing = False

    def list_commands(self, ctx: Context) -> list[str]:
        return [*super().list_commands(ctx), *COMMAND_GROUPS]

    def format_help(self, ctx: Context, formatter) -> None:
        self._listing = True
        try:
            _hide_flag_types(self, ctx)
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        group = COMMAND_GROUPS.get(cmd_name)
        if group is None:
            command = super().get_command(ctx, cmd_name)
            return None if command is None else _hide_flag_types(command, ctx)
        if self._listing:  # the root's help only needs the summary
            return TyperGroup(name=cmd_name, help=group.help)
        missing = [m for m in group.requires if not _installed(m)]
        module, attribute = group.target.split(":")
        try:
            if missing:
                raise MissingExtraError(
                    f"kexue {cmd_name} needs {missing[0]}, which is not installed: "
                    f"{install_hint(group.extra)}"
                )
            app = getattr(importlib.import_module(module), attribute)
        except MissingExtraError as err:
            return _missing_extra_command(cmd_name, group, str(err))
        command = typer.main.get_group(app)
        command.name = cmd_name
        return _hide_flag_types(command, ctx)


app = typer.Typer(
    name="kexue",
    help="Measured, tested tools for probabilistic deep learning.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=KexueGroup,
)


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


@app.command("build-native")
def build_native(
    verbose: Annotated[bool, typer.Option(help="Show the compiler's output.")] = False,
) -> None:
    """Build kexue's native kernels now (about 30 s, once per machine; then cached)."""
    from rich.console import Console

    from kexue.exceptions import NativeKernelError
    from kexue.native import build_kernels

    try:
        with Console(stderr=True).status("building kexue's native kernels"):
            module = build_kernels(verbose=verbose)
    except NativeKernelError as err:
        typer.echo(f"kexue: error: {err}", err=True)
        raise typer.Exit(1) from err
    typer.echo(f"native kernels: {module.__file__}")


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
    except MissingExtraError as err:  # a command needed an extra that is not installed
        typer.echo(f"kexue: error: {err}", err=True)
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
