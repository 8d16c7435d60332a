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
import threading
from collections.abc import Callable
from functools import lru_cache
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kexue.distributions.noise import ERFC_RANGE, NoiseFamily, NormalNoise
from kexue.native import kernels
from kexue.ops import exp_flush_

__all__ = [
    "MAXIMUM_RULES",
    "default_nodes",
    "maximum_cross_entropy",
    "maximum_log_mass",
    "maximum_nodes",
    "maximum_window",
]

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


ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)


class _ArrayOps(NamedTuple):
    cat: Callable[..., Any]
    amax: Callable[..., Any]
    amin: Callable[..., Any]
    maximum: Callable[..., Any]
    minimum: Callable[..., Any]


_TORCH = _ArrayOps(torch.cat, torch.amax, torch.amin, torch.maximum, torch.minimum)
_NUMPY = _ArrayOps(np.concatenate, np.max, np.min, np.maximum, np.minimum)


def maximum_window(
    top: ArrayT, family: NoiseFamily, n: int | None = None, bottom: ArrayT | None = None
) -> tuple[ArrayT, ArrayT]:
    """``(y_lo, y_hi)`` per row from the largest scores in decreasing order ``top`` ``(rows,
    k)`` of ``n`` classes (default ``k``) whose smallest score is ``bottom`` ``(rows, 1)``
    (default ``top[..., -1:]``); torch tensors or numpy arrays (on CPU the nodes are placed in
    numpy: a dozen tiny torch operations cost more than the arithmetic).

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
    wide = top.dtype in (torch.float64, np.float64)
    idx, split, quantiles_lo, quantiles_hi = _cached(_window_constants, family, n, known, wide)
    q_lo: Any
    q_hi: Any
    if isinstance(top, np.ndarray):
        ops = _NUMPY
        q_lo, q_hi = quantiles_lo.astype(top.dtype), quantiles_hi.astype(top.dtype)
    else:
        ops = _TORCH
        q_lo, q_hi = _cached(_window_quantiles_on, family, n, known, top.dtype, top.device)
    y_lo = ops.amax(ops.cat([top[..., idx], bottom], -1) + q_lo, -1)
    first = top[..., :1]
    y_hi = first[..., 0] + q_hi[-1]  # k = n: n (1 - Phi(y - s_1)) <= delta_hi
    if split:
        rest = top[..., split]
        bound = ops.maximum(first + q_hi[: len(split)], rest + q_hi[len(split) : -1])
        y_hi = ops.minimum(y_hi, ops.amin(bound, -1))
    return y_lo, ops.maximum(y_hi, y_lo + 1e-3)


def _cached(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` through its ``lru_cache``, or computed afresh for an unhashable family (a
    subclass that defines ``__eq__`` alone)."""
    try:
        return fn(*args)
    except TypeError:
        return fn.__wrapped__(*args)


@lru_cache(maxsize=256)
def _window_constants(
    family: NoiseFamily, n: int, known: int, wide: bool
) -> tuple[list[int], list[int], np.ndarray, np.ndarray]:
    """Indices into ``top`` of the lower end's levels and the upper end's ``s_{k+1}``, and the
    quantiles (float64) of both ends: the window's constants for ``n`` classes (``wide``:
    float64 scores)."""
    log_lo, hi = _WINDOW[torch.float64 if wide else torch.float32]
    lower_ks, split_ks = _levels(n, known)
    lower = np.exp(log_lo / np.array(lower_ks, dtype=np.float64))
    split = np.array(split_ks, dtype=np.float64)
    upper = np.concatenate([hi / (2 * split), hi / (2 * (n - split)), [hi / n]])
    q_lo, q_hi = (q.numpy() for q in _quantiles(family, lower, upper))
    return [k - 1 for k in lower_ks if k < n and k <= known], split_ks, q_lo, q_hi


