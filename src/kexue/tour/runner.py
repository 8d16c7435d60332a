"""Runs tour sections with a rich progress display and writes the report."""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from kexue import __version__
from kexue.experiments.machine import machine_info
from kexue.tour.report import Figure, Section, write_html, write_json

T = TypeVar("T")

# name -> module with ``TITLE`` and ``run(ctx) -> Section``; later capabilities add theirs.
SECTIONS: dict[str, str] = {
    "ops": "kexue.tour.sections.ops",
    "losses": "kexue.tour.sections.losses",
    "distributions": "kexue.tour.sections.distributions",
    "diffusion": "kexue.tour.sections.diffusion",
    "lst": "kexue.tour.sections.lst",
    "optimal-variance": "kexue.tour.sections.optimal_variance",
    "hubness": "kexue.tour.sections.hubness",
}


@dataclass
class SectionContext:
    """What a section gets: where to write, a seed, and a handle on the progress display."""

    name: str
    out_dir: Path
    seed: int
    progress: Progress
    task: TaskID

    def step(self, description: str, total: float | None = None) -> None:
        """Show what the section is doing now; ``total`` resets the bar for a new stage."""
        self.progress.update(self.task, description=f"[bold]{self.name}[/]: {description}")
        if total is not None:
            self.progress.reset(self.task, total=total)

    def advance(self, amount: float = 1.0) -> None:
        self.progress.advance(self.task, amount)

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        self.step(description, total=total)
        for item in items:
            yield item
            self.advance()

    def save_figure(self, fig: plt.Figure, stem: str, caption: str) -> Figure:
        """Save ``fig`` as ``OUT/<section>-<stem>.png`` and close it."""
        name = f"{self.name}-{stem}.png"
        fig.savefig(self.out_dir / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return Figure(path=name, caption=caption)


def unknown_sections(names: Sequence[str]) -> list[str]:
    return [n for n in names if n not in SECTIONS]


def run_tour(
    sections: Sequence[str] | None = None,
    out: str | Path = "tour-report",
    *,
    seed: int = 0,
    progress: bool = True,
    console: Console | None = None,
) -> list[Section]:
    """Run the named sections (default: all) and write ``out/report.html`` and
    ``out/results.json`` with every number shown, plus one PNG per figure."""
    names = list(sections) if sections else list(SECTIONS)
    bad = unknown_sections(names)
    if bad:
        raise ValueError(f"unknown tour section(s) {bad}; choose from {sorted(SECTIONS)}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    console = console or Console(stderr=True)
    results: list[Section] = []
    start = time.perf_counter()
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        overall = bar.add_task("[bold]tour[/]", total=len(names))
        for name in names:
            module = importlib.import_module(SECTIONS[name])
            task = bar.add_task(f"[bold]{name}[/]", total=None)
            ctx = SectionContext(name, out_dir, seed, bar, task)
            t0 = time.perf_counter()
            section = module.run(ctx)
            section.seconds = time.perf_counter() - t0
            bar.update(task, description=f"[bold]{name}[/]: done ({section.seconds:.0f} s)")
            bar.update(task, total=1, completed=1)
            results.append(section)
            bar.advance(overall)
    meta = {
        "kexue_version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "seed": seed,
        "seconds": time.perf_counter() - start,
    }
    write_json(results, meta, out_dir / "results.json")
    write_html(results, meta, out_dir / "report.html")
    return results
