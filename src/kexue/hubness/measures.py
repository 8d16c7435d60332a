"""k-occurrence and the hubness measures of its distribution, and the ``Hubness`` estimator.

Notation of ``docs/guides/hubness.md`` ("k-occurrence", "Measures"): the k-occurrence (hub
value) ``N_k(x)`` of a point ``x`` is the number of queries that have ``x`` among their ``k``
nearest neighbours; over the ``N`` points of ``X`` queried by themselves,
``sum_x N_k(x) = N k`` and the mean is ``k``. Every measure below is a function of the vector
``N_k`` (written ``n`` in formulas, ``mu`` its mean), computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kexue.hubness.knn import knn
from kexue.validation import check_count, check_real

__all__ = [
    "MEASURES",
    "Hubness",
    "HubnessScores",
    "antihub_occurrence",
    "atkinson_index",
    "gini_index",
    "hub_mask",
    "hub_occurrence",
    "hubness_scores",
    "k_occurrence",
    "k_skewness",
    "occurrence_counts",
    "robin_hood_index",
]

MEASURES = (
    "k_skewness",
    "robin_hood",
    "gini",
    "atkinson",
    "hub_occurrence",
    "antihub_occurrence",
)


def occurrence_counts(indices: Tensor, n_points: int) -> Tensor:
    """``N_k``: how often each of ``n_points`` appears in the neighbour lists ``indices``.

    ``indices`` (M, k) of integers in ``[0, n_points)``; ``-1`` (a slot an approximate index
    left empty) is not counted. Returns an int64 tensor of shape (n_points,).
    """
    n_points = check_count(n_points, "n_points")
    indices = torch.as_tensor(indices)
    if indices.ndim != 2 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an (M, k) integer tensor, got {tuple(indices.shape)}")
    flat = indices.flatten().long()
    flat = flat[flat >= 0]
    if flat.numel() and int(flat.max()) >= n_points:
        raise ValueError(f"indices hold {int(flat.max())}, not a row of {n_points} points")
    return torch.bincount(flat, minlength=n_points)


def k_occurrence(X: Tensor | np.ndarray, k: int, **knn_kwargs: Any) -> Tensor:
    """``N_k(x)`` for every row ``x`` of ``X``: int64 tensor of shape (N,).

    One :func:`~kexue.hubness.knn` search (same keyword arguments), then a count of each
    point's appearances in the ``k``-neighbour lists. By default a point is excluded from its
    own list, so ``sum N_k = N k``. ``exclude_self=False`` reproduces the convention of the
    hub-prior GAN paper's code, where each point is its own first neighbour: every count is
    then ``1 + N_{k-1}`` of the self-excluded search (with distinct points). With separate
    queries ``Y=...`` the counts are over the ``M`` queries' lists (``sum N_k = M k``).
    """
    found = knn(X, k, **knn_kwargs)
    return occurrence_counts(found.indices, int(X.shape[0]))


def _counts(n_k: Tensor | np.ndarray | Sequence[int], name: str = "n_k") -> np.ndarray:
    n = np.asarray(n_k.cpu() if isinstance(n_k, Tensor) else n_k)
    if n.ndim != 1 or n.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector of counts, got shape {n.shape}")
    if not np.issubdtype(n.dtype, np.number) or np.issubdtype(n.dtype, np.complexfloating):
        raise TypeError(f"{name} must hold numbers, got dtype {n.dtype}")
    n = n.astype(np.float64)
    if not np.isfinite(n).all() or (n < 0).any():
        raise ValueError(f"{name} must hold finite non-negative counts")
    if n.sum() == 0:
        raise ValueError(f"{name} is all zeros: no neighbour list was counted")
    return n


def k_skewness(n_k: Tensor | np.ndarray | Sequence[int]) -> float:
    """Sample skewness ``m_3 / m_2^{3/2}`` of ``N_k``, with ``m_j = mean((n - mu)^j)``.

    The standard hubness score (``scipy.stats.skew`` with ``bias=True``): about 0 for
    low-dimensional uniform-looking data, large and positive when a few hubs dominate.
    A constant ``N_k`` (no spread, ``0/0``) is given skewness 0.
    """
    n = _counts(n_k)
    c = n - n.mean()
    m2, m3 = np.mean(c**2), np.mean(c**3)
    if m2 <= 1e-300:
        return 0.0
    return float(m3 / m2**1.5)


def robin_hood_index(n_k: Tensor | np.ndarray | Sequence[int]) -> float:
    """Robin Hood (Hoover) index ``sum |n - mu| / (2 sum n)``, in ``[0, 1)``.

    The share of all neighbour-list slots that would have to move from hubs to anti-hubs for
    every point to be a neighbour equally often.
    """
    n = _counts(n_k)
    return float(np.abs(n - n.mean()).sum() / (2.0 * n.sum()))


def gini_index(n_k: Tensor | np.ndarray | Sequence[int]) -> float:
    """Gini coefficient ``sum_i sum_j |n_i - n_j| / (2 N sum n)``, in ``[0, 1)``.

    Computed from the sorted counts as ``sum_i (2i - N - 1) n_(i) / (N sum n)``
    (``i = 1..N``), which equals the double sum in O(N log N).
    """
    n = np.sort(_counts(n_k))
    size = n.size
    i = np.arange(1, size + 1, dtype=np.float64)
    return float(((2 * i - size - 1) * n).sum() / (size * n.sum()))


def atkinson_index(n_k: Tensor | np.ndarray | Sequence[int], eps: float = 0.5) -> float:
    """Atkinson index ``1 - mean(n^{1 - eps})^{1 / (1 - eps)} / mu`` (``eps != 1``), or
    ``1 - (prod n)^{1/N} / mu`` at ``eps = 1``; in ``[0, 1]``.

    ``eps >= 0`` sets how much weight the smallest counts get (0: none, the index is 0).
    With ``eps >= 1`` a single anti-hub (``n = 0``) makes the index 1.
    """
    eps = check_real(eps, "eps", low=0.0)
    n = _counts(n_k)
    mu = n.mean()
    if eps == 1:
        if (n == 0).any():
            return 1.0
        return float(1.0 - math.exp(np.log(n).mean()) / mu)
    if eps > 1 and (n == 0).any():
        return 1.0  # mean(n^{1-eps}) = inf
    return float(1.0 - np.mean(n ** (1.0 - eps)) ** (1.0 / (1.0 - eps)) / mu)


def _check_hub_size(hub_size: object) -> float:
    return check_real(hub_size, "hub_size", low=0.0, low_open=True)


def hub_mask(n_k: Tensor, k: int, hub_size: float = 2.0) -> Tensor:
    """Hubs: ``N_k >= hub_size * k`` (boolean tensor).

    This is scikit-hubness's code and issue #7's definition; the reference note's "``N_k >
    2k``" is the same rule with ``hub_size = (2k + 1) / k`` (counts are integers).
    """
    return torch.as_tensor(n_k) >= _check_hub_size(hub_size) * check_count(k, "k")


def hub_occurrence(
    n_k: Tensor | np.ndarray | Sequence[int],
    k: int,
    *,
    hub_size: float = 2.0,
    n_queries: int | None = None,
) -> float:
    """Share of the ``M k`` neighbour-list slots taken by hubs: ``sum_{hubs} n / (M k)``.

    Hubs are the points with ``N_k >= hub_size * k`` (see :func:`hub_mask`). ``n_queries``
    ``M`` defaults to ``sum n / k`` (every query contributed ``k`` slots).
    """
    n = _counts(n_k)
    k = check_count(k, "k")
    hub_size = _check_hub_size(hub_size)
    m = n.sum() / k if n_queries is None else n_queries
    if not m > 0:
        raise ValueError(f"n_queries must be positive, got {n_queries!r}")
    return float(n[n >= hub_size * k].sum() / (m * k))


def antihub_occurrence(n_k: Tensor | np.ndarray | Sequence[int]) -> float:
    """Share of points that are nobody's neighbour: ``#{x : N_k(x) = 0} / N``."""
    n = _counts(n_k)
    return float((n == 0).mean())


