"""Input checks shared by every capability (kexue's ``sklearn.utils.validation``).

Public functions of kexue validate their arguments with these helpers, so a bad input fails
at the call with a ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (right
kind, wrong value or shape) whose message names the argument and the expected form, never
deep inside torch. Private helpers trust their callers.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch
from torch import Tensor

from kexue.exceptions import NonFiniteError

__all__ = [
    "check_bool",
    "check_broadcast",
    "check_callable",
    "check_choice",
    "check_class_labels",
    "check_count",
    "check_dim",
    "check_dtype",
    "check_finite",
    "check_float_tensor",
    "check_generator",
    "check_int",
    "check_mask",
    "check_model_output",
    "check_points",
    "check_real",
    "check_same_device",
    "check_sample_shape",
    "check_shape",
    "check_tensor",
    "describe",
    "renamed_arguments",
]

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")


def describe(value: object) -> str:
    """A short description of ``value`` for error messages (type, and dtype/shape of arrays)."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    if isinstance(value, np.ndarray):
        return f"a NumPy array of dtype {value.dtype} and shape {value.shape}"
    return f"{type(value).__name__} {value!r}" if _short(value) else type(value).__name__


def _short(value: object) -> bool:
    return isinstance(value, numbers.Number | str | bytes | type(None)) and len(repr(value)) < 60


def check_tensor(
    x: object,
    name: str,
    *,
    floating: bool = False,
    ndim: int | None = None,
    min_ndim: int = 0,
    allow_numpy: bool = False,
) -> Tensor:
    """``x`` as a tensor, else ``TypeError`` naming ``name``.

    ``floating``: require a floating dtype (float16/bfloat16/float32/float64);
    ``ndim``/``min_ndim``: require that many dimensions (``ValueError``);
    ``allow_numpy``: accept a NumPy array (converted without a copy).
    """
    if allow_numpy and isinstance(x, np.ndarray):
        if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            raise TypeError(f"{name} must hold numbers, got a NumPy array of dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        kinds = "a torch.Tensor or a NumPy array" if allow_numpy else "a torch.Tensor"
        raise TypeError(f"{name} must be {kinds}, got {describe(x)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(x.shape)}"
        )
    return x


def check_float_tensor(x: object, name: str) -> Tensor:
    """``TypeError`` naming ``name`` unless ``x`` is a floating-point tensor."""
    return check_tensor(x, name, floating=True)


def check_finite(x: Tensor, name: str, *, where: str = "") -> Tensor:
    """``ValueError`` naming ``name`` (and ``where``) if ``x`` holds NaN or infinite values."""
    if x.is_floating_point() or x.is_complex():
        finite = torch.isfinite(x.detach())
        if not bool(finite.all()):
            bad = "NaN" if bool(torch.isnan(x.detach()).any()) else "infinite"
            at = f" {where}" if where else ""
            raise ValueError(f"{name} must be finite, got {bad} values{at}")
    return x


def check_model_output(
    out: object, x: Tensor, name: str = "eps_model", *, step: Any = None
) -> Tensor:
    """The output of a user's model called on ``x``: a tensor of ``x``'s shape, finite.

    A wrong shape or type is a ``ValueError`` naming ``name``; NaN or infinite values a
    :class:`~kexue.exceptions.NonFiniteError` naming ``step`` (a diverged or broken model).
    """
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"{name} must return a tensor of the input's shape {tuple(x.shape)}, got {got}"
        )
    if not bool(torch.isfinite(out.detach()).all()):
        bad = "NaN" if bool(torch.isnan(out.detach()).any()) else "infinite"
        at = f" at step t={step}" if step is not None else ""
        raise NonFiniteError(f"{name} returned {bad} values{at}; check the model and its input")
    return out


