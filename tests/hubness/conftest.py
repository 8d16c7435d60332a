"""Fixtures shared by the hubness tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


@pytest.fixture
def points() -> Callable[..., torch.Tensor]:
    """``points(n, d, seed=0, dtype=torch.float64)``: ``n`` i.i.d. N(0, I) rows of ``R^d``."""

    def make(n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)

    return make


@pytest.fixture
def one_thread():
    """Run the test with one torch thread, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
