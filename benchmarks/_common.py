"""What every benchmark script shares: plans, the CPU lock, timers, the machine, result files.

Each script under ``benchmarks/`` measures one capability against its peer in one process and
is split in two steps:

1. ``measure(plan) -> dict``: runs the experiments (under the CPU lock) and returns plain
   JSON-able results, written to ``<out>/<name>.json`` with the machine and the command;
2. ``render(results, out) -> str``: turns those results (and nothing else) into the Markdown
   page ``<out>/<name>.md`` (plots go beside it). ``--render-only`` re-renders from the JSON.

Plans: ``smoke`` (seconds: what the slow test runs, written to a temporary folder),
``default`` (the committed page) and script-specific larger ones. Experiment code that the
tour also runs lives in :mod:`kexue.experiments`, never here.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kexue.experiments.machine import machine_info
from kexue.experiments.tables import Table, markdown_table
from kexue.experiments.timing import median_ms

__all__ = [
    "DOCS",
    "ROOT",
    "SHARED_DATA",
    "Table",
    "heavy_lock",
    "machine_line",
    "main",
    "markdown_table",
    "median_ms",
    "wall_seconds",
]

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
SHARED_DATA = ROOT.parent / "shared" / "data"
# Heavy runs take this lock so that two benchmarks never share the 2 CPU cores by accident.
LOCK_PATH = Path(os.environ.get("KEXUE_BENCH_LOCK", "/tmp/kexue-heavy.lock"))


@contextlib.contextmanager
def heavy_lock(enabled: bool = True) -> Iterator[None]:
    """Hold the machine-wide benchmark lock (``flock`` on :data:`LOCK_PATH`) while inside."""
    if not enabled:
        yield
        return
    with open(LOCK_PATH, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def wall_seconds(
    fn: Callable[[], object],
    repeats: int = 3,
    *,
    warmup: bool = True,
    sync: Callable[[], None] | None = None,
) -> tuple[float, object]:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs, and the last result.

    For calls too long for :func:`median_ms`'s adaptive repeats; ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before each clock read.
    """
    if warmup:
        fn()
    times, result = [], None
    for _ in range(max(1, repeats)):
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        result = fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def machine_line(machine: dict[str, Any]) -> str:
    """The Markdown line that records where a page's numbers were measured."""
    load = machine.get("load_average")
    extra = f"; load average {load[0]:.2f} before, {load[1]:.2f} after" if load else ""
    return f"Machine: {machine['summary']}; {machine['os']}{extra}."


RUN_FIELDS = ("command", "date", "seconds", "machine", "plan")  # how main() says a run was made


def stored_run(store: Path, plan: str, keep_as: str, *extra: str) -> dict[str, Any]:
    """The stored results (``store``) that a partial plan measures again in part, with how
    they were made (:data:`RUN_FIELDS` plus ``extra``) kept under ``keep_as``: the first
    run's, however many partial runs follow."""
    if not store.exists():
        raise SystemExit(f"--plan {plan} builds on a stored run: {store} is missing")
    results = json.loads(store.read_text())
    fields = (*RUN_FIELDS, *extra)
    results[keep_as] = results.get(keep_as) or {k: results.get(k) for k in fields}
    return results


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that reproduces a run, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", str(script), *map(shlex.quote, args)])


def main(
    name: str,
    measure: Callable[[str, argparse.Namespace], dict[str, Any]],
    render: Callable[[dict[str, Any], Path], str],
    *,
    plans: Sequence[str] = ("smoke", "default"),
    description: str = "",
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
) -> Path:
    """Parse the common arguments, measure (under the lock), write ``name.json``, render
    ``name.md``; returns the page's path.

    Common arguments: ``--plan`` (one of ``plans``; default ``"default"``), ``--out`` (folder;
    default ``docs/benchmarks``, a temporary folder for ``smoke``), ``--render-only``
    (re-render from the JSON), ``--no-lock``.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--plan", choices=list(plans), default="default")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON and page")
    parser.add_argument("--render-only", action="store_true", help="re-render the page")
    parser.add_argument("--no-lock", action="store_true", help="do not take the CPU lock")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    out = args.out or (
        Path(tempfile.mkdtemp(prefix=f"kexue-bench-{name}-")) if args.plan == "smoke" else DOCS
    )
    out.mkdir(parents=True, exist_ok=True)
    args.out = out  # measure() may write figures beside the page
    store = out / f"{name}.json"
    if args.render_only:
        results = json.loads(store.read_text())
    else:
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        with heavy_lock(not args.no_lock and args.plan != "smoke"):
            results = measure(args.plan, args)
        machine = machine_info() | {"load_average": [load_before, os.getloadavg()[0]]}
        results = {
            **results,
            "plan": args.plan,
            "command": command_line(argv),
            "date": time.strftime("%Y-%m-%d"),
            "seconds": time.perf_counter() - t0,
            "machine": machine,
        }
        store.write_text(json.dumps(results, indent=2, default=float) + "\n")
    page = out / f"{name}.md"
    page.write_text(render(results, out).rstrip() + "\n")
    print(f"wrote {page}", file=sys.stderr)
    return page
