"""Float64 references for ``kexue.ops``: logsumexp of explicit term lists, Rényi entropies.

Written from the formulas of ``docs/guides/ops.md`` with ``math.fsum`` (exactly rounded sums);
nothing from kexue is used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

__all__ = ["lse_rows", "lse_terms", "renyi_entropy_ref", "weighted_sum_ref"]


def lse_terms(terms: Iterable[float]) -> float:
    """``log sum_i exp(t_i)`` of explicit floats, ``-inf`` entries dropped (``-inf`` if none)."""
    finite = [float(v) for v in terms if v != -math.inf]
    if not finite:
        return -math.inf
    m = max(finite)
    if m == math.inf:
        return math.inf
    return m + math.log(math.fsum(math.exp(v - m) for v in finite))


def lse_rows(
    x: torch.Tensor, mask: torch.Tensor | None = None, *, implicit_zero: bool = False
) -> list[float]:
    """Per row of 2-D ``x`` (last dim reduced): lse of the kept entries, plus a ``0`` term with
    ``implicit_zero``."""
    keep = torch.ones(x.shape, dtype=torch.bool) if mask is None else mask.expand(x.shape)
    out = []
    for row, kept in zip(x.double().tolist(), keep.tolist(), strict=True):
        terms: list[float] = [v for v, k in zip(row, kept, strict=True) if k]
        out.append(lse_terms(([0.0] if implicit_zero else []) + terms))
    return out


def weighted_sum_ref(x: np.ndarray, p: np.ndarray) -> float:
    """``sum_i p_i x_i`` over the entries with ``p_i > 0`` (exactly rounded)."""
    nz = p > 0
    return math.fsum(p[nz] * x[nz])


def renyi_entropy_ref(p: Sequence[float] | np.ndarray, order: float) -> float:
    """Rényi entropy ``log(sum_i p_i^t) / (1 - t)`` of a probability vector; Shannon at
    ``t = 1``, ``-log max p`` at ``t = inf``; zero entries dropped."""
    q = np.asarray(p, dtype=np.float64)
    q = q[q > 0]
    if order == 1.0:
        return -math.fsum(q * np.log(q))
    if math.isinf(order):
        return -math.log(float(np.max(q)))
    return -math.log(math.fsum(q**order)) / (order - 1.0)
