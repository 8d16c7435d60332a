"""The exceptions kexue raises beyond Python's own ``ValueError`` / ``TypeError``.

Bad arguments raise ``ValueError`` or ``TypeError`` naming the argument (see
:mod:`kexue.validation`); the classes here cover what is not a bad argument: files that cannot
be trusted, a model that returned NaN, an estimator used before ``fit``, a missing extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # resolved lazily at run time by __getattr__ below
    from sklearn.exceptions import NotFittedError

__all__ = [
    "CheckpointError",
    "KexueError",
    "MissingExtraError",
    "NativeKernelError",
    "NonFiniteError",
    "NotFittedError",
]


class KexueError(Exception):
    """Base class of kexue's own exceptions."""


class CheckpointError(KexueError, RuntimeError):
    """A saved folder or checkpoint is missing, incomplete, corrupted or of another format."""


class NonFiniteError(KexueError, ValueError):
    """A model (or callable) returned NaN or infinite values; the message names the step."""


class MissingExtraError(KexueError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class NativeKernelError(KexueError, RuntimeError):
    """A native kernel was required (``KEXUE_NATIVE=1``) but could not be built."""


class _NotFittedError(ValueError, AttributeError):
    """An estimator was used before ``fit`` (scikit-learn's class when it is installed)."""


def __getattr__(name: str) -> type[Exception]:
    # NotFittedError is scikit-learn's own class, so ``except sklearn.exceptions.NotFittedError``
    # works too; resolved on first use because importing scikit-learn takes seconds.
    if name == "NotFittedError":
        try:
            from sklearn.exceptions import NotFittedError
        except ImportError:  # scikit-learn comes with the hubness extra; same bases
            NotFittedError = _NotFittedError
        globals()["NotFittedError"] = NotFittedError
        return NotFittedError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
