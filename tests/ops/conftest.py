"""Fixtures shared by these tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


@pytest.fixture
def gen() -> Callable[[int], torch.Generator]:
    """``gen(seed)``: a fresh CPU ``torch.Generator`` seeded with ``seed``."""
    return lambda seed: torch.Generator().manual_seed(seed)
