"""Perturbed-argmax maps from the distribution of the maximum: ``O(M n)`` per row.

``docs/guides/distributions.md``, "Over the value of the maximum". With ``Y = max_j (mu_j +
eps_j)``, its CDF ``P(y) = prod_j Phi(y - mu_j)`` and the reverse hazard ``h = phi / Phi``,

    p_i = integral h(y - mu_i) P(y) dy,

and ``sum_i h(y - mu_i) P(y) = P'(y)`` is the density of ``Y``. On one grid of ``M`` nodes
``y_k`` (weights ``w_k``) shared by all classes,

    log m_i = logsumexp_k (log w_k + log P(y_k) + log h(y_k - mu_i)),
    log P(y_k) = sum_j log Phi(y_k - mu_j),

which costs ``O(M n)`` per row instead of the ``O(K n^2)`` of the pairwise form. The grid spans
a window where ``P`` rises from ``delta_lo`` to ``1 - delta_hi``, found from the sorted scores
without evaluating ``P`` (bounds below); outside it the integrands hold less than
``delta_lo + delta_hi`` of probability in all.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kexue.distributions.noise import NoiseFamily
from kexue.ops import exp_flush_

__all__ = ["MAXIMUM_RULES", "maximum_log_mass", "maximum_nodes", "maximum_window"]

MAXIMUM_RULES = ("trapezoid", "split-gauss-legendre")
# (log delta_lo, delta_hi): log P at the window's lower end, the tail mass above its upper end.
_WINDOW = {torch.float64: (-45.0, 1e-11), torch.float32: (-36.0, 1e-8)}
_GL_ORDER = 4  # nodes per cell of the split Gauss–Legendre rule
_KINKS = 24  # at most this many of the largest scores split cells (P(mu_(k)) <= 2^{1-k})
_KINK_LOG_P = -32.0  # a kink where log P is below this moves the integral by < 1e-14
# Elements of the (rows, M, n) blocks evaluated at once: on CPUs the block stays in L2 cache.
BLOCK_ELEMENTS = 1 << 18
BLOCK_ELEMENTS_ACCELERATOR = 1 << 25


def _levels(n: int) -> list[int]:
    """The class counts ``k`` of the window bounds: powers of two up to ``n``, and ``n``."""
    return sorted({1 << i for i in range(n.bit_length()) if 1 << i <= n} | {n})


def _quantiles(family: NoiseFamily, lower: np.ndarray, upper: np.ndarray) -> tuple[Tensor, ...]:
    """``Phi^{-1}(lower)`` and the upper-tail quantiles ``Phi^{-1}(1 - upper)`` in float64."""
    low = torch.from_numpy(lower)
    up = torch.from_numpy(upper)
    small = low <= 0.5
    q_low = torch.where(small, family.icdf(low.where(small, 0.5)), family.isf((1 - low).clamp(0)))
    return q_low, family.isf(up)


def maximum_window(sorted_mu: Tensor, family: NoiseFamily) -> tuple[Tensor, Tensor]:
    """``(y_lo, y_hi)`` per row for scores sorted in decreasing order, ``(rows, n)``.

    Lower end: ``P(y) <= Phi(y - s_k)^k`` for the ``k``-th largest score ``s_k``, so
    ``y_lo = max_k (s_k + Phi^{-1}(delta_lo^{1/k}))`` has ``P(y_lo) <= delta_lo``. Upper end:
    ``1 - P(y) <= sum_j (1 - Phi(y - mu_j)) <= k (1 - Phi(y - s_1)) + (n - k) (1 - Phi(y -
    s_{k+1}))``, so the least of these bounds over ``k`` reaching ``delta_hi`` is ``y_hi``.
    Differentiable in the scores (a max and a min of shifted scores).
    """
    n = sorted_mu.shape[-1]
    log_lo, hi = _WINDOW.get(sorted_mu.dtype, _WINDOW[torch.float32])
    ks = _levels(n)
    idx = torch.tensor([k - 1 for k in ks], device=sorted_mu.device)
    q_lo, q_hi = _window_quantiles(family, n, log_lo, hi)
    q_lo, q_hi = q_lo.to(sorted_mu), q_hi.to(sorted_mu)
    y_lo = (sorted_mu.index_select(-1, idx) + q_lo).amax(-1)
    top = sorted_mu[..., :1]
    split = [k for k in ks if k < n]
    y_hi = top[..., 0] + q_hi[-1]  # k = n: n (1 - Phi(y - s_1)) <= delta_hi
    if split:
        rest = sorted_mu.index_select(-1, torch.tensor(split, device=sorted_mu.device))
        bound = torch.maximum(top + q_hi[: len(split)], rest + q_hi[len(split) : -1])
        y_hi = torch.minimum(y_hi, bound.amin(-1))
    return y_lo, torch.maximum(y_hi, y_lo + 1e-3)


@lru_cache(maxsize=256)
def _window_quantiles_cached(family: NoiseFamily, n: int, log_lo: float, hi: float):
    ks = np.array(_levels(n), dtype=np.float64)
    lower = np.exp(log_lo / ks)
    split = ks[ks < n]
    upper = np.concatenate([hi / (2 * split), hi / (2 * (n - split)), [hi / n]])
    return _quantiles(family, lower, upper)


def _window_quantiles(family: NoiseFamily, n: int, log_lo: float, hi: float):
    try:
        return _window_quantiles_cached(family, n, log_lo, hi)
    except TypeError:  # an unhashable family
        return _window_quantiles_cached.__wrapped__(family, n, log_lo, hi)


@lru_cache(maxsize=64)
def _gauss_legendre(order: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(order)
    return (1.0 + x) / 2.0, w / 2.0


def _kinks(sorted_mu: Tensor, y_lo: Tensor, y_hi: Tensor, family: NoiseFamily) -> Tensor:
    """The largest scores where the density's kink matters (``log P(s_k) > -32``), else
    ``y_lo`` (an empty cell): ``(rows, min(n, 24))``."""
    top = sorted_mu[..., :_KINKS]
    with torch.no_grad():
        args = top[..., :, None] - sorted_mu[..., None, :]
        log_p = family.kernel_log_cdf_(args).sum(-1)
        keep = (log_p > _KINK_LOG_P) & (top > y_lo[..., None]) & (top < y_hi[..., None])
    return torch.where(keep, top, y_lo[..., None])


def maximum_nodes(
    sorted_mu: Tensor, family: NoiseFamily, num_nodes: int, rule: str
) -> tuple[Tensor, Tensor]:
    """Nodes ``y`` and log-weights ``log w`` per row, ``(rows, M)``, on the window.

    ``"trapezoid"``: ``num_nodes`` equally spaced nodes (the integrand and its derivatives
    vanish at both ends, so the error falls exponentially for smooth densities).
    ``"split-gauss-legendre"``: ``ceil(num_nodes / 4)`` equal cells, split further at the
    largest scores where the density has a kink (Laplace), 4 Gauss–Legendre nodes per cell.
    """
    y_lo, y_hi = maximum_window(sorted_mu, family)
    width = y_hi - y_lo
    dtype, device = sorted_mu.dtype, sorted_mu.device
    if rule == "trapezoid":
        t = torch.linspace(0.0, 1.0, num_nodes, dtype=torch.float64)
        w = torch.full((num_nodes,), 1.0 / (num_nodes - 1), dtype=torch.float64)
        w[[0, -1]] /= 2.0
        y = y_lo[..., None] + width[..., None] * t.to(dtype=dtype, device=device)
        return y, width.log()[..., None] + w.log().to(dtype=dtype, device=device)
    cells = math.ceil(num_nodes / _GL_ORDER)
    grid = torch.linspace(0.0, 1.0, cells + 1, dtype=dtype, device=device)
    edges = [y_lo[..., None] + width[..., None] * grid]
    if family.grid_kinks:
        edges.append(_kinks(sorted_mu, y_lo, y_hi, family))
    edges = torch.cat(edges, -1).sort(-1).values
    lo, size = edges[..., :-1, None], (edges[..., 1:] - edges[..., :-1])[..., None]
    t, w = (torch.from_numpy(a).to(dtype=dtype, device=device) for a in _gauss_legendre(_GL_ORDER))
    y = (lo + size * t).flatten(-2)
    # empty cells: weight ~0 with no gradient (clamp_min passes none below its bound)
    log_w = (size.clamp_min(torch.finfo(dtype).tiny).log() + w.log()).flatten(-2)
    return y, log_w


def _block_rows(rows: int, m: int, n: int, device: torch.device) -> int:
    budget = BLOCK_ELEMENTS if device.type == "cpu" else BLOCK_ELEMENTS_ACCELERATOR
    return max(1, min(rows, budget // max(1, m * n)))


class _MaximumLogMass(torch.autograd.Function):
    """``log m_i`` for rows of centred scores ``mu`` ``(B, n)`` on nodes ``y`` ``(B, M)``.

    Saves the node posteriors ``pi_ki = w_k P(y_k) h(y_k - mu_i) / m_i`` and the log-integrands
    (``O(M n)`` per row). With ``G`` the incoming gradient, ``c_k = sum_i G_i pi_ki``,
    ``h_kl = h(y_k - mu_l)`` and ``d_kl = (log h)'(y_k - mu_l)``:

        dL/dmu_l = -sum_k c_k h_kl - G_l sum_k pi_kl d_kl,
        dL/dy_k = sum_i G_i pi_ki d_ki + c_k sum_j h_kj,     dL/dlog w_k = c_k.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, y: Tensor, log_w: Tensor, family: NoiseFamily) -> Tensor:
        rows, n = mu.shape
        m = y.shape[-1]
        out = mu.new_empty(rows, n)
        keep = any(ctx.needs_input_grad[:3])
        post = mu.new_empty(rows, m, n) if keep else None
        log_h = mu.new_empty(rows, m, n) if keep else None
        step = _block_rows(rows, m, n, mu.device)
        for r0 in range(0, rows, step):
            r = slice(r0, min(rows, r0 + step))
            x = y[r, :, None] - mu[r, None, :]  # (b, M, n)
            log_cdf = family.kernel_log_cdf_(x.clone())
            g = family.kernel_log_hazard_(x, log_cdf)  # log h
            if keep:
                log_h[r] = g
            g.add_(log_cdf.sum(-1, keepdim=True).add_(log_w[r, :, None]))  # + log w P(y_k)
            top = g.amax(1, keepdim=True)
            top.masked_fill_(~torch.isfinite(top), 0.0)
            e = exp_flush_(g.sub_(top))
            total = e.sum(1, keepdim=True)
            out[r] = (total.log() + top).squeeze(1)
            if keep:
                post[r] = e.div_(total.where(total > 0, 1.0))
        ctx.family = family
        if keep:
            ctx.save_for_backward(mu, y, post, log_h)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        mu, y, post, log_h = ctx.saved_tensors
        rows, n = mu.shape
        m = y.shape[-1]
        g_mu, g_y, g_w = torch.empty_like(mu), torch.empty_like(y), torch.empty_like(y)
        step = _block_rows(rows, m, n, mu.device)
        for r0 in range(0, rows, step):
            r = slice(r0, min(rows, r0 + step))
            pi, gr = post[r], grad[r]
            c = torch.bmm(pi, gr[..., None])  # (b, M, 1)
            h = log_h[r].exp()  # h(y_k - mu_l)
            hazard_sum = h.sum(-1)
            d = ctx.family.kernel_dlog_hazard_(y[r, :, None] - mu[r, None, :], h)
            pd = d.mul_(pi)  # pi_kl d_kl
            g_mu[r] = torch.bmm(c.transpose(1, 2), h).squeeze(1).neg_()
            g_mu[r] -= pd.sum(1) * gr
            g_y[r] = torch.bmm(pd, gr[..., None]).squeeze(-1) + c.squeeze(-1) * hazard_sum
            g_w[r] = c.squeeze(-1)
        return g_mu, g_y, g_w, None


def maximum_log_mass(centred: Tensor, family: NoiseFamily, num_nodes: int, rule: str) -> Tensor:
    """``log m_i`` (unnormalised ``log p_i``) of rows of scores ``(B, n)`` by the form over the
    maximum; differentiable in the scores, the nodes included (they move with the scores)."""
    sorted_mu = centred.sort(-1, descending=True).values
    y, log_w = maximum_nodes(sorted_mu, family, num_nodes, rule)
    return _MaximumLogMass.apply(centred, y, log_w, family)