@dataclass(frozen=True)
class HubnessScores:
    """Every measure of one ``N_k`` vector, for one ``k``."""

    k: int
    k_skewness: float
    robin_hood: float
    gini: float
    atkinson: float
    hub_occurrence: float
    antihub_occurrence: float
    n_hubs: int
    n_antihubs: int
    max_occurrence: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def hubness_scores(
    n_k: Tensor | np.ndarray | Sequence[int],
    k: int,
    *,
    hub_size: float = 2.0,
    atkinson_eps: float = 0.5,
    n_queries: int | None = None,
) -> HubnessScores:
    """All measures of ``N_k`` at once (see the functions of the same names)."""
    n = torch.as_tensor(np.asarray(n_k.cpu() if isinstance(n_k, Tensor) else n_k))
    return HubnessScores(
        k=check_count(k, "k"),
        k_skewness=k_skewness(n),
        robin_hood=robin_hood_index(n),
        gini=gini_index(n),
        atkinson=atkinson_index(n, atkinson_eps),
        hub_occurrence=hub_occurrence(n, k, hub_size=hub_size, n_queries=n_queries),
        antihub_occurrence=antihub_occurrence(n),
        n_hubs=int(hub_mask(n, k, hub_size).sum()),
        n_antihubs=int((n == 0).sum()),
        max_occurrence=int(n.max()),
    )


