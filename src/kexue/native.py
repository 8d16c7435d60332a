"""kexue's native CPU kernels, built on first use, with the eager path as fallback.

``docs/guides/distributions.md`` ("A native kernel for the probit head") and
``docs/guides/losses.md`` ("A native kernel"). Two losses have a C++ kernel (``csrc/``) that
computes the loss and its gradient in one call, where the eager code makes dozens of small
tensor operations: the probit head's cross-entropy (:mod:`kexue.distributions`) and the dense
ZLPR loss (:mod:`kexue.losses`). Each keeps its gradient from the forward, which the backward
scales by the incoming gradient.

The kernels are compiled together by torch's C++ extension loader. This needs a C++ compiler
and ``ninja``, and takes about 30 s once per machine (2 cores). The build is cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``. Where it cannot be built,
the losses take their eager paths after one logged line. ``KEXUE_NATIVE`` chooses:

- ``auto`` (default): use the kernels where they build;
- ``0``: never use them;
- ``1``: always use them (a failed build raises :class:`~kexue.exceptions.NativeKernelError`).
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

__all__ = ["ENV_VAR", "SOURCES", "build_kernels", "kernels", "native_kernels"]

ENV_VAR = "KEXUE_NATIVE"
_MODES = {"": "auto", "auto": "auto", "0": "off", "off": "off", "1": "on", "on": "on"}
_CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(_CSRC / f for f in ("module.cpp", "probit_cross_entropy.cpp", "zlpr.cpp"))
# ATen's vector types pick their instruction set from these macros; torch reports what the CPU
# runs (anything else: ATen's portable code).
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

log = logging.getLogger(__name__)

_lock = threading.Lock()
_module: ModuleType | None = None
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


def _build_name(prefix: str, flags: list[str]) -> str:
    """``prefix`` and a hash of the sources, the flags and torch's version."""
    digest = hashlib.sha256()
    for path in (*SOURCES, *sorted(_CSRC.glob("*.h"))):
        digest.update(path.read_bytes())
    digest.update(" ".join([*flags, torch.__version__]).encode())
    return f"{prefix}_{digest.hexdigest()[:16]}"


def _is_built(cpp_extension: ModuleType, name: str) -> bool:
    """Whether torch's extension cache already holds the build ``name`` (torch does not say
    so publicly: where its helper is missing, assume a build is due)."""
    try:
        folder = Path(cpp_extension._get_build_directory(name, verbose=False))
    except (AttributeError, TypeError, OSError):
        return False
    return any(folder.glob(f"{name}*.so")) or any(folder.glob(f"{name}*.pyd"))


def build_kernels(verbose: bool = False) -> ModuleType:
    """Compile (or load the cached build of) the kernels now; raises
    :class:`~kexue.exceptions.NativeKernelError` on failure.

    Call it ahead of training to take the one-off build out of the first step. The build's
    name carries a hash of the sources, the flags and torch's version, so a changed source or
    torch never loads a stale build.
    """
    global _module, _failed
    with _lock:
        if _module is not None:
            return _module
        from torch.utils import cpp_extension

        flags = _flags()
        name = _build_name("kexue_native", flags)
        if not _is_built(cpp_extension, name):
            log.warning(
                "kexue: building the native kernels %s (once per machine, about 30 s; "
                "%s=0 skips it)",
                name,
                ENV_VAR,
            )
        try:
            _module = cpp_extension.load(
                name=name,
                sources=[str(p) for p in SOURCES],
                extra_cflags=flags,
                extra_include_paths=[str(_CSRC)],
                verbose=verbose,
            )
        except Exception as exc:  # a missing compiler, ninja or header: fall back, say why
            _failed = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise NativeKernelError(f"kexue's native kernels did not build: {_failed}") from exc
        return _module


def kernels() -> ModuleType | None:
    """The compiled kernels, or ``None`` where they are switched off or cannot be built (one
    logged line says why, once). ``KEXUE_NATIVE=1`` turns a failed build into an error."""
    mode = _mode()
    enabled = _override if _override is not None else mode != "off"
    if not enabled:
        return None
    if _module is not None:
        return _module
    if _failed is not None:
        if mode == "on":
            raise NativeKernelError(f"kexue's native kernels did not build: {_failed}")
        return None
    try:
        return build_kernels()
    except NativeKernelError as exc:
        if mode == "on":
            raise
        log.warning("kexue: %s; the losses use their eager paths", exc)
        return None


@contextmanager
def native_kernels(enabled: bool) -> Iterator[None]:
    """Within the block, use the native kernels (``True``: built if needed) or the eager paths
    (``False``), whatever ``KEXUE_NATIVE`` says: for cross-checks and benchmarks. The switch
    is process-wide, not per thread."""
    global _override
    previous, _override = _override, enabled
    try:
        yield
    finally:
        _override = previous
