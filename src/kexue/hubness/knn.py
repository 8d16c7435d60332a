"""Exact and approximate k-nearest-neighbour search, the first step of every hubness measure.

Notation of ``../shared/reference/hubness.md``: ``X`` holds ``N`` points of ``R^d`` (rows), the
queries are ``Y`` (``M`` rows, default ``X`` itself with each point dropped from its own list).
The exact torch backend ranks every point ``x`` for a query ``y`` by the squared distance

    |y - x|^2 = |y|^2 + |x|^2 - 2 y.x,

computed one block of queries at a time as a single matrix product (``|y|^2`` does not change
the ranking of a row, so it is left out), then an exact top-k through group minima (one
vectorised pass instead of a per-row selection over ``N`` values). When the queries are the
points themselves the distance matrix is symmetric and each block is computed once, serving
its rows and its columns. Points are centred first (distances do not change, the
cancellation in the expansion shrinks), and winners at a distance that is small against
their norms get it recomputed from the vectors. The faiss backend offers the same exact
search (``index="flat"``) and approximate indexes (``"ivf"``, ``"hnsw"``) whose recall is
measured with :func:`neighbor_recall`, not assumed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from kexue.ops.logsumexp import compute_dtype

METRICS = ("euclidean", "cosine")
BACKENDS = ("auto", "torch", "faiss")
INDEXES = ("flat", "ivf", "hnsw")

# Rows of the distance block per chunk: about this many floats (64 MB in float32).
_BLOCK_FLOATS = 1 << 24
# Columns per block for large N (a multiple of 16 * _GROUP, see _torch_search).
_TILE = 16384
# Block side of the all-pairs search (a multiple of 16 * _GROUP); used from 2 blocks on.
_SYM_BLOCK = 2048
# Values per group of the selection (see _smallest_k): fewer means fewer scattered reads
# of candidates, more means fewer group minima to rank.
_GROUP = 16
# Winners closer than this share of their squared norms get their distance recomputed.
_RECOMPUTE = 1e-3


class Neighbors(NamedTuple):
    """``distances`` (M, k) in increasing order and ``indices`` (M, k) int64 into ``X``.

    Euclidean distances are ``|y - x|``, cosine distances ``1 - cos(y, x)``. An approximate
    index that finds fewer than ``k`` points fills the rest with index ``-1`` and distance
    ``inf``.
    """

    distances: Tensor
    indices: Tensor


def check_points(X: object, name: str = "X") -> Tensor:
    """``X`` as a 2-D floating tensor of finite values; errors name ``name``.

    Accepts a tensor or a NumPy array; integer input becomes float32, float16/bfloat16 are
    kept (they are searched in float32).
    """
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(X)
    if not isinstance(X, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a NumPy array, got {type(X).__name__}")
    if X.ndim != 2:
        hint = f" (use {name}[:, None] for N points of one feature)" if X.ndim == 1 else ""
        raise ValueError(
            f"{name} must be 2-D (N points, d features), got shape {tuple(X.shape)}{hint}"
        )
    if X.dtype == torch.bool or X.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {X.dtype}")
    if not X.is_floating_point():
        X = X.float()
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got {tuple(X.shape)}")
    if torch.isfinite(X.sum(dim=1)).all():  # one cheap pass; NaN/inf rows sum to NaN/inf
        return X
    bad = ~torch.isfinite(X).all(dim=1)  # exact check (a finite row can overflow its sum)
    if bad.any():
        rows = bad.nonzero().flatten()
        raise ValueError(
            f"{name} has NaN or infinite values in {len(rows)} row(s), the first at row "
            f"{int(rows[0])}; drop or impute them before the neighbour search"
        )
    return X


def _check_k(k: object, limit: int, why: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > limit:
        raise ValueError(f"k={k} is too large: {why}")
    return k


def _normalised(X: Tensor, name: str) -> Tensor:
    norms = X.norm(dim=1, keepdim=True)
    zero = (norms == 0).flatten()
    if zero.any():
        raise ValueError(
            f"{name} has {int(zero.sum())} all-zero row(s) (first: {int(zero.nonzero()[0])}); "
            "the cosine distance is undefined for them"
        )
    return X / norms


def _chunk_rows(chunk_size: int | None) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def _group_size(n_points: int, k: int) -> int:
    return max(1, min(_GROUP, n_points // k))


def _smallest_k(block: Tensor, k: int, group: int, dim: int = 1) -> tuple[Tensor, Tensor]:
    """Exact ``block.topk(k, dim, largest=False)`` through group minima, returned with the
    other dimension first: values and indices of shape ``(other, k)``.

    The entries of a row (``dim=1``) or column (``dim=0``) fall into ``G = size / group``
    groups (group ``g`` holds positions ``g, g + G, g + 2G, ...``; ``size`` must be a multiple
    of ``group``). The ``k`` groups with the smallest minima hold ``k`` values no larger than
    the largest of those minima ``m``, and every value of another group is at least its own
    minimum ``>= m``; so the ``k`` smallest values lie in those ``k`` groups (ties broken
    arbitrarily). The minima are one vectorised pass over the block, several times cheaper
    on a CPU than ``topk`` over every entry.
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
        dist = score if y_sq is None else score + y_sq[:, None]
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


