"""Perturbed-argmax maps by the pairwise form: ``O(K n^2)`` per row (the cross-check path).

``docs/guides/distributions.md``, "Over the noise of the winner". With nodes ``u_k`` and
weights ``w_k`` of a rule on ``(0, 1)`` and ``e_k = Phi^{-1}(u_k)``,

    log m_i = logsumexp_k (log w_k + sum_{j != i} log Phi(mu_i - mu_j + e_k)).

Every node contributes a product that is monotone in ``mu_i`` and depends on differences only,
so the map keeps properties 1-4 exactly at any ``K``. Bounded noise (uniform) gives exact zeros.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kexue.distributions.noise import NoiseFamily
from kexue.distributions.quadrature import quadrature_rule
from kexue.ops import exp_flush_

__all__ = ["BLOCK_ELEMENTS", "pairwise_blocks", "pairwise_log_mass"]

# Elements of the (rows, classes, K, n) block evaluated at once: on CPUs the working set stays
# in L2 cache; accelerators get larger blocks (fewer kernel launches). Memory stays O(K n) per
# row, never batch x n x n x K.
BLOCK_ELEMENTS = 1 << 17
BLOCK_ELEMENTS_ACCELERATOR = 1 << 24


def _budget(device: torch.device, n: int, k: int) -> int:
    return max(BLOCK_ELEMENTS if device.type == "cpu" else BLOCK_ELEMENTS_ACCELERATOR, n * k)


def pairwise_blocks(rows: int, n: int, k: int, budget: int):
    """``(row slice, class slice)`` pairs covering ``rows x n`` with blocks of <= ``budget``
    elements of ``(r, c, K, n)`` (at least one row and one class)."""
    per_row = n * n * k
    if per_row <= budget:
        step = max(1, budget // per_row)
        for r0 in range(0, rows, step):
            yield slice(r0, min(rows, r0 + step)), slice(0, n)
        return
    step = max(1, budget // (n * k))
    for r0 in range(rows):
        for c0 in range(0, n, step):
            yield slice(r0, r0 + 1), slice(c0, min(n, c0 + step))


def _arguments(mu: Tensor, e: Tensor, rows: slice, cols: slice, buf: Tensor) -> Tensor:
    """``x[r, c, k, j] = mu_i + e_k - mu_j`` for rows ``rows`` and classes ``i`` in ``cols``."""
    m = mu[rows]
    t = m[:, cols, None] + e  # (r, c, K)
    shape = (m.shape[0], t.shape[1], e.numel(), m.shape[1])
    out = buf[: math.prod(shape)].view(shape)
    return torch.sub(t[..., None], m[:, None, None, :], out=out)


def _outside_support(mu: Tensor, e: Tensor, rows: slice, cols: slice, lower: float) -> Tensor:
    """``(r, c, K)`` mask of the nodes where some ``x[r, c, k, j]`` (``j != i``) is at or below
    the support's lower end, so the product has a zero factor (same rounding as
    :func:`_arguments`)."""
    m = mu[rows]
    top = m.topk(min(2, m.shape[1]), dim=-1)
    first = top.values[:, :1]
    second = top.values[:, 1:2] if m.shape[1] > 1 else torch.full_like(first, -math.inf)
    index = torch.arange(cols.start, cols.stop, device=mu.device)
    rival = torch.where(index == top.indices[:, :1], second, first)  # max_{j != i} mu_j
    return (m[:, cols, None] + e) - rival[..., None] <= lower


def _drop_diagonal_(terms: Tensor, cols: slice) -> Tensor:
    """Zero the ``j = i`` terms of ``terms[r, c, k, j]`` (the product runs over ``j != i``)."""
    terms[..., cols].diagonal(dim1=1, dim2=3).zero_()
    return terms


class _LogMass(torch.autograd.Function):
    """``log m_i`` (unnormalised) for rows of centred scores ``mu`` of shape ``(B, n)``.

    Saves the node posteriors ``a_ik = w_k prod_j Phi(.) / m_i`` (O(K n) per row); the backward
    recomputes each block's arguments and uses ``d log m_i / d mu_l = sum_k a_ik sum_{j != i}
    (log Phi)'(x_ijk) (delta_il - delta_jl)``.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, e: Tensor, log_w: Tensor, family: NoiseFamily) -> Tensor:
        rows, n = mu.shape
        k = e.numel()
        out = mu.new_empty(rows, n)
        keep = ctx.needs_input_grad[0]
        post = mu.new_empty(rows, n, k) if keep else None
        budget = _budget(mu.device, n, k)
        buf = mu.new_empty(min(budget, rows * n * n * k))
        for r, c in pairwise_blocks(rows, n, k, budget):
            terms = family.kernel_log_cdf_(_arguments(mu, e, r, c, buf))
            log_f = _drop_diagonal_(terms, c).sum(-1).add_(log_w)  # (r, c, K)
            if family.support_lower > -math.inf:
                log_f.masked_fill_(_outside_support(mu, e, r, c, family.support_lower), -math.inf)
            top = log_f.amax(-1, keepdim=True)
            top.masked_fill_(~torch.isfinite(top), 0.0)
            weights = exp_flush_(log_f.sub_(top))
            total = weights.sum(-1, keepdim=True)
            out[r, c] = (total.log() + top).squeeze(-1)
            if keep:
                cast(Tensor, post)[r, c] = weights.div_(total.where(total > 0, 1.0))  # kept
        ctx.family = family
        if keep:
            ctx.save_for_backward(mu, e, post)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        mu, e, post = ctx.saved_tensors
        rows, n = mu.shape
        k = e.numel()
        scaled = post * grad[..., None]  # (B, n, K)
        out = torch.zeros_like(mu)
        budget = _budget(mu.device, n, k)
        buf = mu.new_empty(min(budget, rows * n * n * k))
        for r, c in pairwise_blocks(rows, n, k, budget):
            slopes = ctx.family.kernel_dlog_cdf_(_arguments(mu, e, r, c, buf))
            slopes = _drop_diagonal_(slopes, c)
            pair = torch.matmul(scaled[r, c][..., None, :], slopes).squeeze(-2)  # (r, c, n)
            out[r, c] += pair.sum(-1)
            out[r] -= pair.sum(1)
        return out, None, None, None


def pairwise_log_mass(centred: Tensor, family: NoiseFamily, num_nodes: int, rule: str) -> Tensor:
    """``log m_i`` (unnormalised ``log p_i``) of rows of scores ``(B, n)`` by the pairwise form
    with a ``num_nodes``-point ``rule`` on ``u``; differentiable in the scores."""
    nodes = quadrature_rule(rule, num_nodes)
    u, v, w = (torch.tensor(a, device=centred.device) for a in nodes)
    e = family.quantile_nodes(u, v).to(centred.dtype)
    return _LogMass.apply(centred, e, w.log().to(centred.dtype), family)