@lru_cache(maxsize=256)
def _window_quantiles_on(
    family: NoiseFamily, n: int, known: int, dtype: torch.dtype, device: torch.device
) -> list[Tensor]:
    """The window's quantiles as tensors, made once per ``dtype`` and ``device``."""
    quantiles = _window_constants(family, n, known, dtype == torch.float64)[2:]
    return [torch.from_numpy(q).to(dtype=dtype, device=device) for q in quantiles]


@lru_cache(maxsize=64)
def _trapezoid(num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions in [0, 1] and log-weights (float64) of the trapezoid rule with ``num_nodes``
    nodes."""
    w = np.full(num_nodes, 1.0 / (num_nodes - 1))
    w[[0, -1]] /= 2.0
    return np.linspace(0.0, 1.0, num_nodes), np.log(w)


@lru_cache(maxsize=64)
def _gauss_legendre(order: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(order)
    return (1.0 + x) / 2.0, w / 2.0


@lru_cache(maxsize=64)
def _rule_on(
    rule: Callable[[int], tuple[np.ndarray, np.ndarray]],
    size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[Tensor]:
    """Positions and weights of ``rule(size)`` as tensors, made once per ``dtype`` and
    ``device``."""
    return [torch.from_numpy(a).to(dtype=dtype, device=device) for a in rule(size)]


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
    mu: Tensor, family: NoiseFamily, num_nodes: int, rule: str, *, in_numpy: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Nodes ``y`` and log-weights ``log w`` per row of scores ``mu`` ``(rows, n)``,
    ``(rows, M)``, on the window of :func:`maximum_window` (from the 65 largest scores and the
    smallest: a full sort costs more than the rest of the forward pass at n = 1,000). No
    gradient flows through them.

    ``"trapezoid"``: ``num_nodes`` equally spaced nodes (the integrand and its derivatives
    vanish at both ends, so the error falls exponentially for smooth densities).
    ``"split-gauss-legendre"``: ``ceil(num_nodes / 4)`` equal cells, split further at the
    largest scores where the density has a kink (Laplace), 4 Gauss–Legendre nodes per cell.
    ``in_numpy`` (default: on CPU in float32/64) places the window in numpy, else in torch.
    """
    n = mu.shape[-1]
    k = min(n, _KNOWN)
    dtype, device = mu.dtype, mu.device
    if in_numpy is None:
        in_numpy = device.type == "cpu" and dtype in (torch.float32, torch.float64)
    if in_numpy:
        a = mu.detach().numpy()
        top_np = largest_scores(a, k)
        lo_np, hi_np = maximum_window(top_np, family, n, a.min(-1, keepdims=True))
        if rule == "trapezoid":
            t_np, lw_np = (c.astype(a.dtype) for c in _trapezoid(num_nodes))
            span = (hi_np - lo_np)[..., None]
            return torch.from_numpy(lo_np[..., None] + span * t_np), torch.from_numpy(
                np.log(span) + lw_np
            )
        top, y_lo, y_hi = (torch.from_numpy(v) for v in (top_np, lo_np, hi_np))
    else:
        top = mu.detach().topk(k, -1).values
        y_lo, y_hi = maximum_window(top, family, n, mu.amin(-1, keepdim=True))
        if rule == "trapezoid":
            t, log_w = _rule_on(_trapezoid, num_nodes, dtype, device)
            width = (y_hi - y_lo)[..., None]
            return torch.addcmul(y_lo[..., None], width, t), width.log() + log_w
    width = y_hi - y_lo
    cells = math.ceil(num_nodes / _GL_ORDER)
    grid = torch.linspace(0.0, 1.0, cells + 1, dtype=dtype, device=device)
    edges: list[Tensor] | Tensor  # the pieces, then their sorted concatenation
    edges = [y_lo[..., None] + width[..., None] * grid]
    if family.grid_kinks:
        edges.append(_kinks(mu, top, y_lo, y_hi, family))
    edges = torch.cat(edges, -1).sort(-1).values
    lo, size = edges[..., :-1, None], (edges[..., 1:] - edges[..., :-1])[..., None]
    t, w = _rule_on(_gauss_legendre, _GL_ORDER, dtype, device)
    y = (lo + size * t).flatten(-2)
    # empty cells: weight ~0 with no gradient (clamp_min passes none below its bound)
    log_w = (size.clamp_min(torch.finfo(dtype).tiny).log() + w.log()).flatten(-2)
    return y, log_w


def largest_scores(a: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest scores of each row of ``a`` ``(rows, n)`` in decreasing order, by
    numpy's partial partition and a sort of the ``k`` survivors: ``torch.topk`` takes about 5x
    longer on CPUs at n = 100 to 1,000 (``torch.sort`` 30x at 1,000), more than the rest of
    the forward pass."""
    n = a.shape[-1]
    top = np.partition(a, n - k, axis=-1)[..., n - k :] if k < n else a
    return np.sort(top, axis=-1)[..., ::-1].copy()


_workspace = threading.local()


def _scratch(like: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """A buffer of ``shape`` for values that do not outlive the call. On CPU one grow-only
    buffer per thread (at most a block, ~1 MB in float32): a fresh one each call would be
    paged in anew each time. Elsewhere the caching allocator does that already."""
    if like.device.type != "cpu":
        return like.new_empty(shape)
    size = math.prod(shape)
    buffers: dict[torch.dtype, Tensor] = _workspace.__dict__.setdefault("buffers", {})
    buf = buffers.get(like.dtype)
    if buf is None or buf.numel() < size:
        buf = buffers[like.dtype] = like.new_empty(size)
    return buf[:size].view(shape)


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

    The forward keeps, per row, the node terms ``e_ki = w_k P(y_k) h(y_k - mu_i) / s_i`` (each
    class scaled by its largest term ``s_i``, so that ``pi_ki = e_ki / sum_k e_ki`` are its
    node posteriors) and ``u`` with ``log h(y_k - mu_i) = c - u_ki``: ``O(M n)`` per row, each
    computed in place in its saved buffer. With the incoming gradient ``G``, ``C_k = sum_i
    G_i pi_ki``, ``h_kl = h(y_k - mu_l)`` and ``d_kl = (log h)'(y_k - mu_l) = (log phi)'(y_k -
    mu_l) - h_kl``,

        dL/dmu_l = -sum_k C_k h_kl - G_l sum_k pi_kl d_kl,

    the derivative of the integrand taken under the integral, on the same nodes, then
    projected onto the vectors that sum to zero (where the exact gradient lies, ``p`` being
    unchanged by ``mu + c``). Where ``(log phi)' = a x + b h + c`` (``family.log_density_slope``:
    normal, logistic, Gumbel), ``sum_k pi_kl d_kl`` needs no pass of its own over the nodes
    beyond ``sum_k pi_kl h_kl``: ``sum_k pi_kl x_kl = sum_k pi_kl y_k - mu_l`` is an ``(1, M)
    @ (M, n)`` product. The exact ``p`` does not depend on where the nodes lie, so they carry
    no gradient.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, y: Tensor, log_w: Tensor, family: NoiseFamily) -> Tensor:
        out, saved = _log_mass_forward(mu, y, log_w, family, ctx.needs_input_grad[0])
        ctx.family, ctx.shift = family, saved.shift
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(*saved.tensors)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        saved = _Saved(ctx.saved_tensors, ctx.shift, ctx.family)
        return _log_mass_backward(saved, grad), None, None, None


class _Saved(NamedTuple):
    # the map: mu, y, e, u, 1 / sum_k e (B, 1, n); the cross-entropy: mu, y, target, h',
    # W' / S', p, pi_t, x_t, log h_t, H'
    tensors: tuple[Tensor, ...]
    shift: float  # c of log h = c - u
    family: NoiseFamily


def _log_mass_forward(
    mu: Tensor, y: Tensor, log_w: Tensor, family: NoiseFamily, keep: bool
) -> tuple[Tensor, _Saved]:
    """``log m`` ``(B, n)`` and, if ``keep``, what the backward needs (:class:`_MaximumLogMass`)."""
    rows, n = mu.shape
    m = y.shape[-1]
    out = mu.new_empty(rows, n)
    step = _block_rows(rows, m, n, mu.device)
    terms = mu.new_empty(rows if keep else step, m, n)  # e_ki
    u_buf = mu.new_empty(rows if keep else step, m, n)  # u_ki
    scratch = _scratch(mu, (step, m, n))
    inv_total = mu.new_empty(rows, 1, n)
    # a lower bound on y_k - mu_i, from M + n numbers instead of M n
    x_min = float(y.amin()) - float(mu.amax()) if rows else 0.0
    shift = 0.0
    for r0 in range(0, rows, step):
        r = slice(r0, min(rows, r0 + step))
        b = r.stop - r.start
        x = torch.sub(y[r, :, None], mu[r, None, :], out=u_buf[r] if keep else u_buf[:b])
        log_cdf, u, shift = family.kernel_maximum_terms_(x, scratch[:b], x_min)
        if u.data_ptr() != x.data_ptr():
            u = x.copy_(u)
        # log(w_k P(y_k) h(y_k - mu_i)) = (log w_k + log P(y_k) + c) - u_ki
        log_pw = log_cdf.sum(-1, keepdim=True).add_(log_w[r, :, None]).add_(shift)
        g = torch.sub(log_pw, u, out=terms[r] if keep else terms[:b])
        top = g.amax(1, keepdim=True).nan_to_num_(neginf=0.0)  # -inf: a class without mass
        total = exp_flush_(g.sub_(top)).sum(1, keepdim=True)
        torch.add(total.log(), top, out=out[r, None, :])
        torch.reciprocal(total, out=inv_total[r]).nan_to_num_(posinf=0.0)  # 1 / 0 -> 0
    tensors = (mu, y, terms, u_buf, inv_total) if keep else ()
    return out, _Saved(tensors, shift, family)


def _log_mass_backward(saved: _Saved, grad: Tensor) -> Tensor:
    """The gradient in ``mu`` from the gradient ``grad`` ``(B, n)`` in ``log m``."""
    mu, y, terms, u_buf, inv_total = saved.tensors
    family = saved.family
    rows, m, n = terms.shape
    g_mu = torch.empty_like(mu)
    step = _block_rows(rows, m, n, mu.device)
    h_buf = _scratch(terms, (step, m, n))
    scale = math.exp(saved.shift)  # h = e^c exp(-u)
    weighted = grad[:, None, :] * inv_total  # G_i / sum_k e_ki, (B, 1, n)
    inv_scaled = inv_total * scale
    mass = (inv_total > 0).to(mu.dtype)  # sum_k pi_kl: 1, or 0 where the class has no mass
    slope = family.log_density_slope
    for r0 in range(0, rows, step):
        r = slice(r0, min(rows, r0 + step))
        b = r.stop - r.start
        e, g_row = terms[r], g_mu[r, None, :]
        # C_k as (1, n) @ (n, M): about 4x faster than (M, n) @ (n, 1) on CPUs
        big_c = torch.bmm(weighted[r], e.transpose(1, 2)).mul_(scale)
        h = torch.neg(u_buf[r], out=h_buf[:b]).exp_()  # h / e^c
        torch.bmm(big_c, h, out=g_row)  # sum_k C_k h_kl
        pi_h = h.mul_(e).sum(1, keepdim=True).mul_(inv_scaled[r])  # sum_k pi_kl h_kl
        if slope is not None:
            a, b_h, c = slope  # sum_k pi_kl (a x_kl + b h_kl + c) - sum_k pi_kl h_kl
            pi_x = torch.bmm(y[r, None, :], e).mul_(inv_total[r])  # sum_k pi_kl y_k ...
            pi_d = pi_x.addcmul_(mu[r, None, :], mass[r], value=-1.0).mul_(a)  # ... - mu_l
            pi_d.add_(pi_h, alpha=b_h - 1.0)
            if c:
                pi_d.add_(mass[r], alpha=c)
        else:
            x = torch.sub(y[r, :, None], mu[r, None, :], out=h_buf[:b])
            pi_d = family.kernel_dlog_density_(x).mul_(e).sum(1, keepdim=True)
            pi_d = pi_d.mul_(inv_total[r]).sub_(pi_h)
        g_row.addcmul_(pi_d, grad[r, None, :]).neg_()
    # The exact map is unchanged by mu + c, so its exact gradient sums to 0 over the
    # classes; projecting onto that subspace can only bring the quadrature's closer to it.
    return g_mu.sub_(g_mu.mean(-1, keepdim=True))


class _MaximumCrossEntropy(torch.autograd.Function):
    """``-log p_target`` per row of scores ``(B, n)``, reduced, as one autograd node: the
    centring, the nodes, the masses and the pick of the target.

    The bulk is in linear space (``docs/guides/distributions.md``, "The cross-entropy in
    linear space"): with ``W_k = w_k P(y_k)`` and ``h_kl = h(y_k - mu_l)``, the masses are
    ``m_l = sum_k W_k h_kl``, one ``(1, M) @ (M, n)`` product per row, and ``S = sum_l m_l``
    normalises them. The loss is ``log S - log m_t``, with ``log m_t`` (and the target's node
    posteriors ``pi_kt``) taken in log space on the ``M`` nodes alone, so a target far below
    the others keeps an exact, finite loss where its ``h`` underflows. With
    ``(log h)'(x) = d(x) - h(x)``, ``d = (log phi)'``, the gradient is

        dL/dmu_j = sum_k (pi_kt - W_k H_k / S) h_kj - sum_k W_k h_kj (d_kj - h_kj) / S
                   + [j = t] sum_k pi_kt (d_kt - h_kt),    H_k = sum_l h_kl,

    and where ``d = a x + b h + c`` (``family.log_density_slope``) the middle sum is
    ``(sum_k W_k (a y_k + c) h_kj - a mu_j m_j + (b - 1) sum_k W_k h_kj^2) / S``: two
    ``(1, M) @ (M, n)`` products and one pass for ``h^2``, against seven passes in log space.

    For normal noise on CPU the native kernel (:mod:`kexue.native`) computes
    the same loss and, in the forward, each row's gradient, which the backward scales.
    """

    @staticmethod
    def forward(ctx, scores, target, family, num_nodes, rule, reduction):
        centred = scores - scores.amax(-1, keepdim=True)  # only differences matter
        y, log_w = maximum_nodes(centred, family, num_nodes, rule)
        keep = ctx.needs_input_grad[0]
        kernel = _native_kernel(centred, family, y)
        ctx.native, ctx.reduction = kernel is not None, reduction
        if kernel is not None:
            loss, row_grad = kernel.probit_cross_entropy(
                centred.contiguous(), y.contiguous(), log_w.contiguous(), target.contiguous(), keep
            )
            if keep:
                ctx.save_for_backward(row_grad)
        else:
            loss, saved = _cross_entropy_forward(centred, target, y, log_w, family, keep)
            ctx.family, ctx.shift = family, saved.shift
            if keep:
                ctx.save_for_backward(*saved.tensors)
        if reduction == "mean":
            return loss.mean()
        return loss.sum() if reduction == "sum" else loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        rows = ctx.saved_tensors[0].shape[0]
        if ctx.reduction == "mean":
            grad = grad.expand(rows) / rows
        elif ctx.reduction == "sum":
            grad = grad.expand(rows)
        if ctx.native:
            g_mu = ctx.saved_tensors[0] * grad[:, None]
        else:
            g_mu = _cross_entropy_backward(_Saved(ctx.saved_tensors, ctx.shift, ctx.family), grad)
        return g_mu, None, None, None, None, None


def _native_kernel(centred: Tensor, family: NoiseFamily, y: Tensor) -> Any:
    """The native kernel where it computes this loss (normal noise, float32/64 on CPU, every
    ``y_k - mu_l`` where ``erfc`` stays a normal float), else ``None``."""
    if type(family) is not NormalNoise or centred.device.type != "cpu":
        return None
    if centred.dtype not in ERFC_RANGE:
        return None
    # centred scores are <= 0, so y_k - mu_l >= min y: the window keeps it above -9.3
    if float(y.amin()) < ERFC_RANGE[centred.dtype][0]:
        return None
    return kernels()


def _cross_entropy_forward(
    mu: Tensor, target: Tensor, y: Tensor, log_w: Tensor, family: NoiseFamily, keep: bool
) -> tuple[Tensor, _Saved]:
    """``log S - log m_t`` per row ``(B,)`` and, if ``keep``, what the backward needs
    (:class:`_MaximumCrossEntropy`)."""
    rows, n = mu.shape
    m = y.shape[-1]
    step = _block_rows(rows, m, n, mu.device)
    h_all = mu.new_empty(rows if keep else step, m, n)  # h_kl / e^c
    scratch = _scratch(mu, (step, m, n))
    index = target[:, None, None].expand(rows, m, 1)
    x_min = float(y.amin()) - float(mu.amax()) if rows else 0.0
    # exp() stays a normal float (fast); h below e^-limit adds nothing a float can hold to m
    limit = -math.log(torch.finfo(mu.dtype).tiny)  # exp(-limit): the smallest normal
    shift = 0.0
    parts = []
    for r0 in range(0, rows, step):
        r = slice(r0, min(rows, r0 + step))
        b = r.stop - r.start
        # one block (the common case): whole tensors, no slicing (each slice is an operation)
        y_r, mu_r, w_r, i_r = (
            (y, mu, log_w, index) if b == rows else (y[r], mu[r], log_w[r], index[r])
        )
        out = h_all if b == len(h_all) else h_all[r] if keep else h_all[:b]
        x = torch.sub(y_r[:, :, None], mu_r[:, None, :], out=out)
        log_cdf, u, shift = family.kernel_maximum_terms_(
            x, scratch if b == step else scratch[:b], x_min
        )
        if u.data_ptr() != x.data_ptr():
            u = x.copy_(u)
        log_p_r = log_cdf.sum(-1)  # log P(y_k)
        u_t = u.gather(2, i_r)  # u at the target, before the clamp
        h = u.clamp_max_(limit).neg_().exp_()
        log_pw = log_p_r + w_r
        top = log_pw.amax(-1, keepdim=True)
        weight = log_pw.sub_(top).exp_()  # W_k, scaled per row
        # m_l and H_k (scaled like W and h)
        parts.append((log_p_r, u_t, top, weight, torch.bmm(weight[:, None, :], h), h.sum(-1)))
    log_p, u_t, top, weight, mass, h_sum = (
        parts[0] if len(parts) == 1 else [torch.cat(p) for p in zip(*parts, strict=True)]
    )
    # the target's log mass in log space on the M nodes (from u before the clamp): exact
    # where its h underflows
    log_h_t = u_t.squeeze_(-1).neg_().add_(shift)
    a_t = log_h_t + log_p + log_w
    top_t = a_t.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)  # -inf: no mass at all
    posterior = a_t.sub_(top_t).exp_()
    mass_t = posterior.sum(-1, keepdim=True)
    total = mass.sum(-1)  # S, scaled by e^-(top + c) per row
    loss = (total / mass_t).log_().add_(top - top_t).add_(shift).squeeze(-1)
    tensors: tuple[Tensor, ...] = ()
    if keep:
        inv = total.reciprocal()
        posterior.mul_(mass_t.reciprocal_().nan_to_num_(posinf=0.0))  # pi_kt
        x_t = y - mu.gather(-1, target[:, None])
        tensors = (mu, y, target, h_all, weight.mul_(inv), mass.squeeze(1).mul_(inv),
                   posterior, x_t, log_h_t, h_sum)  # fmt: skip
    return loss, _Saved(tensors, shift, family)


def _cross_entropy_backward(saved: _Saved, grad: Tensor) -> Tensor:
    """The gradient in the scores from the gradient ``grad`` ``(B,)`` in the rows' losses."""
    mu, y, target, h_all, w_s, prob, pi_t, x_t, log_h_t, h_sum = saved.tensors
    family = saved.family
    rows, m, n = h_all.shape
    scale = math.exp(saved.shift)  # h = e^c h'
    h_t = log_h_t.exp()
    slope = family.log_density_slope
    if slope is not None:
        a, b_h, c = slope
        d_t = (x_t * a).add_(h_t, alpha=b_h - 1.0).add_(c)  # d - h at the target's nodes
        # sum_k (pi_kt e^c - W_k (e^c H_k + a y_k + c) / S) h'_kj
        first = pi_t * scale - w_s * (h_sum * scale + a * y + c)
        square = w_s * (scale * (1.0 - b_h))  # coefficient of h'^2: -(b - 1) e^c W_k / S
    else:
        d_t = family.kernel_dlog_density_(x_t.clone()).sub_(h_t)
        first = pi_t * scale - w_s * (h_sum * scale)
        square = w_s * scale
    g_mu = torch.bmm(first[:, None, :], h_all).squeeze(1)
    step = _block_rows(rows, m, n, mu.device)
    h2 = _scratch(h_all, (step, m, n))
    for r0 in range(0, rows, step):
        r = slice(r0, min(rows, r0 + step))
        b = r.stop - r.start
        h = h_all[r]
        if slope is None:  # - sum_k W_k h_kj d_kj / S
            d = torch.sub(y[r, :, None], mu[r, None, :], out=h2[:b])
            d = family.kernel_dlog_density_(d).mul_(h)
            g_mu[r, None, :].baddbmm_(w_s[r, None, :], d, alpha=-1.0)
        if slope is None or b_h != 1.0:
            g_mu[r, None, :].baddbmm_(square[r, None, :], torch.mul(h, h, out=h2[:b]))
    if slope is not None and a:
        g_mu.addcmul_(mu, prob, value=a)
    g_mu.scatter_add_(-1, target[:, None], (pi_t * d_t).sum(-1, keepdim=True))
    g_mu.mul_(grad[:, None])
    # The exact loss is unchanged by mu + c, so its exact gradient sums to 0 over the
    # classes; projecting onto that subspace can only bring the quadrature's closer to it.
    return g_mu.sub_(g_mu.mean(-1, keepdim=True))


def maximum_cross_entropy(
    scores: Tensor,
    target: Tensor,
    family: NoiseFamily,
    num_nodes: int | None,
    rule: str,
    reduction: str,
) -> Tensor:
    """``-log p_target`` of rows of scores ``(B, n)`` (``B >= 1``) with integer targets
    ``(B,)`` by the form over the maximum, reduced by ``reduction``: one autograd node instead
    of the half dozen of ``log_softmax(maximum_log_mass(...))`` and the pick (a fixed cost of
    about 0.2 ms a call on CPUs, a tenth of the whole at 64 x 100)."""
    nodes = num_nodes or default_nodes(family, scores.dtype)
    return _MaximumCrossEntropy.apply(scores, target, family, nodes, rule, reduction)


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
