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

__all__ = ["MAXIMUM_RULES", "default_nodes", "maximum_log_mass", "maximum_nodes", "maximum_window"]

MAXIMUM_RULES = ("trapezoid", "split-gauss-legendre")
# (log delta_lo, delta_hi): log P at the window's lower end, the tail mass above its upper end.
_WINDOW = {torch.float64: (-45.0, 1e-11), torch.float32: (-36.0, 1e-8)}
_GL_ORDER = 4  # nodes per cell of the split Gauss–Legendre rule
_KNOWN = 65  # the largest scores that the window's bounds use (powers of two up to 64)
_KINKS = 24  # at most this many of the largest scores split cells (P(mu_(k)) <= 2^{1-k})
_KINK_LOG_P = -32.0  # a kink where log P is below this moves the integral by < 1e-14
# Elements of the (rows, M, n) blocks evaluated at once: on CPUs the block stays in L2 cache.
BLOCK_ELEMENTS = 1 << 18
BLOCK_ELEMENTS_ACCELERATOR = 1 << 25


def _levels(n: int, known: int) -> tuple[list[int], list[int]]:
    """Class counts ``k`` of the window bounds with the ``known`` largest scores at hand:
    lower end, powers of two up to ``known`` and ``n`` (the smallest score); upper end, powers
    of two ``k < n`` with ``s_{k+1}`` known."""
    powers = [1 << i for i in range(n.bit_length()) if 1 << i <= min(n, known)]
    return sorted({*powers, n}), [k for k in powers if k < min(n, known)]


def _quantiles(family: NoiseFamily, lower: np.ndarray, upper: np.ndarray) -> tuple[Tensor, ...]:
    """``Phi^{-1}(lower)`` and the upper-tail quantiles ``Phi^{-1}(1 - upper)`` in float64."""
    low = torch.from_numpy(lower)
    up = torch.from_numpy(upper)
    small = low <= 0.5
    q_low = torch.where(small, family.icdf(low.where(small, 0.5)), family.isf((1 - low).clamp(0)))
    return q_low, family.isf(up)


