"""Multi-label "softmax + cross-entropy" (ZLPR) loss, dense and sparse, hard and soft labels.

Reference: ``../shared/reference/multilabel-loss.md``. With raw scores ``s`` (no sigmoid) and
targets ``t in [0, 1]``, the soft loss of one row is

    L(s, t) = log(1 + sum_i t_i exp(-s_i)) + log(1 + sum_i (1 - t_i) exp(s_i)),

which is the hard loss ``log(1 + sum_N exp(s_i)) + log(1 + sum_P exp(-s_j))`` when every
``t_i`` is 0 or 1. A threshold class of score ``s_0`` (general form) amounts to using
``s - s_0`` in place of ``s``. The minimiser on fixed targets is ``t = sigmoid(2 s)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kexue.losses.reduction import check_reduction, reduce_loss
from kexue.ops import logsumexp
from kexue.ops.logsumexp import check_float_tensor, compute_dtype, exp_flush_

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
    """Max-shifted ``lse([0, log w + z])`` for ``z = -s`` and ``z = s``: any finite or
    masked (``-inf``) score. Returns the row losses and both normalised gradient weights."""
    ok = ~torch.isneginf(s)
    if keep is not None:
        ok &= keep
    loss = torch.zeros(s.shape[:-1], dtype=s.dtype, device=s.device)
    grads = []
    for z, w in ((-s, w_pos), (s, w_neg)):
        z = torch.where(ok & (w > 0), z, -math.inf)
        m = z.amax(-1, keepdim=True).clamp_min_(0.0)
        e = exp_flush_(z - m).mul_(w)
        total = e.sum(-1, keepdim=True).add_(torch.exp(-m))
        loss += (total.log() + m).squeeze(-1)
        grads.append(e.div_(total))
    return loss, grads[0], grads[1]


class _DenseZLPR(torch.autograd.Function):
    """Soft ZLPR over the last dim of 2-D ``s`` (rows x classes).

    Fast path, for rows whose scores lie in ``(-R, R)`` (``R = min(80, 87 - log n)`` in
    float32): with
    ``e = exp(s)``, ``A = sum t / e`` and ``B = sum (1 - t) e`` are plain sums of normal
    floats, and ``L = log1p(A) + log1p(B)``. Other rows (masked to huge or ``-inf`` scores,
    extreme logits) take the max-shifted exact path. Backward is one fused pass:
    ``dL/ds = (1 - t) e / (1 + B) - t e^{-1} / (1 + A)``.
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, keep: Tensor | None, eps: float) -> Tensor:
        limit = _fast_range(s.dtype, s.shape[-1])
        slow = ~((s.amin(-1) > -limit) & (s.amax(-1) < limit))
        any_slow = bool(slow.any())
        # In place where possible: each fresh full-size buffer costs page faults on the CPU.
        # One buffer for both terms: fewer fresh allocations, fewer page faults.
        buf = torch.empty((2, *s.shape), dtype=s.dtype, device=s.device)
        v_pos, en = buf[0], buf[1]
        torch.exp(s.clamp(-limit, limit) if any_slow else s, out=en)
        if t.dtype == torch.bool:  # (mixed bool/float arithmetic is slow: mask instead)
            torch.reciprocal(en, out=v_pos).masked_fill_(~t, 0.0)
            v_neg = en.masked_fill_(t, 0.0)
        else:
            torch.div(t, en, out=v_pos).masked_fill_(t < eps, 0.0)  # t e^{-s}
            v_neg = en.lerp_(torch.zeros((), dtype=en.dtype), t)  # en * (1 - t), accurate
            v_neg.masked_fill_(t > 1.0 - eps, 0.0)
        if keep is not None:
            v_pos.masked_fill_(~keep, 0.0)
            v_neg.masked_fill_(~keep, 0.0)
        a, b = v_pos.sum(-1), v_neg.sum(-1)
        loss = torch.log1p(a).add_(torch.log1p(b))
        d_pos, d_neg = a.add_(1.0), b.add_(1.0)
        if any_slow:
            rows = slow.nonzero().squeeze(-1)
            sub_keep = keep[rows] if keep is not None else None
            w_pos, w_neg = _weights(t[rows], eps, s.dtype)
            loss_r, g_pos, g_neg = _exact_terms(s[rows], w_pos, w_neg, sub_keep)
            loss[rows], v_pos[rows], v_neg[rows] = loss_r, g_pos, g_neg
            d_pos[rows], d_neg[rows] = 1.0, 1.0
        ctx.save_for_backward(v_pos, v_neg, d_pos, d_neg)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        v_pos, v_neg, d_pos, d_neg = ctx.saved_tensors
        out = v_neg * (grad / d_neg).unsqueeze(-1)
        out.addcmul_(v_pos, (grad / d_pos).unsqueeze(-1), value=-1.0)
        return out, None, None, None