def check_int(value: object, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` (Python or NumPy integer, not bool) in ``[low, high]``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {describe(value)}")
    value = operator.index(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_real(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a ``float`` (any real number, not bool) within the given bounds."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
            value = value.item()
        else:
            raise TypeError(f"{name} must be a number, got {describe(value)}")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return value


def check_choice(value: object, name: str, choices: Sequence[T]) -> T:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    try:
        ok = value in choices
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def check_dim(dim: object, ndim: int, name: str = "dim") -> int:
    """A dimension index valid for a tensor of ``ndim`` dimensions, made non-negative."""
    d = check_int(dim, name)
    if not -max(ndim, 1) <= d < max(ndim, 1):
        raise ValueError(f"{name}={d} is out of range for a tensor with {ndim} dimension(s)")
    return d % max(ndim, 1)


def check_shape(shape: object, name: str = "shape", *, min_len: int = 1) -> tuple[int, ...]:
    """An int or a sequence of positive ints as a tuple."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    if isinstance(shape, str | bytes) or not isinstance(shape, Sequence | torch.Size):
        raise TypeError(f"{name} must be a sequence of ints, got {describe(shape)}")
    out = tuple(check_int(v, f"{name} entries") for v in shape)
    if len(out) < min_len or any(v < 1 for v in out):
        raise ValueError(f"{name} must hold at least {min_len} positive size(s), got {tuple(out)}")
    return out


def check_dtype(dtype: object, name: str = "dtype", *, floating: bool = True) -> torch.dtype:
    """A ``torch.dtype`` (a floating one when ``floating``)."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, got {describe(dtype)}")
    if floating and not dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating torch.dtype, got {dtype}")
    return dtype


def check_generator(generator: object, name: str = "generator") -> torch.Generator | None:
    """None or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {describe(generator)}")
    return generator


def check_broadcast(x: Tensor, shape: Sequence[int], name: str, target: str) -> Tensor:
    """``ValueError`` unless ``x`` broadcasts to ``shape`` (the shape of ``target``)."""
    try:
        ok = torch.broadcast_shapes(x.shape, tuple(shape)) == tuple(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} of shape {tuple(x.shape)} must broadcast to {target}'s shape {tuple(shape)}"
        )
    return x


def check_same_device(*named: tuple[str, Tensor | None]) -> None:
    """``ValueError`` unless all given tensors (``(name, tensor)`` pairs) share one device."""
    present = [(n, t) for n, t in named if t is not None]
    if not present:
        return
    first_name, first = present[0]
    for n, t in present[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{n} is on {t.device} but {first_name} is on {first.device}; move them to "
                "one device"
            )


def check_callable(fn: object, name: str, signature: str) -> Callable:
    """``TypeError`` unless ``fn`` is callable (``signature`` shows how it is called)."""
    if not callable(fn):
        raise TypeError(f"{name} must be callable as {signature}, got {describe(fn)}")
    return fn


def check_bool(value: object, name: str) -> bool:
    """``value`` as a ``bool`` (Python or NumPy bool; not an int), else ``TypeError``."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {describe(value)}")
    return bool(value)


def check_class_labels(
    labels: object,
    num_classes: int,
    name: str = "labels",
    *,
    count_name: str = "num_classes",
    ignore_index: int | None = None,
) -> Tensor:
    """Class indices in ``0..num_classes-1`` (entries equal to ``ignore_index`` allowed).

    ``TypeError`` unless ``labels`` is a tensor of integers (or of integral floats);
    ``ValueError`` naming ``count_name`` (e.g. ``"num_labels"``) and the first bad label
    otherwise, instead of torch's ``Target 5 is out of bounds`` from inside a loss.
    """
    labels = check_tensor(labels, name)
    if labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must hold integer class indices, got dtype {labels.dtype}")
    values = labels.detach()
    if ignore_index is not None:
        values = values[values != ignore_index]
    if values.is_floating_point() and not bool((values == values.round()).all()):
        bad = values[values != values.round()][0].item()
        raise ValueError(f"{name} must hold integer class indices, got {bad!r}")
    outside = (values < 0) | (values >= num_classes)
    if bool(outside.any()):
        bad = values[outside][0].item()
        bad = int(bad) if float(bad).is_integer() else bad
        allowed = f" or {ignore_index} (ignored)" if ignore_index is not None else ""
        raise ValueError(
            f"{name} must be class indices in 0..{num_classes - 1} ({count_name}={num_classes})"
            f"{allowed}, got {bad}"
        )
    return labels


def check_mask(mask: object, shape: Sequence[int], name: str = "mask", target: str = "x") -> Tensor:
    """A boolean tensor (``True`` = keep) that broadcasts to ``shape``, the shape of ``target``."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = f"dtype {mask.dtype}" if isinstance(mask, Tensor) else describe(mask)
        raise TypeError(f"{name} must be a boolean tensor (True = keep), got {got}")
    return check_broadcast(mask, shape, name, target)


def check_sample_shape(shape: object, name: str = "sample_shape") -> tuple[int, ...]:
    """An int or a sequence of non-negative ints (empty allowed), like torch's ``sample_shape``."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool | np.bool_):
        shape = (shape,)
    if isinstance(shape, str | bytes) or not isinstance(shape, Sequence | torch.Size):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {describe(shape)}")
    out = []
    for size in shape:
        if isinstance(size, bool | np.bool_) or not isinstance(size, numbers.Integral):
            raise TypeError(f"{name} must be an int or a sequence of ints, got {shape!r}")
        out.append(operator.index(size))
    if any(s < 0 for s in out):
        raise ValueError(f"{name} must not hold negative sizes, got {tuple(out)}")
    return tuple(out)


def renamed_arguments(**renames: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Keep old keyword names of a public function working: ``@renamed_arguments(old="new")``.

    A call with ``old=...`` warns with a ``DeprecationWarning`` naming both and passes the value
    as ``new``; giving both is a ``TypeError``.
    """

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(
                            f"{fn.__qualname__}() got both {new!r} and its deprecated name {old!r}"
                        )
                    warnings.warn(
                        f"{fn.__qualname__}(): the argument {old!r} is now called {new!r}; "
                        f"{old!r} will be removed in a future release",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper

    return decorate


def check_count(value: object, name: str) -> int:
    """``value`` as a positive ``int`` (a count or size): ``TypeError`` unless an integer (not a
    bool), ``ValueError`` below 1; both say "``name`` must be a positive int"."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {describe(value)}")
    value = operator.index(value)
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def check_points(X: object, name: str = "X") -> Tensor:
    """``X`` as a 2-D floating tensor of ``N >= 1`` points with ``d >= 1`` finite features.

    Accepts a tensor or a NumPy array; integer input becomes float32, float16/bfloat16 are
    kept. ``TypeError`` for other objects, bool or complex values; ``ValueError`` for another
    number of dimensions (with a hint for 1-D input), an empty side, or NaN/infinite values
    (naming how many rows and the first).
    """
    if isinstance(X, np.ndarray):
        X = check_tensor(X, name, allow_numpy=True)
    if not isinstance(X, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a NumPy array, got {type(X).__name__}")
    if X.ndim != 2:
        hint = f" (use {name}[:, None] for N points of one feature)" if X.ndim == 1 else ""
        raise ValueError(
            f"{name} must be 2-D (N points, d features), got shape {tuple(X.shape)}{hint}"
        )
    if X.dtype == torch.bool or X.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {X.dtype}")
    if not X.is_floating_point():
        X = X.float()
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got {tuple(X.shape)}")
    if bool(torch.isfinite(X.sum(dim=1)).all()):  # one cheap pass; NaN/inf rows sum to NaN/inf
        return X
    bad = ~torch.isfinite(X).all(dim=1)  # exact check (a finite row can overflow its sum)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        raise ValueError(
            f"{name} has NaN or infinite values in {len(rows)} row(s), the first at row "
            f"{int(rows[0])}; drop or impute them before the neighbour search"
        )
    return X
