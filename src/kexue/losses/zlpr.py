"""Multi-label "softmax + cross-entropy" (ZLPR) loss, dense and sparse, hard and soft labels.

Theory: ``docs/guides/losses.md``. With raw scores ``s`` (no sigmoid) and targets
``t in [0, 1]``, the soft loss of one row is

    L(s, t) = log(1 + sum_i t_i exp(-s_i)) + log(1 + sum_i (1 - t_i) exp(s_i)),

which is the hard loss ``log(1 + sum_N exp(s_i)) + log(1 + sum_P exp(-s_j))`` when every
``t_i`` is 0 or 1. A threshold class of score ``s_0`` (general form) amounts to using
``s - s_0`` in place of ``s``. The minimiser on fixed targets is ``t = sigmoid(2 s)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kexue.native import kernels
from kexue.ops import check_reduction, compute_dtype, exp_flush_, logsumexp, reduce_loss
from kexue.validation import (
    check_broadcast,
    check_float_tensor,
    check_int,
    check_mask,
    check_real,
    check_same_device,
    check_tensor,
    renamed_arguments,
)

# With |s| < R, exp(s) and exp(-s) are normal floats and n of them sum to less than
# exp(_SUM_CAP) (finite), so the terms need no max-shift.
_FAST_RANGE = {torch.float32: 80.0, torch.float64: 700.0}
_SUM_CAP = {torch.float32: 87.0, torch.float64: 708.0}


def _fast_range(dtype: torch.dtype, n: int) -> float:
    return min(_FAST_RANGE.get(dtype, 80.0), _SUM_CAP.get(dtype, 87.0) - math.log(max(n, 1)))


def _weights(t: Tensor, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Weights ``(t, 1 - t)`` of the two terms: ``t < eps`` counts as 0, ``t > 1 - eps`` as 1."""
    if t.dtype == torch.bool:
        return t.to(dtype), (~t).to(dtype)
    return t.masked_fill(t < eps, 0.0), torch.rsub(t, 1.0).masked_fill_(t > 1.0 - eps, 0.0)