def _check_weight(weight: Tensor | None, rows: torch.Size) -> Tensor | None:
    if weight is None:
        return None
    check_float_tensor(weight, "weight")
    try:
        ok = torch.broadcast_shapes(weight.shape, rows) == rows
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} must broadcast to the per-row loss shape "
            f"{tuple(rows)} (scores.shape[:-1])"
        )
    return weight


def _check_scores(scores: Tensor) -> Tensor:
    check_float_tensor(scores, "scores")
    if scores.ndim < 1:
        raise ValueError("scores must have shape (..., n) with at least one dimension")
    return scores


def _shifted(scores: Tensor, threshold: float | Tensor) -> Tensor:
    s = scores.to(compute_dtype(scores.dtype))
    if isinstance(threshold, Tensor):
        check_float_tensor(threshold, "threshold")
        try:
            ok = torch.broadcast_shapes(threshold.shape, s.shape) == s.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"threshold of shape {tuple(threshold.shape)} must broadcast to scores' shape "
                f"{tuple(s.shape)}"
            )
        return s - threshold.to(s.dtype)
    if not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise TypeError(f"threshold must be a finite number or a tensor, got {threshold!r}")
    return s - threshold if threshold != 0 else s


def zlpr_loss(
    scores: Tensor,
    targets: Tensor,
    *,
    mask: Tensor | None = None,
    threshold: float | Tensor = 0.0,
    reduction: str = "mean",
    eps: float = 1e-7,
    weight: Tensor | None = None,
) -> Tensor:
    """ZLPR loss ``log(1 + sum_i t_i e^{-(s_i - s_0)}) + log(1 + sum_i (1 - t_i) e^{s_i - s_0})``.

    Args:
        scores: raw scores, shape ``(..., n)``, any floating dtype (float16/bfloat16 are
            computed in float32; the loss is returned in float32 then).
        targets: same shape; ``bool`` for hard labels (fastest) or floating in ``[0, 1]``
            (hard 0/1 or soft). ``t < eps`` counts as exactly 0 (its ``-s`` term is dropped),
            ``t > 1 - eps`` as exactly 1 (its ``+s`` term is dropped): no clipping, so scores
            masked to huge negative values cannot blow the loss up.
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
        Gradients flow to ``scores`` (and to ``targets`` if they require grad).
    """
    _check_scores(scores)
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.shape != scores.shape:
        raise ValueError(
            f"targets must have the same shape as scores {tuple(scores.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    check_reduction(reduction)
    if not (isinstance(eps, int | float) and 0 <= eps < 0.5):
        raise ValueError(f"eps must be a number in [0, 0.5), got {eps!r}")
    weight = _check_weight(weight, scores.shape[:-1])
    s = _shifted(scores, threshold)

    keep = None
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a boolean tensor broadcastable to scores (True = keep)")
        try:
            ok = torch.broadcast_shapes(mask.shape, s.shape) == s.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} must broadcast to scores' shape "
                f"{tuple(s.shape)}"
            )
        keep = mask.expand(s.shape)

    if targets.is_floating_point():
        lo, hi = torch.aminmax(targets.detach())
        if torch.isnan(lo) or torch.isnan(hi):
            raise ValueError("targets contain NaN; expected values in [0, 1]")
        if lo < 0 or hi > 1:
            raise ValueError(
                f"targets must lie in [0, 1], got values in [{lo.item():.4g}, {hi.item():.4g}]"
            )
        t = targets.to(s.dtype)
        if targets.requires_grad:
            return reduce_loss(_composite_zlpr(s, t, keep, eps), reduction, weight)
    elif targets.dtype == torch.bool:
        t = targets
    else:
        raise TypeError(
            f"targets must be bool (hard labels) or floating in [0, 1], got dtype {targets.dtype}"
        )
    rows = s.shape[:-1]
    n = s.shape[-1]
    flat_keep = keep.reshape(-1, n) if keep is not None else None
    loss = _DenseZLPR.apply(s.reshape(-1, n), t.reshape(-1, n), flat_keep, float(eps))
    return reduce_loss(loss.reshape(rows), reduction, weight)