def maximum_window(
    top: Tensor, family: NoiseFamily, n: int | None = None, bottom: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(y_lo, y_hi)`` per row from the largest scores in decreasing order ``top`` ``(rows,
    k)`` of ``n`` classes (default ``k``) whose smallest score is ``bottom`` ``(rows, 1)``
    (default ``top[..., -1:]``).

    Lower end: ``P(y) <= Phi(y - s_k)^k`` for the ``k``-th largest score ``s_k``, so
    ``y_lo = max_k (s_k + Phi^{-1}(delta_lo^{1/k}))`` has ``P(y_lo) <= delta_lo``. Upper end:
    ``1 - P(y) <= sum_j (1 - Phi(y - mu_j)) <= k (1 - Phi(y - s_1)) + (n - k) (1 - Phi(y -
    s_{k+1}))``, so the least of these bounds over ``k`` reaching ``delta_hi`` is ``y_hi``.
    Any set of ``k`` gives valid bounds (more of them, a tighter window): powers of two among
    the known scores, and ``n``. Differentiable in the scores (a max and a min of shifted
    scores).
    """
    known = top.shape[-1]
    n = known if n is None else n
    bottom = top[..., -1:] if bottom is None else bottom
    log_lo, hi = _WINDOW.get(top.dtype, _WINDOW[torch.float32])
    lower, split = _levels(n, known)
    q_lo, q_hi = _window_quantiles(family, n, known, log_lo, hi)
    q_lo, q_hi = q_lo.to(top), q_hi.to(top)
    idx: list[int] | Tensor = [k - 1 for k in lower if k < n and k <= known]
    idx = torch.tensor(idx, dtype=torch.long, device=top.device)
    at_levels = torch.cat([top.index_select(-1, idx), bottom], -1)
    y_lo = (at_levels + q_lo).amax(-1)
    first = top[..., :1]
    y_hi = first[..., 0] + q_hi[-1]  # k = n: n (1 - Phi(y - s_1)) <= delta_hi
    if split:
        rest = top.index_select(-1, torch.tensor(split, device=top.device))
        bound = torch.maximum(first + q_hi[: len(split)], rest + q_hi[len(split) : -1])
        y_hi = torch.minimum(y_hi, bound.amin(-1))
    return y_lo, torch.maximum(y_hi, y_lo + 1e-3)


@lru_cache(maxsize=256)
def _window_quantiles_cached(family: NoiseFamily, n: int, known: int, log_lo: float, hi: float):
    lower_ks, split_ks = _levels(n, known)
    lower = np.exp(log_lo / np.array(lower_ks, dtype=np.float64))
    split = np.array(split_ks, dtype=np.float64)
    upper = np.concatenate([hi / (2 * split), hi / (2 * (n - split)), [hi / n]])
    return _quantiles(family, lower, upper)


def _window_quantiles(family: NoiseFamily, n: int, known: int, log_lo: float, hi: float):
    try:
        return _window_quantiles_cached(family, n, known, log_lo, hi)
    except TypeError:  # an unhashable family
        return _window_quantiles_cached.__wrapped__(family, n, known, log_lo, hi)


@lru_cache(maxsize=64)
def _gauss_legendre(order: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(order)
    return (1.0 + x) / 2.0, w / 2.0


def _kinks(mu: Tensor, top: Tensor, y_lo: Tensor, y_hi: Tensor, family: NoiseFamily) -> Tensor:
    """The largest scores (of ``top``, in decreasing order) where the density's kink matters
    (``log P(s_k) > -32``), else ``y_lo`` (an empty cell): ``(rows, min(n, 24))``."""
    top = top[..., :_KINKS]
    with torch.no_grad():
        args = top[..., :, None] - mu[..., None, :]
        log_p = family.kernel_log_cdf_(args).sum(-1)
        keep = (log_p > _KINK_LOG_P) & (top > y_lo[..., None]) & (top < y_hi[..., None])
    return torch.where(keep, top, y_lo[..., None])


def maximum_nodes(
    mu: Tensor, family: NoiseFamily, num_nodes: int, rule: str
) -> tuple[Tensor, Tensor]:
    """Nodes ``y`` and log-weights ``log w`` per row of scores ``mu`` ``(rows, n)``,
    ``(rows, M)``, on the window of :func:`maximum_window` (from the 65 largest scores and the
    smallest: a full sort costs more than the rest of the forward pass at n = 1,000).

    ``"trapezoid"``: ``num_nodes`` equally spaced nodes (the integrand and its derivatives
    vanish at both ends, so the error falls exponentially for smooth densities).
    ``"split-gauss-legendre"``: ``ceil(num_nodes / 4)`` equal cells, split further at the
    largest scores where the density has a kink (Laplace), 4 Gauss–Legendre nodes per cell.
    """
    n = mu.shape[-1]
    top = largest_scores(mu, min(n, _KNOWN))
    y_lo, y_hi = maximum_window(top, family, n, mu.amin(-1, keepdim=True))
    width = y_hi - y_lo
    dtype, device = mu.dtype, mu.device
    if rule == "trapezoid":
        t = torch.linspace(0.0, 1.0, num_nodes, dtype=torch.float64)
        w = torch.full((num_nodes,), 1.0 / (num_nodes - 1), dtype=torch.float64)
        w[[0, -1]] /= 2.0
        y = y_lo[..., None] + width[..., None] * t.to(dtype=dtype, device=device)
        return y, width.log()[..., None] + w.log().to(dtype=dtype, device=device)
    cells = math.ceil(num_nodes / _GL_ORDER)
    grid = torch.linspace(0.0, 1.0, cells + 1, dtype=dtype, device=device)
    edges: list[Tensor] | Tensor  # the pieces, then their sorted concatenation
    edges = [y_lo[..., None] + width[..., None] * grid]
    if family.grid_kinks:
        edges.append(_kinks(mu, top, y_lo, y_hi, family))
    edges = torch.cat(edges, -1).sort(-1).values
    lo, size = edges[..., :-1, None], (edges[..., 1:] - edges[..., :-1])[..., None]
    t, w = (torch.from_numpy(a).to(dtype=dtype, device=device) for a in _gauss_legendre(_GL_ORDER))
    y = (lo + size * t).flatten(-2)
    # empty cells: weight ~0 with no gradient (clamp_min passes none below its bound)
    log_w = (size.clamp_min(torch.finfo(dtype).tiny).log() + w.log()).flatten(-2)
    return y, log_w


def largest_scores(mu: Tensor, k: int) -> Tensor:
    """The ``k`` largest scores of each row of ``mu`` ``(rows, n)`` in decreasing order,
    differentiable (``mu.topk(k).values``). On CPU the indices come from numpy's partial
    partition and a sort of the ``k`` survivors: ``torch.topk`` sorts its result about 5x
    slower at n = 100 to 1,000, more than the rest of the forward pass."""
    n = mu.shape[-1]
    if mu.device.type != "cpu" or mu.dtype not in (torch.float32, torch.float64):
        return mu.topk(k, -1).values
    a = mu.detach().numpy()
    part = np.argpartition(a, n - k, axis=-1)[..., n - k :] if k < n else np.indices(a.shape)[-1]
    order = np.argsort(-np.take_along_axis(a, part, -1), axis=-1)
    index = torch.from_numpy(np.take_along_axis(part, order, -1))
    return mu.gather(-1, index)


def _block_rows(rows: int, m: int, n: int, device: torch.device) -> int:
    budget = BLOCK_ELEMENTS if device.type == "cpu" else BLOCK_ELEMENTS_ACCELERATOR
    return max(1, min(rows, budget // max(1, m * n)))


def default_nodes(family: NoiseFamily, dtype: torch.dtype) -> int:
    """The family's default number of nodes for ``dtype`` (``family.grid_nodes``)."""
    wide, single = family.grid_nodes
    return wide if dtype == torch.float64 else single


class _MaximumLogMass(torch.autograd.Function):
    """``log m_i`` for rows of centred scores ``mu`` ``(B, n)`` on fixed nodes ``y`` ``(B, M)``
    with log-weights ``log_w``.

    Saves the node posteriors ``pi_ki = w_k P(y_k) h(y_k - mu_i) / m_i`` and ``log h(y_k -
    mu_i)`` (``O(M n)`` per row), each computed in place in its saved buffer (no copies).
    With ``G`` the incoming gradient, ``c_k = sum_i G_i pi_ki``, ``h_kl = h(y_k - mu_l)`` and
    ``d_kl = (log h)'(y_k - mu_l)``,

        dL/dmu_l = -sum_k c_k h_kl - G_l sum_k pi_kl d_kl,

    the derivative of the integrand taken under the integral, on the same nodes, then
    projected onto the vectors that sum to zero (where the exact gradient lies, ``p`` being
    unchanged by ``mu + c``). The exact ``p`` does not depend on where the nodes lie, so they
    carry no gradient.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, y: Tensor, log_w: Tensor, family: NoiseFamily) -> Tensor:
        rows, n = mu.shape
        m = y.shape[-1]
        out = mu.new_empty(rows, n)
        keep = ctx.needs_input_grad[0]
        step = _block_rows(rows, m, n, mu.device)
        post = mu.new_empty(rows if keep else step, m, n)
        log_h = mu.new_empty(rows if keep else step, m, n)
        scratch = mu.new_empty(step, m, n)
        for r0 in range(0, rows, step):
            r = slice(r0, min(rows, r0 + step))
            b = r.stop - r.start
            x = torch.sub(y[r, :, None], mu[r, None, :], out=log_h[r] if keep else log_h[:b])
            log_cdf = family.kernel_log_cdf_(scratch[:b].copy_(x))
            g = family.kernel_log_hazard_(x, log_cdf)  # log h, in place
            log_pw = log_cdf.sum(-1, keepdim=True).add_(log_w[r, :, None])  # log w_k P(y_k)
            g = torch.add(g, log_pw, out=post[r] if keep else post[:b])
            top = g.amax(1, keepdim=True)
            top.masked_fill_(~torch.isfinite(top), 0.0)
            e = exp_flush_(g.sub_(top))
            total = e.sum(1, keepdim=True)
            out[r] = (total.log() + top).squeeze(1)
            if keep:
                e.div_(total.where(total > 0, 1.0))
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
        g_mu = torch.empty_like(mu)
        step = _block_rows(rows, m, n, mu.device)
        h_buf, d_buf = mu.new_empty(step, m, n), mu.new_empty(step, m, n)
        for r0 in range(0, rows, step):
            r = slice(r0, min(rows, r0 + step))
            b = r.stop - r.start
            pi, gr = post[r], grad[r, :, None]
            c = torch.bmm(pi, gr)  # (b, M, 1)
            x = torch.sub(y[r, :, None], mu[r, None, :], out=d_buf[:b])
            h = torch.exp(log_h[r], out=h_buf[:b])  # h(y_k - mu_l)
            pd = ctx.family.kernel_dlog_hazard_(x, h).mul_(pi)  # pi_kl d_kl
            # sum_k c_k h_kl as (1, M) @ (M, n), written into g_mu's rows (contiguous)
            torch.bmm(c.transpose(1, 2), h, out=g_mu[r, None, :]).neg_()
            g_mu[r] -= pd.sum(1) * grad[r]
        # The exact map is unchanged by mu + c, so its exact gradient sums to 0 over the
        # classes; projecting onto that subspace can only bring the quadrature's closer to it.
        g_mu -= g_mu.mean(-1, keepdim=True)
        return g_mu, None, None, None


def maximum_log_mass(
    centred: Tensor, family: NoiseFamily, num_nodes: int | None, rule: str
) -> Tensor:
    """``log m_i`` (unnormalised ``log p_i``) of rows of scores ``(B, n)`` by the form over the
    maximum with ``num_nodes`` nodes (``None``: :func:`default_nodes`); differentiable in the
    scores (the nodes, placed from the scores, are held fixed: see :class:`_MaximumLogMass`)."""
    with torch.no_grad():
        y, log_w = maximum_nodes(
            centred, family, num_nodes or default_nodes(family, centred.dtype), rule
        )
    return _MaximumLogMass.apply(centred, y, log_w, family)
