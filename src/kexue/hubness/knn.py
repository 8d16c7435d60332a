"""Exact and approximate k-nearest-neighbour search, the first step of every hubness measure.

Notation of ``docs/guides/hubness.md`` ("Neighbour search"): ``X`` holds ``N`` points of
``R^d`` (rows), the queries are ``Y`` (``M`` rows, default ``X`` itself with each point dropped
from its own list). The exact torch backend ranks every point ``x`` for a query ``y`` by the
squared distance

    |y - x|^2 = |y|^2 + |x|^2 - 2 y.x,

computed one block of queries at a time as a single matrix product (``|y|^2`` does not change
the ranking of a row, so it is left out), then a top-k through group minima (one vectorised
pass instead of a per-row selection over ``N`` values). When the queries are the points
themselves the distance matrix is symmetric and each block is computed once, serving its rows
and its columns. Points are centred first (distances do not change, the cancellation in the
expansion shrinks), and scaled by a power of two when their magnitude would overflow or
underflow the squares (exact, so the ranking does not change).

**One answer, whatever the threads, blocks or backend.** The matrix product rounds, and how
it rounds depends on the block layout and on the BLAS library's threading; two points at
(nearly) the same distance could then swap places from one run to the next. So the search
keeps a few candidates beyond ``k`` per query, and wherever two of the first ``k + 1``
rounded scores lie within the proven rounding bound of each other, the candidates' distances
are recomputed in float64 from the vectors and ranked by ``(distance, index)``: exact ties go
to the smaller index. When even the extra candidates all lie within the bound, that query is
searched again in float64 against every point. The result is the float64 brute-force answer
with ties broken by index, a function of the data alone. The faiss backend offers the same
exact search (``index="flat"``, with the same tie rule) and approximate indexes (``"ivf"``,
``"hnsw"``) whose recall is measured with :func:`neighbor_recall`, not assumed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from torch import Tensor

from kexue.extras import require
from kexue.ops.logsumexp import compute_dtype
from kexue.validation import (
    check_bool,
    check_choice,
    check_int,
    check_points,
    check_tensor,
    describe,
)

__all__ = [
    "BACKENDS",
    "INDEXES",
    "METRICS",
    "Neighbors",
    "knn",
    "neighbor_recall",
    "smallest_k_grouped",
]

METRICS = ("euclidean", "cosine")
BACKENDS = ("auto", "torch", "faiss")
INDEXES = ("flat", "ivf", "hnsw")

# Rows of the distance block per chunk: about this many floats (64 MB in float32).
_BLOCK_FLOATS = 1 << 24
# Columns per block for large N (a multiple of 16 * SELECTION_GROUP, see _torch_search).
COLUMN_TILE = 16384
# Block side of the all-pairs search (a multiple of 16 * SELECTION_GROUP); used from 2 blocks on.
SYMMETRIC_BLOCK = 2048
# Values per group of the selection (see smallest_k_grouped): fewer means fewer scattered
# reads of candidates, more means fewer group minima to rank.
SELECTION_GROUP = 16
# Candidates kept beyond k per query, so that near-ties at the k-th place are resolved exactly
# without a second search (a second search is needed only when all of them are near-tied).
_EXTRA = 4
# Winners closer than this share of their squared norms get their distance recomputed.
_RECOMPUTE = 1e-3
# Magnitudes whose squares stay far from float32 overflow and underflow (see _power_of_two).
_SAFE = (2.0**-32, 2.0**32)
# Float64 values per chunk of the exact recomputation (32 MB).
_EXACT_FLOATS = 1 << 22


class Neighbors(NamedTuple):
    """``distances`` (M, k) in increasing order and ``indices`` (M, k) int64 into ``X``.

    Euclidean distances are ``|y - x|``, cosine distances ``1 - cos(y, x)``. An approximate
    index that finds fewer than ``k`` points fills the rest with index ``-1`` and distance
    ``inf``.
    """

    distances: Tensor
    indices: Tensor


def _normalised(X: Tensor, name: str) -> Tensor:
    norms = X.norm(dim=1, keepdim=True)
    zero = (norms == 0).flatten()
    if zero.any():
        raise ValueError(
            f"{name} has {int(zero.sum())} all-zero row(s) (first: {int(zero.nonzero()[0])}); "
            "the cosine distance is undefined for them"
        )
    return X / norms


def _chunk_rows(chunk_size: object) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def _group_size(n_points: int, k: int) -> int:
    return max(1, min(SELECTION_GROUP, n_points // k))


def _power_of_two(*tensors: Tensor) -> float:
    """A power of two that brings the largest magnitude of ``tensors`` near 1 when it lies
    outside ``_SAFE`` (else 1): squares of 1e19 overflow float32, squares of 1e-30 vanish.
    Multiplying by a power of two is exact, so distances scale and rankings do not change."""
    top = max(float(t.abs().max()) for t in tensors)
    if top == 0 or _SAFE[0] <= top <= _SAFE[1]:
        return 1.0
    return 2.0 ** -math.frexp(top)[1]


def smallest_k_grouped(block: Tensor, k: int, group: int, dim: int = 1) -> tuple[Tensor, Tensor]:
    """The ``k`` smallest values of each row (``dim=1``) or column (``dim=0``) of ``block``,
    through group minima; values and indices of shape ``(other, k)``, values increasing.

    The entries of a row fall into ``G = size / group`` groups (group ``g`` holds positions
    ``g, g + G, g + 2G, ...``; ``size`` must be a multiple of ``group``). The ``k`` groups with
    the smallest minima hold ``k`` values no larger than the largest of those minima ``m``,
    and every value of another group is at least its own minimum ``>= m``; so the ``k``
    smallest values lie in those ``k`` groups. The minima are one vectorised pass over the
    block, several times cheaper on a CPU than ``topk`` over every entry. Which of several
    equal values is returned is not specified (:func:`knn` resolves ties itself).
    """
    size = block.shape[dim]
    per = size // group
    picked = min(k, per)
    if dim == 1:
        mins = block.view(block.shape[0], group, per).amin(dim=1)  # (rows, per)
        lines = block
    else:
        mins = block.view(group, per, block.shape[1]).amin(dim=0).T  # (cols, per)
        lines = block.T
    _, gidx = mins.topk(picked, dim=1, largest=False)
    step = torch.arange(0, size, per, device=block.device)
    where = (gidx[:, :, None] + step).view(len(gidx), -1)
    vals, j = lines.gather(1, where).topk(k, dim=1, largest=False, sorted=True)
    return vals, where.gather(1, j)


def _winner_distances(
    score: Tensor,
    top: Tensor,
    y: Tensor,
    x: Tensor,
    *,
    cosine: bool,
    scale: float = 1.0,
    y_sq: Tensor | None = None,
    x_sq: Tensor | None = None,
) -> Tensor:
    """Distances of each query ``y`` to its winners ``x[top]`` from their ranking scores.

    Cosine: ``1 + score`` (score ``-y.x`` of unit rows). Euclidean: ``sqrt(score)`` where the
    score is the squared distance ``|y|^2 + |x|^2 - 2 y.x`` (``y_sq`` is added when the score
    left out ``|y|^2``). The expansion loses relative accuracy only when the distance is
    small against the norms, so pairs closer than ``_RECOMPUTE`` of ``|y|^2 + |x|^2`` (or at
    a cosine distance below ``_RECOMPUTE``) are recomputed from the vectors
    (``x = scale * x``): duplicates come out at exactly 0.
    """
    if cosine:
        dist = score + 1.0
        close = dist < _RECOMPUTE
    else:
        dist = score.clone() if y_sq is None else score + y_sq[:, None]
        x_sq = cast(Tensor, x_sq)  # the Euclidean callers pass it
        norms = (y_sq if y_sq is not None else x_sq[: len(score)])[:, None] + x_sq[top]
        close = dist < _RECOMPUTE * norms
    if close.any():
        i, j = close.nonzero(as_tuple=True)
        near = x[top[i, j]]
        if cosine:
            dist[i, j] = 1.0 + (near * y[i]).sum(dim=1)  # x holds -x
        else:
            dist[i, j] = torch.sub(y[i], near, alpha=scale).square().sum(dim=1)
    if cosine:
        return dist.clamp_min_(0.0)
    return dist.clamp_min_(0.0).sqrt_()


class _Exact:
    """The float64 reference that decides near-ties: distances recomputed from the vectors,
    ranked by ``(distance, index)``.

    ``points`` / ``queries`` are the (scaled, uncentred) inputs and ``own[i]`` the point query
    ``i`` must not return. The searches report the norms of the vectors their scores were
    computed from (:meth:`set_norms`: centred rows, unit rows for cosine) for the rounding
    bound of :meth:`bound`.
    """

    # A dot product of n terms summed in any order has error at most lambda sqrt(n) u
    # sum |a_i b_i| with probability at least 1 - 2 exp(-lambda^2 / 2) (Higham & Mary, 2019);
    # lambda = 8 puts that at 3e-14 per score. Twice that covers the squared norms in the
    # score, 4 u the centring.
    LAMBDA = 8.0

    def __init__(
        self,
        points: Tensor,
        queries: Tensor,
        metric: str,
        own: Tensor | None,
        score_dtype: torch.dtype,
    ) -> None:
        self.points, self.queries, self.metric, self.own = points, queries, metric, own
        n_terms = points.shape[1] + 2
        self.factor = (2 * self.LAMBDA * math.sqrt(n_terms) + 4) * torch.finfo(score_dtype).eps / 2
        self.available = len(points) - (0 if own is None else 1)
        self.set_norms(points.new_ones(len(points)), queries.new_ones(len(queries)))  # unit rows

    def set_norms(self, point_norms: Tensor, query_norms: Tensor) -> None:
        self.point_norms = point_norms.double()
        self.query_norms = query_norms.double()
        self.radius = float(self.point_norms.max())

    def bound(self, rows: Tensor, idx: Tensor | None = None) -> Tensor:
        """Rounding bound of the scores of queries ``rows`` against the points ``idx``
        ((m, w); default: any point), float64."""
        y = self.query_norms.to(rows.device)[rows][:, None]
        x = self.radius if idx is None else self.point_norms.to(idx.device)[idx]
        return self.factor * (x + y) ** 2

    def _vectors(self, x: Tensor) -> Tensor:
        x = x.double()
        return x / x.norm(dim=-1, keepdim=True) if self.metric == "cosine" else x

    def _pairs(self, q: Tensor, x: Tensor) -> Tensor:
        # one fixed reduction per pair, whatever the batch: the same value on every path
        if self.metric == "cosine":
            return 1.0 - (q * x).sum(dim=-1)
        return (q - x).square().sum(dim=-1)

    def distances(self, rows: Tensor, idx: Tensor) -> Tensor:
        """Float64 squared euclidean (or cosine) distances of queries ``rows`` to ``idx``."""
        out = torch.empty(idx.shape, dtype=torch.float64, device=idx.device)
        per = max(1, _EXACT_FLOATS // max(1, idx.shape[1] * self.points.shape[1]))
        for lo in range(0, len(rows), per):
            q = self._vectors(self.queries[rows[lo : lo + per]])[:, None, :]
            out[lo : lo + per] = self._pairs(q, self._vectors(self.points[idx[lo : lo + per]]))
        return out

    def search(self, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` nearest points of the queries ``rows`` by float64 brute force."""
        n, d = self.points.shape
        found_d, found_i = [], []
        group = max(1, _EXACT_FLOATS // n)  # queries at a time: an (group, n) distance table
        for start in range(0, len(rows), group):
            part = rows[start : start + group]
            q = self._vectors(self.queries[part])
            dist = torch.empty(len(part), n, dtype=torch.float64, device=q.device)
            per = max(1, _EXACT_FLOATS // (len(part) * d))
            for lo in range(0, n, per):
                x = self._vectors(self.points[lo : lo + per])
                dist[:, lo : lo + per] = self._pairs(q[:, None, :], x[None])
            if self.own is not None:
                dist[torch.arange(len(part)), self.own[part]] = math.inf
            order = dist.argsort(dim=1, stable=True)[:, :k]  # among ties, increasing index
            found_d.append(dist.gather(1, order))
            found_i.append(order)
        return torch.cat(found_d), torch.cat(found_i)

    def resolve(
        self, score: Tensor, idx: Tensor, rows: Tensor, k: int
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """Settle the queries ``rows`` whose candidate ``score`` list (increasing; ``idx``
        the points) has near-ties among its first ``k + 1`` entries.

        Returns ``(which, distances, indices)``: positions (into ``rows``) of the settled
        queries with their float64 distances (squared for euclidean) and indices, or None when
        every query's ranking is already beyond rounding doubt.
        """
        width = score.shape[1]
        head = min(k + 1, width)
        err = self.bound(rows, idx[:, :head])
        gaps = score[:, :head].double().diff(dim=1)
        doubt = (gaps <= err[:, 1:] + err[:, :-1]).any(dim=1)
        if not bool(doubt.any()):
            return None
        which = doubt.nonzero().flatten()
        if width >= self.available:  # every point is a candidate
            enough = torch.ones(len(which), dtype=torch.bool, device=score.device)
        else:  # a point beyond the list scores at least the last candidate's rounded score
            last, kth = score[which, width - 1].double(), score[which, k - 1].double()
            enough = last - kth > err[which, k - 1] + self.bound(rows[which])[:, 0]
        dist = torch.empty(len(which), k, dtype=torch.float64, device=score.device)
        best = torch.empty(len(which), k, dtype=torch.long, device=score.device)
        if bool(enough.any()):
            some = which[enough]
            cand = idx[some].sort(dim=1).values  # by index first: ties keep the smaller one
            d = self.distances(rows[some], cand)
            order = d.argsort(dim=1, stable=True)[:, :k]
            dist[enough], best[enough] = d.gather(1, order), cand.gather(1, order)
        if not bool(enough.all()):
            dist[~enough], best[~enough] = self.search(rows[which[~enough]], k)
        return which, dist, best


@torch.no_grad()
def _torch_search(
    X: Tensor,
    Q: Tensor,
    k: int,
    metric: str,
    self_index: Tensor | None,
    rows_per_chunk: int | None,
    exact: _Exact,
) -> Neighbors:
    """Exact search of the rows of ``Q`` among the rows of ``X`` (same dtype and device).

    ``self_index[i]`` is the row of ``X`` that query ``i`` must not return (or None).
    One matrix product per chunk gives the ranking score of every pair: ``-y.x`` (cosine,
    unit rows) or ``|x|^2 - 2 y.x`` (euclidean, centred rows), the latter as
    ``[y, 1] . [-2 x, |x|^2]`` so no extra pass adds ``|x|^2``. Columns are padded with
    ``+inf`` scores to a multiple of the selection's group size (:func:`smallest_k_grouped`).
    For large ``N`` the columns are taken ``COLUMN_TILE`` at a time and the candidates of the
    tiles merged, so a block stays about 64 MB and the gemm keeps many rows.
    """
    n, d = X.shape
    wide = min(k + _EXTRA, exact.available)
    group = _group_size(n, wide)
    # groups of a multiple of 16 columns keep the minima pass vectorised (about 1.7x faster)
    pad = -n % (group * 16) if n >= 8192 else -n % group
    if metric == "cosine":
        base = X.new_zeros(n + pad, d)
        torch.neg(_normalised(X, "X"), out=base[:n])
        queries = _normalised(Q, "Y")
    else:
        centre = X.mean(dim=0)
        base = X.new_zeros(n + pad, d + 1)  # [-2 x, |x|^2], then zero rows (padding)
        torch.sub(X, centre, out=base[:n, :d])
        base[:n, d] = torch.linalg.vector_norm(base[:n, :d], dim=1).square_()
        base[:n, :d].mul_(-2.0)
        queries = Q.new_ones(Q.shape[0], d + 1)  # [y, 1]
        torch.sub(Q, centre, out=queries[:, :d])
        q_sq = torch.linalg.vector_norm(queries[:, :d], dim=1).square_()
        exact.set_norms(base[:n, d].sqrt(), q_sq.sqrt())
    m, width = queries.shape[0], base.shape[0]
    tile = min(width, max(1, COLUMN_TILE // (16 * group)) * 16 * group)  # whole groups
    rows_per_chunk = rows_per_chunk or max(1, min(4096, _BLOCK_FLOATS // tile))
    dist = torch.empty(m, k, dtype=X.dtype, device=X.device)
    idx = torch.empty(m, k, dtype=torch.long, device=X.device)
    # one buffer for every block: a fresh 64 MB block each time costs page faults
    buffer = torch.empty(min(rows_per_chunk, m) * tile, dtype=X.dtype, device=X.device)
    for start in range(0, m, rows_per_chunk):
        q = queries[start : start + rows_per_chunk]
        rows = torch.arange(len(q), device=X.device)
        own = None if self_index is None else self_index[start : start + len(q)]
        best_s = best_i = None
        for lo in range(0, width, tile):
            hi = min(lo + tile, width)
            block = buffer[: len(q) * (hi - lo)].view(len(q), hi - lo)
            torch.mm(q, base[lo:hi].T, out=block)
            if hi > n:
                block[:, max(n - lo, 0) :] = math.inf
            if own is not None:
                inside = (own >= lo) & (own < hi)
                block[rows[inside], own[inside] - lo] = math.inf
            score, top = smallest_k_grouped(block, min(wide, hi - lo), group)
            top += lo
            if best_s is None:
                best_s, best_i = score, top
            else:
                best_s, pick = torch.cat([best_s, score], 1).topk(wide, dim=1, largest=False)
                # best_i is set together with best_s
                best_i = torch.cat([cast(Tensor, best_i), top], 1).gather(1, pick)
        best_s, best_i = cast(Tensor, best_s), cast(Tensor, best_i)  # width >= 1: the loop ran
        if metric == "cosine":
            vals = _winner_distances(best_s[:, :k], best_i[:, :k], q, base[:n], cosine=True)
        else:
            vals = _winner_distances(
                best_s[:, :k],
                best_i[:, :k],
                q[:, :d],
                base[:n, :d],
                cosine=False,
                scale=-0.5,
                y_sq=q_sq[start : start + len(q)],
                x_sq=base[:n, d],
            )
        vals, top = _settle(exact, best_s, best_i, rows + start, k, vals)
        dist[start : start + len(q)] = vals
        idx[start : start + len(q)] = top
    return Neighbors(dist, idx)


def _settle(
    exact: _Exact, score: Tensor, idx: Tensor, rows: Tensor, k: int, distances: Tensor
) -> tuple[Tensor, Tensor]:
    """The first ``k`` candidates (``score`` increasing), with the queries whose ranking is
    within rounding doubt settled by ``exact``; ``distances`` are those of the first ``k``."""
    top = idx[:, :k].clone()
    settled = exact.resolve(score, idx, rows, k)
    if settled is not None:
        which, dist, best = settled
        if exact.metric == "euclidean":
            dist = dist.sqrt()
        distances[which] = dist.clamp_min(0.0).to(distances.dtype)
        top[which] = best
    # the score order is the distance order up to rounding: make it exact
    distances, order = distances.sort(dim=1, stable=True)
    return distances, top.gather(1, order)


@torch.no_grad()
def _symmetric_search(
    X: Tensor, k: int, metric: str, exclude_self: bool, exact: _Exact
) -> Neighbors:
    """All points against all points, each distance block computed once.

    The score ``s(x, y)`` is symmetric: ``-x.y`` (cosine, unit rows) or the squared distance
    ``|x|^2 + |y|^2 - 2 x.y = [x, |x|^2, 1] . [-2 y, 1, |y|^2]`` (centred rows). The points
    are cut into blocks of ``SYMMETRIC_BLOCK``; only blocks ``(i, j)`` with ``j >= i`` are
    multiplied, and each off-diagonal block gives the rows of block ``i`` their candidates
    (by rows) and the rows of block ``j`` theirs (by columns), merged into running candidate
    lists. Half the matrix products of :func:`_torch_search`, the same selection work.
    """
    n, d = X.shape
    size = SYMMETRIC_BLOCK
    n_pad = -(-n // size) * size
    wide = min(k + _EXTRA, exact.available)
    if metric == "cosine":
        vectors = _normalised(X, "X")
        left = X.new_zeros(n_pad, d)
        left[:n] = vectors
        right = -left
    else:
        vectors = X - X.mean(dim=0)
        sq = torch.linalg.vector_norm(vectors, dim=1).square_()
        left = X.new_zeros(n_pad, d + 2)  # [x, |x|^2, 1]
        left[:n, :d], left[:n, d], left[:n, d + 1] = vectors, sq, 1.0
        right = X.new_zeros(n_pad, d + 2)  # [-2 x, 1, |x|^2]
        right[:n, :d], right[:n, d], right[:n, d + 1] = -2.0 * vectors, 1.0, sq
        exact.set_norms(sq.sqrt(), sq.sqrt())
    group = SELECTION_GROUP
    best_s = torch.full((n_pad, wide), math.inf, dtype=X.dtype, device=X.device)
    best_i = torch.full((n_pad, wide), -1, dtype=torch.long, device=X.device)

    def merge(lo: int, score: Tensor, index: Tensor) -> None:
        hi = lo + len(score)
        both = torch.cat([best_s[lo:hi], score], 1)
        best_s[lo:hi], pick = both.topk(wide, dim=1, largest=False, sorted=False)
        best_i[lo:hi] = torch.cat([best_i[lo:hi], index], 1).gather(1, pick)

    block = torch.empty(size, size, dtype=X.dtype, device=X.device)
    for lo_i in range(0, n_pad, size):
        for lo_j in range(lo_i, n_pad, size):
            torch.mm(left[lo_i : lo_i + size], right[lo_j : lo_j + size].T, out=block)
            if lo_j + size > n:  # padded points: never a neighbour, never a query
                block[:, max(n - lo_j, 0) :] = math.inf
            if lo_i + size > n:
                block[max(n - lo_i, 0) :] = math.inf
            if lo_i == lo_j:
                if exclude_self:
                    block.diagonal().fill_(math.inf)
                score, top = smallest_k_grouped(block, wide, group, dim=1)
                merge(lo_i, score, top + lo_j)
            else:
                score, top = smallest_k_grouped(block, wide, group, dim=1)
                merge(lo_i, score, top + lo_j)
                score, top = smallest_k_grouped(block, wide, group, dim=0)
                merge(lo_j, score, top + lo_i)
    best_s, order = best_s[:n].sort(dim=1)
    best_i = best_i[:n].gather(1, order)
    top = best_i[:, :k]
    if metric == "cosine":
        vals = _winner_distances(best_s[:, :k], top, vectors, -vectors, cosine=True)
    else:
        vals = _winner_distances(best_s[:, :k], top, vectors, vectors, cosine=False, x_sq=sq)
    vals, top = _settle(exact, best_s, best_i, torch.arange(n, device=X.device), k, vals)
    return Neighbors(vals, top)


def _faiss_index(faiss, base: np.ndarray, metric: str, index: str, params: Mapping[str, Any]):
    n, d = base.shape
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    known = {
        "flat": set(),
        "ivf": {"nlist", "nprobe"},
        "hnsw": {"M", "ef_construction", "ef_search"},
    }[index]
    unknown = set(params) - known
    if unknown:
        raise ValueError(
            f"index_params {sorted(unknown)} do not apply to index={index!r}; "
            f"known: {sorted(known) or 'none'}"
        )
    if index == "flat":
        built = faiss.IndexFlat(d, faiss_metric)
    elif index == "ivf":
        nlist = int(params.get("nlist", max(1, min(n // 39, round(4 * math.sqrt(n))))))
        quantizer = faiss.IndexFlat(d, faiss_metric)
        built = faiss.IndexIVFFlat(quantizer, d, nlist, faiss_metric)
        built.train(base)
        built.nprobe = int(params.get("nprobe", min(nlist, 16)))
    else:
        built = faiss.IndexHNSWFlat(d, int(params.get("M", 32)), faiss_metric)
        built.hnsw.efConstruction = int(params.get("ef_construction", 80))
        built.hnsw.efSearch = int(params.get("ef_search", 128))
    built.add(base)
    return built


def _faiss_search(
    X: Tensor,
    Q: Tensor | None,
    k: int,
    metric: str,
    self_index: Tensor | None,
    index: str,
    params: Mapping[str, Any],
    exact: _Exact,
) -> Neighbors:
    faiss = require("faiss", "hubness", "knn(backend='faiss')")
    X = X.detach().to("cpu", torch.float32)
    Q = X if Q is None else Q.detach().to("cpu", torch.float32)
    if metric == "cosine":  # the torch path's check: an all-zero row has no direction
        X = _normalised(X, "X")
        Q = X if Q is X else _normalised(Q, "Y")
    base, queries = np.ascontiguousarray(X.numpy()), np.ascontiguousarray(Q.numpy())
    built = _faiss_index(faiss, base, metric, index, params)
    flat = index == "flat"
    wide = min(k + _EXTRA, exact.available) if flat else k
    extra = 1 if self_index is not None else 0
    dist, idx = built.search(queries, wide + extra)
    if self_index is not None:
        own = self_index.cpu().numpy()[:, None]
        keep = idx != own
        no_self = keep.all(axis=1)
        keep[no_self, -1] = False  # the point was not found: drop the last one instead
        dist = dist[keep].reshape(len(idx), wide)
        idx = idx[keep].reshape(len(idx), wide)
    score = torch.from_numpy(-dist if metric == "cosine" else dist)  # increasing
    found = torch.from_numpy(idx.astype(np.int64))
    missing = found < 0
    if metric == "cosine":
        out = (1.0 + score[:, :k]).clamp_min(0.0)
    else:
        out = score[:, :k].clamp_min(0.0).sqrt()
    out[missing[:, :k]] = math.inf
    out = out.to(compute_dtype(X.dtype))
    if flat:  # exact index: the same tie rule and rounding guard as the torch backend
        if metric == "euclidean":  # faiss ranks |x|^2 - 2 y.x of the raw (uncentred) rows
            exact.set_norms(X.norm(dim=1), Q.norm(dim=1))
        rows = torch.arange(len(found))
        out, top = _settle(exact, score, found, rows, k, out)
    else:
        top = found[:, :k]
    return Neighbors(out.to(X.device), top.to(X.device))


def knn(
    X: Tensor | np.ndarray,
    k: int,
    *,
    Y: Tensor | np.ndarray | None = None,
    rows: Tensor | np.ndarray | None = None,
    metric: str = "euclidean",
    exclude_self: bool = True,
    backend: str = "auto",
    chunk_size: int | None = None,
    index: str = "flat",
    index_params: Mapping[str, Any] | None = None,
) -> Neighbors:
    """The ``k`` nearest neighbours in ``X`` of every query.

    Args:
        X: the ``N`` points searched, shape (N, d), tensor or NumPy array. NaN or infinite
            values raise ``ValueError`` (naming the first bad row).
        k: neighbours per query, ``1 <= k < N`` (``k <= N`` for separate queries ``Y``).
        Y: separate queries, shape (M, d); ``exclude_self`` does not apply to them.
        rows: search the neighbours of the points ``X[rows]`` only (each excluded from its
            own list when ``exclude_self``), e.g. to check an approximate search on a random
            subsample of queries. Not with ``Y``.
        metric: ``"euclidean"`` (``|y - x|``) or ``"cosine"`` (``1 - cos``; all-zero rows
            raise ``ValueError``).
        exclude_self: when the queries are the points of ``X``, drop each point from its
            own list (by index, so duplicates of a point still count). ``False`` keeps it:
            then the point itself is usually its first neighbour, at distance 0.
        backend: ``"torch"`` (exact, any device, float32 or float64), ``"faiss"`` (CPU,
            float32, exact ``"flat"`` or approximate indexes) or ``"auto"`` (torch for
            ``index="flat"``, faiss otherwise).
        chunk_size: queries per block of the torch backend; memory is about
            ``chunk_size * min(N, 16384)`` floats. Default: blocks of about 64 MB, at most
            4096 rows. When every point of ``X`` is a query (no ``Y``, no ``rows``) and
            ``N >= 4096``, the default instead computes each 2048 x 2048 block of the
            symmetric distance matrix once (half the matrix products); giving
            ``chunk_size`` keeps the row-block search.
        index: ``"flat"`` (exact), ``"ivf"`` (inverted lists, ``index_params`` ``nlist``,
            default ``4 sqrt(N)``, and ``nprobe``, default 16) or ``"hnsw"`` (graph,
            ``M`` = 32, ``ef_construction`` = 80, ``ef_search`` = 128).
        index_params: options of the faiss index (above).

    Returns:
        :class:`Neighbors` ``(distances, indices)`` of shape (M, k), closest first, on the
        device of ``X``; distances in ``X``'s dtype (float32 for float16 input; faiss
        computes in float32 whatever the input). The exact searches (torch, faiss
        ``"flat"``) return the float64 brute-force neighbours with exact ties broken towards
        the smaller index, whatever the thread count, ``chunk_size`` or backend
        (``docs/guides/hubness.md``, "Neighbour search"); their distances agree to rounding.
        Approximate indexes may return fewer than ``k`` points (index ``-1``), miss true
        neighbours and order ties arbitrarily: measure their recall with
        :func:`neighbor_recall` against ``knn(X, k, rows=sample)``.
    """
    metric = check_choice(metric, "metric", METRICS)
    backend = check_choice(backend, "backend", BACKENDS)
    index = check_choice(index, "index", INDEXES)
    if backend == "auto":
        backend = "torch" if index == "flat" else "faiss"
    if backend == "torch" and index != "flat":
        raise ValueError(f"index={index!r} is approximate and needs backend='faiss'")
    if index_params is not None and not isinstance(index_params, Mapping):
        raise TypeError(f"index_params must be a mapping, got {type(index_params).__name__}")
    exclude_self = check_bool(exclude_self, "exclude_self")
    chunk_size = _chunk_rows(chunk_size)
    X = check_points(X, "X")
    n = X.shape[0]
    self_index = None
    if Y is not None:
        if rows is not None:
            raise ValueError("give either Y (separate queries) or rows (points of X), not both")
        Q = check_points(Y, "Y")
        if Q.shape[1] != X.shape[1]:
            raise ValueError(
                f"Y has {Q.shape[1]} features per row but X has {X.shape[1]}; they must match"
            )
        k = _check_k(k, n, f"X has only N={n} points")
        Q = Q.to(device=X.device)
        select = None
    else:
        k = _check_k(k, n - 1, f"k must be < N = {n}, the number of rows of X")
        if rows is None:
            select = torch.arange(n, device=X.device)
            Q = X
        else:
            try:
                select = torch.as_tensor(rows, device=X.device)
            except (TypeError, ValueError, RuntimeError):
                what = describe(rows)
                raise TypeError(f"rows must be integer row indices of X, got {what}") from None
            if select.ndim != 1 or select.dtype == torch.bool or not _integral(select):
                raise ValueError("rows must be a 1-D sequence of integer row indices of X")
            select = select.long()
            if len(select) and (select.min() < 0 or select.max() >= n):
                raise ValueError(f"rows must index X's {n} rows, got values outside [0, {n})")
            Q = X[select]
        if exclude_self:
            self_index = select
    work = torch.promote_types(compute_dtype(X.dtype), compute_dtype(Q.dtype))
    X, Q = X.to(work), Q.to(work)
    scale = _power_of_two(X, Q)
    if scale != 1.0:
        X, Q = X * scale, Q * scale
    exact = _Exact(X, Q, metric, self_index, torch.float32 if backend == "faiss" else work)
    if backend == "faiss":
        queries = None if (Y is None and rows is None) else Q
        found = _faiss_search(
            X, queries, k, metric, self_index, index, dict(index_params or {}), exact
        )
    elif Y is None and rows is None and chunk_size is None and n >= 2 * SYMMETRIC_BLOCK:
        found = _symmetric_search(X, k, metric, exclude_self, exact)
    else:
        found = _torch_search(X, Q, k, metric, self_index, chunk_size, exact)
    if scale != 1.0 and metric == "euclidean":
        found = Neighbors(found.distances / scale, found.indices)
    return found


def _integral(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


def _check_k(k: object, limit: int, why: str) -> int:
    k = check_int(k, "k", low=1)
    if k > limit:
        raise ValueError(f"k={k} is too large: {why}")
    return k


def neighbor_recall(found: Tensor, exact: Tensor) -> float:
    """Recall ``|found_i ∩ exact_i| / k`` averaged over the queries ``i``.

    ``found`` (M, k_f) and ``exact`` (M, k) are neighbour index lists of the same queries
    (``-1`` entries of ``found`` never match). With exact ties in distance, an exact method
    can score below 1.
    """
    found = check_tensor(found, "found", allow_numpy=True)
    exact = check_tensor(exact, "exact", allow_numpy=True)
    if found.ndim != 2 or exact.ndim != 2 or found.shape[0] != exact.shape[0]:
        raise ValueError(
            f"found and exact must be (M, k) index lists of the same queries, got "
            f"{tuple(found.shape)} and {tuple(exact.shape)}"
        )
    if exact.numel() == 0:
        raise ValueError("exact is empty")
    hits = (exact[:, :, None] == found[:, None, :]).any(dim=2)
    return float(hits.double().mean())