@torch.no_grad()
def _torch_search(
    X: Tensor,
    Q: Tensor,
    k: int,
    metric: str,
    self_index: Tensor | None,
    rows_per_chunk: int | None,
) -> Neighbors:
    """Exact search of the rows of ``Q`` among the rows of ``X`` (same dtype and device).

    ``self_index[i]`` is the row of ``X`` that query ``i`` must not return (or None).
    One matrix product per chunk gives the ranking score of every pair: ``-y.x`` (cosine,
    unit rows) or ``|x|^2 - 2 y.x`` (euclidean, centred rows), the latter as
    ``[y, 1] . [-2 x, |x|^2]`` so no extra pass adds ``|x|^2``. Columns are padded with
    ``+inf`` scores to a multiple of the selection's group size (:func:`_smallest_k`). For
    large ``N`` the columns are taken ``_TILE`` at a time and the winners of the tiles merged,
    so a block stays about 64 MB and the gemm keeps many rows. The reported distances of
    the ``k`` winners are recomputed from the vectors.
    """
    n, d = X.shape
    group = _group_size(n, k)
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
    m, width = queries.shape[0], base.shape[0]
    tile = min(width, max(1, _TILE // (16 * group)) * 16 * group)  # whole groups
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
            score, top = _smallest_k(block, min(k, hi - lo), group)
            top += lo
            if best_s is None:
                best_s, best_i = score, top
            else:
                best_s, pick = torch.cat([best_s, score], 1).topk(k, dim=1, largest=False)
                best_i = torch.cat([best_i, top], 1).gather(1, pick)
        if metric == "cosine":
            vals = _winner_distances(best_s, best_i, q, base[:n], cosine=True)
        else:
            vals = _winner_distances(
                best_s,
                best_i,
                q[:, :d],
                base[:n, :d],
                cosine=False,
                scale=-0.5,
                y_sq=q_sq[start : start + len(q)],
                x_sq=base[:n, d],
            )
        vals, order = vals.sort(dim=1, stable=True)
        dist[start : start + len(q)] = vals
        idx[start : start + len(q)] = best_i.gather(1, order)
    return Neighbors(dist, idx)


@torch.no_grad()
def _symmetric_search(X: Tensor, k: int, metric: str, exclude_self: bool) -> Neighbors:
    """All points against all points, each distance block computed once.

    The score ``s(x, y)`` is symmetric: ``-x.y`` (cosine, unit rows) or the squared distance
    ``|x|^2 + |y|^2 - 2 x.y = [x, |x|^2, 1] . [-2 y, 1, |y|^2]`` (centred rows). The points
    are cut into blocks of ``_SYM_BLOCK``; only blocks ``(i, j)`` with ``j >= i`` are
    multiplied, and each off-diagonal block gives the rows of block ``i`` their candidates
    (by rows) and the rows of block ``j`` theirs (by columns), merged into running top-k
    lists. Half the matrix products of :func:`_torch_search`, the same selection work.
    """
    n, d = X.shape
    size = _SYM_BLOCK
    n_pad = -(-n // size) * size
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
    group = _GROUP
    best_s = torch.full((n_pad, k), math.inf, dtype=X.dtype, device=X.device)
    best_i = torch.full((n_pad, k), -1, dtype=torch.long, device=X.device)

    def merge(lo: int, score: Tensor, index: Tensor) -> None:
        hi = lo + len(score)
        both = torch.cat([best_s[lo:hi], score], 1)
        best_s[lo:hi], pick = both.topk(k, dim=1, largest=False, sorted=False)
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
                score, top = _smallest_k(block, k, group, dim=1)
                merge(lo_i, score, top + lo_j)
            else:
                score, top = _smallest_k(block, k, group, dim=1)
                merge(lo_i, score, top + lo_j)
                score, top = _smallest_k(block, k, group, dim=0)
                merge(lo_j, score, top + lo_i)
    best_s, best_i = best_s[:n], best_i[:n]
    if metric == "cosine":
        vals = _winner_distances(best_s, best_i, vectors, -vectors, cosine=True)
    else:
        vals = _winner_distances(best_s, best_i, vectors, vectors, cosine=False, x_sq=sq)
    vals, order = vals.sort(dim=1, stable=True)
    return Neighbors(vals, best_i.gather(1, order))


def _import_faiss():
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss ships with the hubness extra
        raise ImportError(
            "backend='faiss' needs faiss; install it with `pip install kexue[hubness]`"
        ) from err
    return faiss


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
) -> Neighbors:
    faiss = _import_faiss()
    X = X.detach().to("cpu", torch.float32)
    Q = X if Q is None else Q.detach().to("cpu", torch.float32)
    if metric == "cosine":  # the torch path's check: an all-zero row has no direction
        X = _normalised(X, "X")
        Q = X if Q is X else _normalised(Q, "Y")
    base, queries = X.numpy(), Q.numpy()
    base, queries = np.ascontiguousarray(base), np.ascontiguousarray(queries)
    built = _faiss_index(faiss, base, metric, index, params)
    extra = 1 if self_index is not None else 0
    dist, idx = built.search(queries, k + extra)
    if self_index is not None:
        own = self_index.cpu().numpy()[:, None]
        keep = idx != own
        no_self = keep.all(axis=1)
        keep[no_self, -1] = False  # the point was not found: drop the (k+1)-th instead
        dist = dist[keep].reshape(len(idx), k)
        idx = idx[keep].reshape(len(idx), k)
    missing = idx < 0
    if metric == "cosine":
        dist = np.clip(1.0 - dist, 0.0, None)
    else:
        dist = np.sqrt(np.clip(dist, 0.0, None))
    dist[missing] = np.inf
    out_dtype = compute_dtype(X.dtype)
    return Neighbors(
        torch.from_numpy(dist).to(device=X.device, dtype=out_dtype),
        torch.from_numpy(idx.astype(np.int64)).to(X.device),
    )


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
        computes in float32 whatever the input). Exact ties are broken arbitrarily.
        Approximate indexes may return fewer than ``k`` points (index ``-1``) and miss true
        neighbours: measure their recall with :func:`neighbor_recall` against
        ``knn(X, k, rows=sample)``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if index not in INDEXES:
        raise ValueError(f"index must be one of {INDEXES}, got {index!r}")
    if backend == "auto":
        backend = "torch" if index == "flat" else "faiss"
    if backend == "torch" and index != "flat":
        raise ValueError(f"index={index!r} is approximate and needs backend='faiss'")
    if index_params is not None and not isinstance(index_params, Mapping):
        raise TypeError(f"index_params must be a mapping, got {type(index_params).__name__}")
    if not isinstance(exclude_self, bool):
        raise TypeError(f"exclude_self must be a bool, got {type(exclude_self).__name__}")
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
    else:
        k = _check_k(k, n - 1, f"k must be < N = {n}, the number of rows of X")
        if rows is None:
            select = torch.arange(n, device=X.device)
            Q = X
        else:
            select = torch.as_tensor(rows, device=X.device)
            if select.ndim != 1 or select.dtype in (torch.bool, torch.float32, torch.float64):
                raise ValueError("rows must be a 1-D sequence of integer row indices of X")
            select = select.long()
            if len(select) and (select.min() < 0 or select.max() >= n):
                raise ValueError(f"rows must index X's {n} rows, got values outside [0, {n})")
            Q = X[select]
        if exclude_self:
            self_index = select
    work = torch.promote_types(compute_dtype(X.dtype), compute_dtype(Q.dtype))
    if backend == "faiss":
        queries = None if (Y is None and rows is None) else Q
        return _faiss_search(X, queries, k, metric, self_index, index, dict(index_params or {}))
    X, Q = X.to(work), Q.to(work)
    if Y is None and rows is None and chunk_size is None and n >= 2 * _SYM_BLOCK:
        return _symmetric_search(X, k, metric, exclude_self)
    return _torch_search(X, Q, k, metric, self_index, _chunk_rows(chunk_size))


def neighbor_recall(found: Tensor, exact: Tensor) -> float:
    """Recall ``|found_i ∩ exact_i| / k`` averaged over the queries ``i``.

    ``found`` (M, k_f) and ``exact`` (M, k) are neighbour index lists of the same queries
    (``-1`` entries of ``found`` never match). With exact ties in distance, an exact method
    can score below 1.
    """
    found, exact = torch.as_tensor(found), torch.as_tensor(exact)
    if found.ndim != 2 or exact.ndim != 2 or found.shape[0] != exact.shape[0]:
        raise ValueError(
            f"found and exact must be (M, k) index lists of the same queries, got "
            f"{tuple(found.shape)} and {tuple(exact.shape)}"
        )
    if exact.numel() == 0:
        raise ValueError("exact is empty")
    hits = (exact[:, :, None] == found[:, None, :]).any(dim=2)
    return float(hits.double().mean())
