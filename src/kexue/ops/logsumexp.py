"""Stable logsumexp with boolean masks, an implicit zero term, and its proven bounds.

Notation of ``docs/guides/ops.md``: ``lse(x) = log sum_i exp(x_i)``, ``x_max = max_i x_i``,
``n`` the number of entries reduced over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kexue.validation import (
    check_dim,
    check_float_tensor,
    check_mask,
    check_real,
    check_same_device,
)

Dim = int | Sequence[int]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are reduced in float32 (like autocast's float32 ops); others as is."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _dims(dim: Dim, ndim: int) -> tuple[int, ...]:
    """``dim`` (an int or a non-empty sequence of distinct ints) as sorted non-negative dims."""
    if isinstance(dim, Sequence) and not isinstance(dim, str):
        if not dim:
            raise TypeError("dim must be an int or a non-empty sequence of ints, got ()")
        dims = tuple(dim)
    else:
        dims = (dim,)
    out = [check_dim(d, ndim) for d in dims]
    if len(set(out)) != len(out):
        raise ValueError(f"dim repeats a dimension: {dim!r}")
    return tuple(sorted(out))


def _count(x: Tensor, dims: tuple[int, ...]) -> int:
    return math.prod(x.shape[d] for d in dims) if x.ndim else 1


# Below these arguments exp() is denormal or zero, and on CPUs it then runs 10-100x slower.
# Flushing such terms to exactly 0 changes a sum that holds a term >= 1 by < n * 2e-38.
_EXP_FLOOR = {torch.float32: -87.0, torch.float64: -708.0}


def exp_flush_(d: Tensor) -> Tensor:
    """In place ``exp(d)`` for ``d <= 0``, with results below the smallest normal set to 0.

    Used after subtracting a row maximum: entries that would underflow (including ``-inf``)
    become exactly 0 without taking the slow denormal path of the CPU.
    """
    floor = _EXP_FLOOR.get(d.dtype)
    if floor is None:
        return d.exp_()
    d.clamp_min_(floor).exp_()
    # torch's stubs (nn/functional.pyi) lack threshold_, which exists at run time
    return torch.nn.functional.threshold_(d, math.exp(floor), 0.0)  # type: ignore[attr-defined]


# Rows whose entries all lie within this of their shift exponentiate to normal floats (the
# margin to _EXP_FLOOR keeps rounding at the boundary out): no flush needed, two passes fewer.
_NO_FLUSH = {torch.float32: -80.0, torch.float64: -700.0}


def _exp_shifted(x: Tensor, m: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``exp(x - m)`` with subnormal terms flushed to 0 (:func:`exp_flush_`), skipping the
    flush's clamp and threshold passes when no entry is more than 80 (float32) below its
    shift: one reduction read instead of two read-write passes (the plain case)."""
    d = x - m
    bound = _NO_FLUSH.get(d.dtype)
    if bound is not None and bool((x.amin(dim=dims, keepdim=True) - m > bound).all()):
        return d.exp_()
    return exp_flush_(d)


