"""Wall-clock timing for the tour and the benchmarks (never used in tests)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.benchmark import Timer


def median_ms(fn: Callable[[], object], *, min_run_time: float = 0.5) -> float:
    """Median milliseconds per call of ``fn`` (torch's Timer: warm-up, adaptive repeats)."""
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