def _exact_terms(
    s: Tensor, w_pos: Tensor, w_neg: Tensor, keep: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Max-shifted ``lse([0, log w + z])`` for ``z = -s`` and ``z = s``: any finite, masked
    (``-inf``) or ``+inf`` score. Returns the row losses and both normalised gradient weights.

    A ``+inf`` score with a non-zero weight makes its term ``+inf``; the gradient weights of
    such a term are shared equally by its infinite entries (as in ``kexue.ops.logsumexp``).
    """
    ok = ~torch.isneginf(s)
    if keep is not None:
        ok &= keep
    loss = torch.zeros(s.shape[:-1], dtype=s.dtype, device=s.device)
    grads = []
    for z, w in ((-s, w_pos), (s, w_neg)):
        z = torch.where(ok & (w > 0), z, -math.inf)
        m = z.amax(-1, keepdim=True).clamp_min_(0.0)
        m.nan_to_num_(posinf=torch.finfo(m.dtype).max)  # +inf entries alone give exp = inf
        e = exp_flush_(z - m).mul_(w)
        total = e.sum(-1, keepdim=True).add_(torch.exp(-m))
        loss += (total.log() + m).squeeze(-1)
        weights = e / total
        infinite = torch.isinf(total)
        if bool(infinite.any()):
            top = torch.isposinf(e).to(e.dtype)
            weights = torch.where(infinite, top / top.sum(-1, keepdim=True).clamp_min_(1), weights)
        grads.append(weights)
    return loss, grads[0], grads[1]


def _snap_thresholds(eps: float, dtype: torch.dtype) -> tuple[float, float]:
    """``(lo, hi)`` such that ``threshold(t, lo, 0)`` drops ``t < eps`` and
    ``threshold(1 - t, hi, 0)`` drops ``t > 1 - eps``, with the comparisons of ``t < eps`` and
    ``t > 1 - eps`` in ``dtype`` (``1 - t`` is exact for ``t >= 1/2``, and ``t > c`` iff
    ``1 - t < 1 - c`` there)."""
    np_dtype = np.float32 if dtype != torch.float64 else np.float64
    below = np_dtype(-np.inf)
    c_lo = np_dtype(eps)
    c_hi = np_dtype(1.0 - eps)
    gap = np_dtype(1.0 - float(c_hi))  # exact: c_hi is in [1/2, 1]
    return float(np.nextafter(c_lo, below)), float(np.nextafter(gap, below))


def _max_sum(eps: float, dtype: torch.dtype) -> float:
    """A bound on the two sums below which no kept term met an overflowed or subnormal
    ``exp(s)``: a kept weight is at least ``eps``, so ``t e^{-s} < S`` gives ``e^s > eps / S``
    and ``(1 - t) e^s < S`` gives ``e^s < S / eps``. 0 when ``eps`` is too small for a
    useful bound (then the scores' range is checked before)."""
    info = torch.finfo(dtype)
    np_dtype = np.float32 if dtype != torch.float64 else np.float64
    bound = min(eps, 1.0 - float(np_dtype(1.0 - eps))) * min(1.0 / info.tiny, info.max) / 4
    return bound if bound > 1e10 else 0.0


class _DenseZLPR(torch.autograd.Function):
    """Soft ZLPR over the last dim of 2-D ``s`` (rows x classes).

    Fast path: with ``e = exp(s)``, ``A = sum t / e`` and ``B = sum (1 - t) e`` are plain sums
    and ``L = log1p(A) + log1p(B)``. Rows where that is not exact (an ``exp`` that overflowed
    or became subnormal, a masked ``-inf`` score, huge sums: ``A`` or ``B`` above
    :func:`_max_sum` or NaN) take the max-shifted exact path. Backward is one batched product
    over the two saved terms: ``dL/ds = (1 - t) e / (1 + B) - t e^{-1} / (1 + A)``.

    Passes over the scores (float targets): forward ``exp``, two ``threshold`` (the ``eps``
    snapping), ``1 - t``, a division and a product, one sum over both terms; backward one
    ``bmm``. Fresh full-size buffers cost page faults on CPUs, so the forward allocates the
    two terms as one buffer and the buffer of ``e``, which the backward reuses for the
    gradient.

    On CPU the native kernel (:mod:`kexue.native`) makes the same plain sums and the gradient
    in two passes per row, and the backward scales that gradient; a call with a row that needs
    the exact path, or with a mask, runs the eager code below.
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, keep: Tensor | None, eps: float) -> Tensor:
        bound = _max_sum(eps, s.dtype) if t.dtype != torch.bool else 0.0
        kernel = _native_kernel(s, t, keep)
        ctx.native = False
        if kernel is not None:
            lo, hi = _snap_thresholds(eps, s.dtype)
            limit = _fast_range(s.dtype, s.shape[-1])
            args = (lo, hi, bound, limit)
            loss, row_grad, fast = kernel.zlpr(s, t, *args, ctx.needs_input_grad[0])
            if bool(fast):
                # the backward scales the kernel's buffer in place (a fresh one costs page
                # faults); a second backward (retain_graph) runs the kernel again
                ctx.native, ctx.row_grad, ctx.rerun = True, row_grad, (kernel, args)
                ctx.save_for_backward(s, t)
                return loss
        slow = None
        if not bound:  # check the scores' range first (bool targets: no eps to bound by)
            limit = _fast_range(s.dtype, s.shape[-1])
            slow = ~((s.amin(-1) > -limit) & (s.amax(-1) < limit))
            if bool(slow.any()):
                s_exp = s.clamp(-limit, limit)
            else:
                s_exp, slow = s, None
        else:
            s_exp = s
        buf = torch.empty((2, *s.shape), dtype=s.dtype, device=s.device)
        v_pos, v_neg = buf[0], buf[1]
        if t.dtype == torch.bool:  # (mixed bool/float arithmetic is slow: mask instead)
            en = torch.exp(s_exp, out=v_neg)
            torch.reciprocal(en, out=v_pos).masked_fill_(~t, 0.0)
            en.masked_fill_(t, 0.0)
            scratch = None
        else:
            lo, hi = _snap_thresholds(eps, s.dtype)
            scratch = torch.exp(s_exp)
            torch.threshold(t, lo, 0.0, out=v_pos).div_(scratch)  # t e^{-s}, t < eps -> 0
            torch.sub(torch.ones((), dtype=s.dtype, device=s.device), t, out=v_neg)
            # (1 - t) e^s; torch's stubs (nn/functional.pyi) lack threshold_ (it exists)
            torch.nn.functional.threshold_(v_neg, hi, 0.0).mul_(scratch)  # type: ignore[attr-defined]
        if keep is not None:
            v_pos.masked_fill_(~keep, 0.0)
            v_neg.masked_fill_(~keep, 0.0)
        sums = buf.sum(-1)
        a, b = sums[0], sums[1]
        if bound:
            slow = ~((a < bound) & (b < bound))
            if not bool(slow.any()):
                slow = None
            else:
                a.masked_fill_(slow, 0.0)
                b.masked_fill_(slow, 0.0)
        loss = torch.log1p(a).add_(torch.log1p(b))
        d_pos, d_neg = a.add_(1.0), b.add_(1.0)
        if slow is not None:
            rows = slow.nonzero().squeeze(-1)
            sub_keep = keep[rows] if keep is not None else None
            w_pos, w_neg = _weights(t[rows], eps, s.dtype)
            loss_r, g_pos, g_neg = _exact_terms(s[rows], w_pos, w_neg, sub_keep)
            loss[rows], v_pos[rows], v_neg[rows] = loss_r, g_pos, g_neg
            d_pos[rows], d_neg[rows] = 1.0, 1.0
        ctx.save_for_backward(buf, d_pos, d_neg)
        ctx.scratch = scratch  # the gradient's buffer (not saved: the backward may reuse it)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        if ctx.native:
            row_grad, ctx.row_grad = ctx.row_grad, None
            if row_grad is None:
                kernel, args = ctx.rerun
                row_grad = kernel.zlpr(*ctx.saved_tensors, *args, True)[1]
            return row_grad.mul_(grad[:, None]), None, None, None
        buf, d_pos, d_neg = ctx.saved_tensors
        scratch, ctx.scratch = ctx.scratch, None
        rows, n = buf.shape[1:]
        coef = torch.stack([-(grad / d_pos), grad / d_neg], -1)[:, None, :]  # (rows, 1, 2)
        out = scratch if scratch is not None else buf.new_empty(rows, n)
        torch.bmm(coef, buf.permute(1, 0, 2), out=out.view(rows, 1, n))
        return out, None, None, None


def _native_kernel(s: Tensor, t: Tensor, keep: Tensor | None) -> Any:
    """The native kernels where they compute this loss (float32/64 contiguous scores on CPU,
    no mask), else ``None``."""
    if keep is not None or s.device.type != "cpu" or s.dtype not in _FAST_RANGE:
        return None
    if not (s.is_contiguous() and t.is_contiguous()) or t.dtype not in (s.dtype, torch.bool):
        return None
    return kernels()


def _check_weight(weight: Tensor | None, scores: Tensor) -> Tensor | None:
    if weight is None:
        return None
    check_float_tensor(weight, "weight")
    check_same_device(("scores", scores), ("weight", weight))
    return check_broadcast(weight, scores.shape[:-1], "weight", "the per-row loss (scores[..., 0])")


def _check_scores(scores: object) -> Tensor:
    scores = check_float_tensor(scores, "scores")
    if scores.ndim < 1:
        raise ValueError("scores must have shape (..., n) with at least one dimension")
    if scores.shape[-1] == 0:
        raise ValueError(
            f"scores must hold at least one class (last dimension), got shape {tuple(scores.shape)}"
        )
    return scores


def _shifted(scores: Tensor, threshold: float | Tensor) -> Tensor:
    s = scores.to(compute_dtype(scores.dtype))
    if isinstance(threshold, Tensor):
        check_float_tensor(threshold, "threshold")
        check_same_device(("scores", scores), ("threshold", threshold))
        check_broadcast(threshold, s.shape, "threshold", "scores")
        return s - threshold.to(s.dtype)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise TypeError(f"threshold must be a finite number or a tensor, got {threshold!r}")
    if not math.isfinite(threshold):
        raise TypeError(f"threshold must be a finite number or a tensor, got {threshold!r}")
    return s - threshold if threshold != 0 else s


@renamed_arguments(targets="target")
def zlpr_loss(
    scores: Tensor,
    target: Tensor,
    *,
    mask: Tensor | None = None,
    threshold: float | Tensor = 0.0,
    reduction: str = "mean",
    eps: float = 1e-7,
    weight: Tensor | None = None,
) -> Tensor:
    """ZLPR loss ``log(1 + sum_i t_i e^{-(s_i - s_0)}) + log(1 + sum_i (1 - t_i) e^{s_i - s_0})``.

    ``docs/guides/losses.md`` ("Soft labels", "Pitfalls") derives it and its edge cases.

    Args:
        scores: raw scores, shape ``(..., n)`` with ``n >= 1``, any floating dtype
            (float16/bfloat16 are computed in float32; the loss is returned in float32 then).
        target: the labels ``t``, same shape (like ``torch.nn.functional``'s ``target``);
            ``bool`` for hard labels (fastest) or floating in ``[0, 1]`` (hard 0/1 or soft).
            ``t < eps`` counts as exactly 0 (its ``-s`` term is dropped), ``t > 1 - eps`` as
            exactly 1 (its ``+s`` term is dropped): no clipping, so scores masked to huge
            negative values cannot blow the loss up. (Formerly ``targets``, still accepted
            with a ``DeprecationWarning``.)
        mask: optional boolean tensor broadcastable to ``scores``; ``False`` marks a class that
            does not exist for this row: it contributes nothing and gets zero gradient. A
            score of ``-inf`` is treated the same way.
        threshold: the score ``s_0`` of the implicit threshold class (float or tensor
            broadcastable to ``scores``); predict class i iff ``s_i > s_0``.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` over the leading dimensions.
        eps: the snapping tolerance for soft targets, in ``[0, 0.5)``.
        weight: optional per-row weights broadcastable to ``scores.shape[:-1]``.

    Returns:
        The loss, reduced, or of shape ``scores.shape[:-1]`` with ``reduction="none"``.
        Gradients flow to ``scores`` (and to ``target`` if it requires grad). A ``+inf`` score
        on a class with ``t < 1`` gives ``+inf`` (as ``BCEWithLogitsLoss`` does); its gradient
        is the limit of the finite case: 1 on that score (shared equally by a row's infinite
        scores), 0 on the row's other ``+s`` terms; a ``+inf`` score with ``t = 1`` drops out.

    Raises:
        TypeError: ``scores`` is not a floating tensor, ``target`` neither bool nor floating.
        ValueError: ``scores`` has no class, ``target`` has another shape or values outside
            ``[0, 1]``, tensors on different devices, bad ``reduction``/``eps``/``mask``.
    """
    _check_scores(scores)
    check_tensor(target, "target")
    check_same_device(("scores", scores), ("target", target))
    if target.shape != scores.shape:
        raise ValueError(
            f"target must have the same shape as scores {tuple(scores.shape)}, "
            f"got {tuple(target.shape)}"
        )
    check_reduction(reduction)
    eps = check_real(eps, "eps", low=0.0, high=0.5, high_open=True)
    weight = _check_weight(weight, scores)
    s = _shifted(scores, threshold)

    keep = None
    if mask is not None:
        check_mask(mask, s.shape, "mask", "scores")
        check_same_device(("scores", scores), ("mask", mask))
        keep = mask.expand(s.shape)

    if target.is_floating_point():
        lo, hi = torch.aminmax(target.detach()) if target.numel() else (s.new_zeros(()),) * 2
        if torch.isnan(lo) or torch.isnan(hi):
            raise ValueError("target contains NaN; expected values in [0, 1]")
        if lo < 0 or hi > 1:
            raise ValueError(
                f"target must lie in [0, 1], got values in [{lo.item():.4g}, {hi.item():.4g}]"
            )
        t = target.to(s.dtype)
        if target.requires_grad:
            return reduce_loss(_composite_zlpr(s, t, keep, eps), reduction, weight)
    elif target.dtype == torch.bool:
        t = target
    else:
        raise TypeError(
            f"target must be bool (hard labels) or floating in [0, 1], got dtype {target.dtype}"
        )
    rows = s.shape[:-1]
    n = s.shape[-1]
    flat_keep = keep.reshape(-1, n) if keep is not None else None
    loss = _DenseZLPR.apply(s.reshape(-1, n), t.reshape(-1, n), flat_keep, float(eps))
    return reduce_loss(loss.reshape(rows), reduction, weight)


def _composite_zlpr(s: Tensor, t: Tensor, keep: Tensor | None, eps: float) -> Tensor:
    """Autograd-composed loss, differentiable in ``t`` too (used when the target needs grad)."""
    zero_pos, zero_neg = (t < eps) | (t <= 0), (t > 1.0 - eps) | (t >= 1)
    log_tp = torch.where(zero_pos, 1.0, t).log().masked_fill(zero_pos, -math.inf)
    log_tn = torch.where(zero_neg, 0.0, t).neg().log1p().masked_fill(zero_neg, -math.inf)
    ok = ~torch.isneginf(s)
    if keep is not None:
        ok = ok & keep
    pos = logsumexp(log_tp - s, mask=ok & ~zero_pos, implicit_zero=True)
    neg = logsumexp(log_tn + s, mask=ok & ~zero_neg, implicit_zero=True)
    return pos + neg


@renamed_arguments(positives="target")
def sparse_zlpr_loss(
    scores: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -1,
    reduction: str = "mean",
    threshold: float | Tensor = 0.0,
    weight: Tensor | None = None,
) -> Tensor:
    """Hard ZLPR loss from positive class indices, never building a dense label tensor.

    ``target`` holds the positive classes of each row (as ``target`` of
    ``torch.nn.functional.multilabel_margin_loss``): shape ``(..., k)``, integer class indices
    in ``[0, n)`` padded with ``ignore_index``; duplicates count once. (Formerly
    ``positives``, still accepted with a ``DeprecationWarning``.) With ``a = lse([0, s])``
    over all classes and ``b = lse(s_P)``, the negative term ``log(1 + sum_N e^{s_i})`` is
    ``a + log1p(-e^{b - a})``; rows where the positives hold more than half of the mass (where
    that subtraction would cancel) are recomputed exactly with the positives excluded, so the
    result stays accurate, finite and non-negative (``docs/guides/losses.md``, "Sparse
    labels"). Other arguments and ``+inf`` scores as in :func:`zlpr_loss`.
    """
    _check_scores(scores)
    check_tensor(target, "target")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"target must be an integer tensor of positive class indices, got dtype {target.dtype}"
        )
    check_same_device(("scores", scores), ("target", target))
    if target.ndim != scores.ndim or target.shape[:-1] != scores.shape[:-1]:
        raise ValueError(
            f"target must have shape (..., k) with the leading dims of scores "
            f"{tuple(scores.shape[:-1])}, got {tuple(target.shape)}"
        )
    check_reduction(reduction)
    ignore_index = check_int(ignore_index, "ignore_index")
    weight = _check_weight(weight, scores)
    n = scores.shape[-1]
    positives = target.long()
    valid = positives != ignore_index
    if positives.numel() and ((positives[valid] < 0) | (positives[valid] >= n)).any():
        raise ValueError(
            f"target must hold class indices in [0, {n}) or ignore_index={ignore_index}"
        )
    s = _shifted(scores, threshold)

    # Duplicates would be counted twice in sum_P: keep the first of each run after sorting.
    positives, _ = torch.where(valid, positives, n).sort(-1)
    valid = positives < n
    if positives.shape[-1] > 1:
        valid[..., 1:] &= positives[..., 1:] != positives[..., :-1]
    index = torch.where(valid, positives, 0)
    s_pos = s.gather(-1, index)

    pos = logsumexp(-s_pos, mask=valid, implicit_zero=True)
    a = logsumexp(s, implicit_zero=True)
    b = logsumexp(s_pos, mask=valid)
    gap = b - a  # NaN only where a positive and a negative score are both +inf
    ratio = torch.exp(torch.where(torch.isnan(gap), 0.0, gap))
    neg = a + torch.log1p(-ratio.clamp(max=0.5))
    hard = ratio > 0.5
    if hard.any():  # padding points at an extra column n, dropped after the scatter
        rows = torch.nn.functional.pad(s[hard], (0, 1)).scatter(-1, positives[hard], -math.inf)
        exact = logsumexp(rows[..., :n], implicit_zero=True)
        neg = neg.index_put((hard,), exact)
    return reduce_loss(pos + neg.clamp_min(0.0), reduction, weight)


def zlpr_probabilities(scores: Tensor) -> Tensor:
    """Calibrated class probabilities of ZLPR scores: ``sigmoid(2 s)`` (the soft optimum)."""
    check_float_tensor(scores, "scores")
    return torch.sigmoid(2.0 * scores)


def zlpr_predict(scores: Tensor, threshold: float | Tensor = 0.0) -> Tensor:
    """Decision rule of ZLPR: class i is predicted iff ``s_i > threshold`` (boolean tensor)."""
    check_float_tensor(scores, "scores")
    if isinstance(threshold, Tensor):
        check_same_device(("scores", scores), ("threshold", threshold))
    return scores > threshold


class ZLPRLoss(nn.Module):
    """``nn.Module`` form of :func:`zlpr_loss`; ``forward(scores, target, mask=None)``."""

    def __init__(
        self, *, threshold: float = 0.0, reduction: str = "mean", eps: float = 1e-7
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        self.threshold, self.reduction, self.eps = threshold, reduction, eps

    @renamed_arguments(targets="target")
    def forward(
        self,
        scores: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
        weight: Tensor | None = None,
    ) -> Tensor:
        return zlpr_loss(
            scores,
            target,
            mask=mask,
            threshold=self.threshold,
            reduction=self.reduction,
            eps=self.eps,
            weight=weight,
        )

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, reduction={self.reduction!r}, eps={self.eps}"


class SparseZLPRLoss(nn.Module):
    """``nn.Module`` form of :func:`sparse_zlpr_loss`; ``forward(scores, target)`` with
    ``target`` the positive class indices."""

    def __init__(
        self, *, ignore_index: int = -1, reduction: str = "mean", threshold: float = 0.0
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        self.ignore_index, self.reduction, self.threshold = ignore_index, reduction, threshold

    @renamed_arguments(positives="target")
    def forward(self, scores: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return sparse_zlpr_loss(
            scores,
            target,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            threshold=self.threshold,
            weight=weight,
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