class _LogSumExp(torch.autograd.Function):
    """lse over ``dims`` (keepdim) of ``x`` with masked entries and ``-inf`` dropped.

    Saves the normalised weights ``exp(x - out)`` (the softmax), so the backward is a single
    multiply. All-dropped rows give ``-inf`` (or 0 with the implicit zero) and a zero
    gradient, where ``torch.logsumexp`` would back-propagate ``exp(-inf + inf) = nan``. Rows
    holding ``+inf`` give ``+inf``; their gradient is shared equally by their ``+inf`` entries
    (the limit of the softmax weights), where ``torch.logsumexp`` gives ``nan``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor | None, dims: tuple[int, ...], implicit_zero: bool):
        if mask is not None:
            x = torch.where(mask, x, -math.inf)
        m = x.amax(dim=dims, keepdim=True)
        if implicit_zero:
            m.clamp_min_(0.0)
        # An all -inf row shifts by 0; a row with +inf by the largest float, so that its
        # +inf entries alone give exp = inf (the others 0): the backward finds them there.
        torch.nan_to_num_(m, nan=0.0, posinf=torch.finfo(m.dtype).max, neginf=0.0)
        e = _exp_shifted(x, m, dims)
        s = e.sum(dim=dims, keepdim=True)
        if implicit_zero:
            s.add_(torch.exp(-m))
        out = s.log().add_(m)
        ctx.save_for_backward(e, s)
        ctx.dims = dims
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        e, s = ctx.saved_tensors
        out = e * torch.where(s > 0, grad / s, 0.0)
        infinite = torch.isinf(s)
        if bool(infinite.any()):
            out = torch.where(infinite, _share_infinite(e, grad, ctx.dims), out)
        return out, None, None, None


def _share_infinite(weights: Tensor, grad: Tensor, dims: int | tuple[int, ...] = -1) -> Tensor:
    """``grad`` split equally among the ``+inf`` entries of ``weights`` along ``dims``.

    The gradient of ``lse`` at a row holding ``+inf``: the limit of the softmax weights, which
    put all the mass, in equal parts, on the largest entries.
    """
    top = torch.isposinf(weights)
    count = top.sum(dims, keepdim=True).clamp_min_(1)
    return top * (grad / count)


def logsumexp(
    x: Tensor,
    dim: Dim = -1,
    *,
    mask: Tensor | None = None,
    implicit_zero: bool = False,
    keepdim: bool = False,
) -> Tensor:
    """``lse(x) = log sum_i exp(x_i)`` over ``dim``, stable for any finite or ``-inf`` input.

    With ``implicit_zero=True`` computes ``log(1 + sum_i exp(x_i)) = lse([0, x])`` without
    concatenating a zero column (the form of the multi-label loss).

    Args:
        x: floating tensor. float16/bfloat16 inputs are reduced in float32 and the result is
            returned in the input dtype, so no sentinel constant can overflow.
        dim: dimension or dimensions to reduce.
        mask: optional boolean tensor broadcastable to ``x``; ``True`` keeps an entry. Masked
            entries and ``-inf`` entries contribute nothing and get a zero gradient.
        implicit_zero: add an ``exp(0) = 1`` term inside the log.
        keepdim: keep the reduced dimensions with size 1.

    Returns:
        The reduced tensor. An empty or all-masked row gives ``-inf`` (``0`` with
        ``implicit_zero``), with zero, finite gradients. A row holding ``+inf`` gives ``+inf``,
        its gradient shared equally by its ``+inf`` entries (the limit of the softmax).

    See ``docs/guides/ops.md`` ("Computing lse stably").
    """
    check_float_tensor(x, "x")
    dims = _dims(dim, x.ndim)
    if x.ndim == 0:
        x = x.reshape(1)
    work = x.to(compute_dtype(x.dtype))
    if mask is not None:
        check_mask(mask, x.shape, "mask", "x")
        check_same_device(("x", x), ("mask", mask))
    if x.numel() == 0:
        shape = [1 if d in dims else size for d, size in enumerate(x.shape)]
        out = torch.full(shape, 0.0 if implicit_zero else -math.inf, dtype=work.dtype)
        out = out.to(x.device) + 0.0 * work.sum()  # keeps the (empty) graph connected
    else:
        out = _LogSumExp.apply(work, mask, dims, implicit_zero)
    if not keepdim:
        out = out.squeeze(dims)
    return out.to(x.dtype)


def smooth_max(
    x: Tensor, dim: Dim = -1, *, tau: float | None = None, max_error: float | None = None
) -> Tensor:
    """Smooth maximum ``tau * lse(x / tau)`` with ``x_max < result <= x_max + tau * log n``.

    Give either ``tau`` (temperature, default 1) or ``max_error``: then ``tau = max_error /
    log n`` so the result exceeds the true maximum by at most ``max_error``
    (``docs/guides/ops.md``, inequality 2). With ``n = 1`` the smooth max is the entry itself.
    """
    check_float_tensor(x, "x")
    if tau is not None and max_error is not None:
        raise ValueError("give either tau or max_error, not both")
    dims = _dims(dim, x.ndim)
    n = _count(x, dims)
    if max_error is not None:
        max_error = check_real(max_error, "max_error", low=0.0, low_open=True)
        tau = max_error / math.log(n) if n > 1 else max_error
    elif tau is None:
        tau = 1.0
    tau = check_real(tau, "tau", low=0.0, low_open=True)
    work = x.to(compute_dtype(x.dtype))  # x / tau could overflow in float16
    return (tau * logsumexp(work / tau, dims)).to(x.dtype)


class LSEBounds(NamedTuple):
    """``lower = x_max`` and ``upper = x_max + log n``: ``lower < lse(x) <= upper``."""

    lower: Tensor
    upper: Tensor


def logsumexp_bounds(x: Tensor, dim: Dim = -1, *, keepdim: bool = False) -> LSEBounds:
    """Basic bounds ``x_max < lse(x) <= x_max + log n`` (``docs/guides/ops.md``, inequality 1).

    Raises ``ValueError`` when ``dim`` holds no entry (``n = 0``: no maximum to bound by).
    """
    check_float_tensor(x, "x")
    dims = _dims(dim, x.ndim)
    n = _count(x, dims)
    if n == 0:
        raise ValueError(
            f"x must hold at least one entry along dim={dim!r}, got shape {tuple(x.shape)}"
        )
    lower = x.amax(dim=dims, keepdim=keepdim)
    return LSEBounds(lower, lower + math.log(n))


def renyi_entropy(p: Tensor, order: float = 1.0, dim: int = -1) -> Tensor:
    """Rényi entropy ``H_t(p) = log(sum_i p_i^t) / (1 - t)``; Shannon at ``t = 1``,
    ``-log max p`` at ``t = inf``. Zero probabilities contribute nothing."""
    check_float_tensor(p, "p")
    order = check_real(order, "order", low=0.0, finite=False)
    check_dim(dim, p.ndim)
    if order == 1.0:
        return torch.special.entr(p).sum(dim)
    if math.isinf(order):
        return -p.amax(dim).log()
    return torch.where(p > 0, p, 0.0).pow(order).sum(dim).log() / (1.0 - order)


def logsumexp_lower_bound(x: Tensor, p: Tensor, *, order: float = 1.0, dim: int = -1) -> Tensor:
    """Lower bound ``lse(x) >= sum_i p_i x_i + H_t(p)`` for a probability vector ``p``.

    ``H_t`` is the Rényi entropy of order ``t = order >= 1`` (``docs/guides/ops.md``,
    inequality 4):
    ``t = 2`` is the Cauchy–Schwarz bound ``- log sum p_i^2``, ``t > 1`` the Hölder bound
    ``- log(sum p_i^t) / (t - 1)``, ``t = 1`` the Shannon bound, tight iff ``p = softmax(x)``
    with gap ``KL(p || softmax(x))``. A uniform ``p`` gives the mean bound
    ``mean(x) + log n`` (inequality 3).
    """
    check_float_tensor(x, "x")
    check_float_tensor(p, "p")
    check_same_device(("x", x), ("p", p))
    check_dim(dim, p.ndim)
    order = check_real(order, "order", low=1.0, finite=False)
    one = torch.ones((), dtype=p.dtype, device=p.device)
    if (p < 0).any() or not torch.allclose(
        p.sum(dim), one, atol=1e-5 if p.dtype != torch.float64 else 1e-9
    ):
        raise ValueError("p must be a probability vector along dim (non-negative, sums to 1)")
    weighted = torch.where(p > 0, p * x, 0.0).sum(dim)
    return weighted + renyi_entropy(p, order, dim)
