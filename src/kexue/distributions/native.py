"""A native CPU kernel for the probit head's loss, built on first use.

``docs/guides/distributions.md``, "A native kernel for the probit head". The cross-entropy of
the normal-noise (probit) map and its gradient are computed in one C++ pass per row
(``csrc/probit_cross_entropy.cpp``): the same formulas as the eager path in
:mod:`kexue.distributions.maximum`, without its hundred-odd small tensor operations per call.
The gradient is made in the forward and kept, ``(B, n)``, instead of ``(B, M, n)`` node terms.

The kernel is compiled with torch's C++ extension loader (a C++ compiler and ``ninja`` on the
machine, about 30 s once; the build is cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``). Where it cannot be built, the loss falls back to the eager path
after one logged line. ``KEXUE_NATIVE`` chooses: ``auto`` (default: use it where it builds),
``0`` (never), ``1`` (always: a failed build raises :class:`NativeKernelError`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

from kexue.exceptions import NativeKernelError

__all__ = ["ENV_VAR", "SOURCE", "build_probit_kernel", "native_kernels", "probit_kernel"]

ENV_VAR = "KEXUE_NATIVE"
_MODES = {"": "auto", "auto": "auto", "0": "off", "off": "off", "1": "on", "on": "on"}
SOURCE = Path(__file__).with_name("csrc") / "probit_cross_entropy.cpp"
# ATen's vector types pick their instruction set from these macros; torch reports what the CPU
# runs (DEFAULT: ATen's portable scalar loops).
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

log = logging.getLogger(__name__)


_lock = threading.Lock()
_kernel: ModuleType | None = None
_failed: str | None = None  # why the build failed, once it has
_override: bool | None = None  # set by native_kernels()


def _mode() -> str:
    raw = os.environ.get(ENV_VAR, "").strip().lower()
    if raw not in _MODES:
        raise ValueError(f"{ENV_VAR} must be one of auto, 0, 1 (or off, on), got {raw!r}")
    return _MODES[raw]


def _flags() -> list[str]:
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _CAPABILITY_FLAGS.get(capability)
    if flags is None:
        return ["-O3", "-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]
    return ["-O3", *flags, f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]


def build_probit_kernel(verbose: bool = False) -> ModuleType:
    """Compile (or load the cached build of) the probit kernel now; raises on failure.

    Call it ahead of training to take the one-off build time (about 30 s) out of the first
    step. The build's name carries a hash of the source, the flags and torch's version, so a
    changed source or torch never loads a stale build.
    """
    global _kernel, _failed
    with _lock:
        if _kernel is not None:
            return _kernel
        from torch.utils import cpp_extension

        flags = _flags()
        digest = hashlib.sha256(
            SOURCE.read_bytes() + " ".join([*flags, torch.__version__]).encode()
        ).hexdigest()[:16]
        name = f"kexue_probit_{digest}"
        if not _is_built(cpp_extension, name):
            log.warning(
                "kexue: building the native probit kernel %s (once per machine, about 30 s; "
                "%s=0 skips it)",
                name,
                ENV_VAR,
            )
        try:
            _kernel = cpp_extension.load(
                name=name, sources=[str(SOURCE)], extra_cflags=flags, verbose=verbose
            )
        except Exception as exc:  # a missing compiler, ninja or header: fall back, say why
            _failed = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise NativeKernelError(f"the native probit kernel did not build: {_failed}") from exc
        return _kernel


def _is_built(cpp_extension: ModuleType, name: str) -> bool:
    """Whether torch's extension cache already holds the build ``name`` (torch does not say
    so publicly: where its helper is missing, assume a build is due)."""
    try:
        folder = Path(cpp_extension._get_build_directory(name, verbose=False))
    except (AttributeError, TypeError, OSError):
        return False
    return any(folder.glob(f"{name}*.so")) or any(folder.glob(f"{name}*.pyd"))


def probit_kernel() -> ModuleType | None:
    """The compiled kernel, or ``None`` where it is switched off or cannot be built (one
    logged line says why, once). ``KEXUE_NATIVE=1`` turns a failed build into an error."""
    enabled = _override
    mode = _mode()
    if enabled is None:
        enabled = mode != "off"
    if not enabled:
        return None
    if _kernel is not None:
        return _kernel
    if _failed is not None and mode != "on":
        return None
    if _failed is not None:
        raise NativeKernelError(f"the native probit kernel did not build: {_failed}")
    try:
        return build_probit_kernel()
    except NativeKernelError as exc:
        if mode == "on":
            raise
        log.warning("kexue: %s; the probit loss uses the eager path", exc)
        return None


@contextmanager
def native_kernels(enabled: bool) -> Iterator[None]:
    """Within the block, use the native kernel (``True``: built if needed) or the eager path
    (``False``), whatever ``KEXUE_NATIVE`` says: for cross-checks and benchmarks."""
    global _override
    previous, _override = _override, enabled
    try:
        yield
    finally:
        _override = previous
