"""Shared test configuration: one torch thread per test process, Hypothesis profiles.

The suite runs in two worker processes (pytest-xdist, ``-n 2`` in ``pyproject.toml``), each on
one thread: the models of the tests are tiny, and two threads per worker on a 2-core machine
spend their time spinning in OpenMP. Subprocesses the tests start inherit ``OMP_NUM_THREADS``.

The default Hypothesis profile is reproducible (``derandomize=True``) so CI runs are
deterministic; run ``pytest --hypothesis-profile=explore`` to search with fresh random seeds.
"""

import os
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
import torch
from hypothesis import settings

from kexue.exceptions import NativeKernelError
from kexue.native import ENV_VAR, build_kernels, native_kernels

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

settings.register_profile("default", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("explore", deadline=None, derandomize=False, print_blob=True)
settings.load_profile("default")


def _kernels_or_skip() -> ModuleType:
    """kexue's native kernels, built if needed; the test is skipped where they cannot be
    built, unless ``KEXUE_NATIVE=1`` (CI) makes that an error."""
    try:
        return build_kernels()
    except NativeKernelError as exc:  # pragma: no cover - machines without a compiler
        if os.environ.get(ENV_VAR) == "1":
            raise
        pytest.skip(f"the native kernels are unavailable here: {exc}")


@pytest.fixture
def kernel() -> ModuleType:
    """The compiled module of kexue's native kernels."""
    return _kernels_or_skip()


@pytest.fixture(params=["native", "eager"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test with kexue's native kernels, then with the eager paths."""
    if request.param == "native":
        _kernels_or_skip()
    with native_kernels(request.param == "native"):
        yield request.param


@pytest.fixture
def on_threads() -> Callable[..., list[Any]]:
    """``on_threads(fn, counts=(1, 2))``: ``fn()`` once per torch thread count, the count
    restored after."""

    def run(fn: Callable[[], Any], counts: tuple[int, ...] = (1, 2)) -> list[Any]:
        saved = torch.get_num_threads()
        try:
            results = []
            for count in counts:
                torch.set_num_threads(count)
                results.append(fn())
            return results
        finally:
            torch.set_num_threads(saved)

    return run
