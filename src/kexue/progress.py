"""One look for every progress bar of kexue (rich); shown on the main process only."""

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

from kexue.distributed import is_main_process


def progress_bar(
    *extra: ProgressColumn, disable: bool = False, console: Console | None = None
) -> Progress:
    """A rich ``Progress`` on stderr: description, bar, M/N, elapsed, remaining, ``extra``.

    Under ``accelerate launch`` / ``torch.distributed`` only rank 0 draws it.
    """
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        *extra,
        console=console or Console(stderr=True),
        disable=disable or not is_main_process(),
        transient=False,
    )
