"""Independent float64 reference of the ZLPR loss, written from ``docs/guides/losses.md``.

One row at a time, from explicit term lists:

    pos = [log t_i - z_i  for kept i unless t_i < eps (or t_i = 0)]
    neg = [log(1 - t_i) + z_i  for kept i unless t_i > 1 - eps (or t_i = 1)]
    L = lse([0] + pos) + lse([0] + neg)

with ``z = s - s0`` and ``kept`` = mask True and ``s_i != -inf``. Only ``math`` (and
torch to read tensors) is used; nothing from kexue's losses.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kexue.testing.logsumexp import lse_terms

__all__ = ["EPS", "zlpr_grad_ref", "zlpr_ref", "zlpr_target_grad_ref"]

EPS = 1e-7


def _rows(scores, target, mask, threshold) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    s = scores.detach().double()
    t = target.detach().double()
    keep = torch.ones(s.shape, dtype=torch.bool) if mask is None else mask.expand(s.shape)
    s0 = torch.as_tensor(threshold, dtype=torch.float64).expand(s.shape)
    n = s.shape[-1]
    return (
        s.reshape(-1, n).tolist(),
        t.reshape(-1, n).tolist(),
        keep.reshape(-1, n).tolist(),
        s0.reshape(-1, n).tolist(),
    )


def _terms(s_row, t_row, k_row, s0_row, eps):
    """Per class: (z, log t or None, log(1 - t) or None); None = no term / class dropped."""
    out: list[tuple[float, float | None, float | None] | None] = []
    for s, t, k, s0 in zip(s_row, t_row, k_row, s0_row, strict=True):
        if not k or s == -math.inf:
            out.append(None)
            continue
        z = s - s0
        lp = math.log(t) if t >= eps and t > 0 else None
        ln = math.log1p(-t) if t <= 1.0 - eps and t < 1 else None
        out.append((z, lp, ln))
    return out


def _row_parts(terms):
    """``(lse([0] + pos), lse([0] + neg))`` of one row."""
    pos, neg = [0.0], [0.0]
    for c in terms:
        if c is None:
            continue
        z, lp, ln = c
        if lp is not None:
            pos.append(lp - z)
        if ln is not None:
            neg.append(ln + z)
    return lse_terms(pos), lse_terms(neg)


def zlpr_ref(scores, target, mask=None, threshold=0.0, eps=EPS) -> torch.Tensor:
    """Per-row loss, float64, shape ``scores.shape[:-1]``."""
    out = []
    for row in zip(*_rows(scores, target, mask, threshold), strict=True):
        l_pos, l_neg = _row_parts(_terms(*row, eps))
        out.append(l_pos + l_neg)
    return torch.tensor(out, dtype=torch.float64).reshape(scores.shape[:-1])


def _per_class(scores, target, mask, threshold, eps, value) -> torch.Tensor:
    """``value(z, log t, log(1 - t), l_pos, l_neg)`` for every kept class; 0 for dropped ones."""
    out = []
    for row in zip(*_rows(scores, target, mask, threshold), strict=True):
        terms = _terms(*row, eps)
        l_pos, l_neg = _row_parts(terms)
        out.append([0.0 if c is None else value(*c, l_pos, l_neg) for c in terms])
    return torch.tensor(out, dtype=torch.float64).reshape(scores.shape)


def zlpr_grad_ref(scores, target, mask=None, threshold=0.0, eps=EPS) -> torch.Tensor:
    """dL/ds (per-row loss summed), float64: softmax weights of the two term lists."""

    def grad(z, lp, ln, l_pos, l_neg):
        g = math.exp(ln + z - l_neg) if ln is not None else 0.0
        return g - (math.exp(lp - z - l_pos) if lp is not None else 0.0)

    return _per_class(scores, target, mask, threshold, eps, grad)


def zlpr_target_grad_ref(scores, target, mask=None, threshold=0.0, eps=EPS) -> torch.Tensor:
    """dL/dt (per-row loss summed) for targets strictly inside (eps, 1 - eps), float64."""

    def grad(z, lp, ln, l_pos, l_neg):
        return math.exp(-z - l_pos) - math.exp(z - l_neg)

    return _per_class(scores, target, mask, threshold, eps, grad)