class Hubness:
    """Hubness of a point set for one or several ``k`` from a single neighbour search.

    Parameters are only stored here and checked by :meth:`fit` (scikit-learn style).

    Args:
        k: neighbourhood size, or a sequence of sizes; the search runs once with the
            largest and the lists are cut for the others.
        metric: ``"euclidean"`` or ``"cosine"``.
        hub_size: hubs are points with ``N_k >= hub_size * k``.
        atkinson_eps: the ``eps`` of :func:`atkinson_index`.
        exclude_self, backend, chunk_size, index, index_params: passed to
            :func:`~kexue.hubness.knn`.

    Attributes (after ``fit``):
        k_values_: the sizes, increasing (tuple of int).
        k_occurrence_: int64 tensor (len(k_values_), N), row ``i`` is ``N_k`` for
            ``k = k_values_[i]``.
        neighbors_: the :class:`Neighbors` of the largest ``k``.
        scores_: ``{k: HubnessScores}``.
        n_samples_in_, n_features_in_: the shape of ``X``.

    Example:
        >>> hub = Hubness(k=(5, 10)).fit(torch.randn(2000, 256))
        >>> hub.score()                    # k-skewness at k = 5
        >>> hub.score("robin_hood", k=10)
    """

    def __init__(
        self,
        k: int | Sequence[int] = 10,
        *,
        metric: str = "euclidean",
        hub_size: float = 2.0,
        atkinson_eps: float = 0.5,
        exclude_self: bool = True,
        backend: str = "auto",
        chunk_size: int | None = None,
        index: str = "flat",
        index_params: dict[str, Any] | None = None,
    ) -> None:
        self.k = k
        self.metric = metric
        self.hub_size = hub_size
        self.atkinson_eps = atkinson_eps
        self.exclude_self = exclude_self
        self.backend = backend
        self.chunk_size = chunk_size
        self.index = index
        self.index_params = index_params

    def __repr__(self) -> str:
        return (
            f"Hubness(k={self.k!r}, metric={self.metric!r}, hub_size={self.hub_size!r}, "
            f"backend={self.backend!r}, index={self.index!r})"
        )

    def _k_values(self) -> tuple[int, ...]:
        ks = [self.k] if isinstance(self.k, int | np.integer) else self.k
        if isinstance(self.k, bool) or not isinstance(ks, Sequence) or len(ks) == 0:
            raise ValueError(f"k must be a positive int or a non-empty sequence, got {self.k!r}")
        return tuple(sorted({check_count(v, "k") for v in ks}))

    def fit(self, X: Tensor | np.ndarray, y: None = None) -> Hubness:
        """Search the neighbours of every point of ``X`` (N, d) and compute every measure.

        ``y`` is ignored (scikit-learn convention). Returns ``self``.
        """
        ks = self._k_values()
        _check_hub_size(self.hub_size)  # the metric is checked by knn before any work
        atkinson_index([1, 2], self.atkinson_eps)  # validates atkinson_eps
        found = knn(
            X,
            ks[-1],
            metric=self.metric,
            exclude_self=self.exclude_self,
            backend=self.backend,
            chunk_size=self.chunk_size,
            index=self.index,
            index_params=self.index_params,
        )
        n = int(X.shape[0])
        counts = torch.stack([occurrence_counts(found.indices[:, :k], n) for k in ks])
        self.k_values_ = ks
        self.neighbors_ = found
        self.k_occurrence_ = counts
        self.scores_ = {
            k: hubness_scores(
                c, k, hub_size=self.hub_size, atkinson_eps=self.atkinson_eps, n_queries=n
            )
            for k, c in zip(ks, counts, strict=True)
        }
        self.n_samples_in_ = n
        self.n_features_in_ = int(X.shape[1])
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "scores_"):
            from kexue.exceptions import NotFittedError  # scikit-learn's: imported when needed

            raise NotFittedError("this Hubness is not fitted yet; call fit(X) first")

    def _row(self, k: int | None) -> int:
        self._check_fitted()
        if k is None:
            return 0
        if k not in self.k_values_:
            raise ValueError(f"k={k!r} was not fitted; fitted k values: {self.k_values_}")
        return self.k_values_.index(k)

    def score(self, measure: str = "k_skewness", k: int | None = None) -> float:
        """One measure (one of ``MEASURES``) at ``k`` (default: the smallest fitted ``k``)."""
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
        row = self._row(k)
        return float(getattr(self.scores_[self.k_values_[row]], measure))

    def k_occurrence(self, k: int | None = None) -> Tensor:
        """``N_k`` of every point (int64, shape (N,)) at ``k`` (default: the smallest)."""
        return self.k_occurrence_[self._row(k)]

    def hubs(self, k: int | None = None) -> Tensor:
        """Indices of the hubs (``N_k >= hub_size * k``), by decreasing ``N_k``."""
        row = self._row(k)
        n = self.k_occurrence_[row]
        idx = hub_mask(n, self.k_values_[row], self.hub_size).nonzero().flatten()
        return idx[n[idx].argsort(descending=True, stable=True)]

    def antihubs(self, k: int | None = None) -> Tensor:
        """Indices of the anti-hubs (``N_k = 0``), increasing."""
        return (self.k_occurrence_[self._row(k)] == 0).nonzero().flatten()
