"""Shared test configuration: one torch thread per test process, Hypothesis profiles.

The suite runs in two worker processes (pytest-xdist, ``-n 2`` in ``pyproject.toml``), each on
one thread: the models of the tests are tiny, and two threads per worker on a 2-core machine
spend their time spinning in OpenMP. Subprocesses the tests start inherit ``OMP_NUM_THREADS``.

The default Hypothesis profile is reproducible (``derandomize=True``) so CI runs are
deterministic; run ``pytest --hypothesis-profile=explore`` to search with fresh random seeds.
"""

import os
from collections.abc import Iterator

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


@pytest.fixture(params=["native", "eager"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test with kexue's native kernels, then with the eager paths. Where the kernels
    cannot be built the native run is skipped, unless ``KEXUE_NATIVE=1`` (CI) makes that an
    error."""
    if request.param == "native":
        try:
            build_kernels()
        except NativeKernelError as exc:
            if os.environ.get(ENV_VAR) == "1":
                raise
            pytest.skip(f"the native kernels are unavailable here: {exc}")
    with native_kernels(request.param == "native"):
        yield request.param
