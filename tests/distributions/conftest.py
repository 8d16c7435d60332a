"""Fixtures shared by the tests of kexue.distributions."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


@pytest.fixture
def random_mu() -> Callable[..., torch.Tensor]:
    """``random_mu(shape, scale=1.0, seed=0)``: float64 scores ``N(0, scale^2)``."""

    def draw(shape: tuple[int, ...], scale: float = 1.0, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=gen, dtype=torch.float64) * scale

    return draw
