"""Fixtures shared by the tests of kexue.distributions."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch

from kexue.distributions.native import ENV_VAR, build_probit_kernel, native_kernels
from kexue.exceptions import NativeKernelError


@pytest.fixture
def random_mu() -> Callable[..., torch.Tensor]:
    """``random_mu(shape, scale=1.0, seed=0)``: float64 scores ``N(0, scale^2)``."""

    def draw(shape: tuple[int, ...], scale: float = 1.0, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=gen, dtype=torch.float64) * scale

    return draw


@pytest.fixture(params=["native", "eager"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test with the probit loss's native kernel, then with its eager path. Where the
    kernel cannot be built the native run is skipped, unless ``KEXUE_NATIVE=1`` (CI) makes
    that an error."""
    if request.param == "native":
        try:
            build_probit_kernel()
        except NativeKernelError as exc:
            if os.environ.get(ENV_VAR) == "1":
                raise
            pytest.skip(f"the native kernel is unavailable here: {exc}")
    with native_kernels(request.param == "native"):
        yield request.param