def _composite_zlpr(s: Tensor, t: Tensor, keep: Tensor | None, eps: float) -> Tensor:
    """Autograd-composed loss, differentiable in ``t`` too (used when targets need grad)."""
    zero_pos, zero_neg = (t < eps) | (t <= 0), (t > 1.0 - eps) | (t >= 1)
    log_tp = torch.where(zero_pos, 1.0, t).log().masked_fill(zero_pos, -math.inf)
    log_tn = torch.where(zero_neg, 0.0, t).neg().log1p().masked_fill(zero_neg, -math.inf)
    ok = ~torch.isneginf(s)
    if keep is not None:
        ok = ok & keep
    pos = logsumexp(log_tp - s, mask=ok & ~zero_pos, implicit_zero=True)
    neg = logsumexp(log_tn + s, mask=ok & ~zero_neg, implicit_zero=True)
    return pos + neg


def sparse_zlpr_loss(
    scores: Tensor,
    positives: Tensor,
    *,
    ignore_index: int = -1,
    reduction: str = "mean",
    threshold: float | Tensor = 0.0,
    weight: Tensor | None = None,
) -> Tensor:
    """Hard ZLPR loss from positive class indices, never building a dense label tensor.

    ``positives`` has shape ``(..., k)`` (integer class indices in ``[0, n)``, padded with
    ``ignore_index``; duplicates count once). With ``a = lse([0, s])`` over all classes and
    ``b = lse(s_P)``, the negative term ``log(1 + sum_N e^{s_i})`` is ``a + log1p(-e^{b - a})``;
    rows where the positives hold more than half of the mass (where that subtraction would
    cancel) are recomputed exactly with the positives excluded, so the result stays accurate,
    finite and non-negative.
    """
    _check_scores(scores)
    if not isinstance(positives, Tensor):
        raise TypeError(f"positives must be a torch.Tensor, got {type(positives).__name__}")
    if positives.is_floating_point() or positives.is_complex() or positives.dtype == torch.bool:
        raise TypeError(
            f"positives must be an integer tensor of class indices, got dtype {positives.dtype}"
        )
    if positives.ndim != scores.ndim or positives.shape[:-1] != scores.shape[:-1]:
        raise ValueError(
            f"positives must have shape (..., k) with the leading dims of scores "
            f"{tuple(scores.shape[:-1])}, got {tuple(positives.shape)}"
        )
    check_reduction(reduction)
    weight = _check_weight(weight, scores.shape[:-1])
    n = scores.shape[-1]
    positives = positives.long()
    valid = positives != ignore_index
    if positives.numel() and ((positives[valid] < 0) | (positives[valid] >= n)).any():
        raise ValueError(
            f"positives must hold class indices in [0, {n}) or ignore_index={ignore_index}"
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
    ratio = torch.exp(b - a)
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
    return scores > threshold


class ZLPRLoss(nn.Module):
    """``nn.Module`` form of :func:`zlpr_loss`; ``forward(scores, targets, mask=None)``."""

    def __init__(
        self, *, threshold: float = 0.0, reduction: str = "mean", eps: float = 1e-7
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        self.threshold, self.reduction, self.eps = threshold, reduction, eps

    def forward(
        self,
        scores: Tensor,
        targets: Tensor,
        mask: Tensor | None = None,
        weight: Tensor | None = None,
    ) -> Tensor:
        return zlpr_loss(
            scores,
            targets,
            mask=mask,
            threshold=self.threshold,
            reduction=self.reduction,
            eps=self.eps,
            weight=weight,
        )

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, reduction={self.reduction!r}, eps={self.eps}"


class SparseZLPRLoss(nn.Module):
    """``nn.Module`` form of :func:`sparse_zlpr_loss`; ``forward(scores, positives)``."""

    def __init__(
        self, *, ignore_index: int = -1, reduction: str = "mean", threshold: float = 0.0
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        self.ignore_index, self.reduction, self.threshold = ignore_index, reduction, threshold

    def forward(self, scores: Tensor, positives: Tensor, weight: Tensor | None = None) -> Tensor:
        return sparse_zlpr_loss(
            scores,
            positives,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            threshold=self.threshold,
            weight=weight,
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
