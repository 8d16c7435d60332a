"""One look for every progress bar of kexue (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(
    *extra: ProgressColumn, disable: bool = False, console: Console | None = None
) -> Progress:
    """A rich ``Progress`` on stderr: description, bar, M/N, elapsed, remaining, ``extra``."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        *extra,
        console=console or Console(stderr=True),
        disable=disable,
        transient=False,
    )
