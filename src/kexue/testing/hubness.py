"""Independent references for :mod:`kexue.hubness`: float64 NumPy brute force, no kexue code.

- :func:`brute_force_neighbors`: the full float64 distance matrix by broadcasting and a stable
  argsort per row, so exact ties go to the smaller index (the rule ``knn`` promises);
- :func:`brute_force_k_occurrence`: ``N_k`` counted one neighbour list entry at a time;
- :func:`textbook_measures`: skewness, Robin Hood, Gini (double sum), hub and anti-hub
  occurrence straight from their definitions (``docs/guides/hubness.md``, "Measures");
- :func:`hub_prior_by_hand`: the hub-prior sampler's rounds replayed with the brute-force counts;
- :func:`smallest_gap` and :func:`tied_points`: test data with, and without, near-ties.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "brute_force_k_occurrence",
    "brute_force_neighbors",
    "hub_prior_by_hand",
    "smallest_gap",
    "textbook_measures",
    "tied_points",
]


def brute_force_neighbors(
    X: np.ndarray, k: int, *, Y: np.ndarray | None = None, metric: str = "euclidean"
) -> tuple[np.ndarray, np.ndarray]:
    """``(distances, indices)`` of the ``k`` nearest rows of ``X`` for each query (float64).

    Queries are ``Y`` or, by default, the rows of ``X`` with each row excluded from its own
    list. Ties in distance are broken towards the smaller index (stable argsort).
    """
    X = np.asarray(X, dtype=np.float64)
    Q = X if Y is None else np.asarray(Y, dtype=np.float64)
    if metric == "euclidean":
        D = np.sqrt(((Q[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    else:
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
        D = 1.0 - Qn @ Xn.T
    if Y is None:
        np.fill_diagonal(D, np.inf)
    order = np.argsort(D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, order, axis=1), order


def brute_force_k_occurrence(X: np.ndarray, k: int, **kwargs) -> np.ndarray:
    """``N_k`` of every row of ``X``: one increment per entry of every neighbour list."""
    _, order = brute_force_neighbors(X, k, **kwargs)
    counts = np.zeros(len(X), dtype=np.int64)
    for row in order:
        for j in row:
            counts[j] += 1
    return counts


def textbook_measures(n_k, k: int, hub_size: float = 2.0) -> dict[str, float]:
    """The measures of ``N_k`` from their definitions, with Python floats and loops."""
    n = [float(v) for v in np.asarray(n_k).ravel()]
    size, total = len(n), sum(n)
    mu = total / size
    m2 = sum((v - mu) ** 2 for v in n) / size
    m3 = sum((v - mu) ** 3 for v in n) / size
    return {
        "k_skewness": m3 / m2**1.5 if m2 > 0 else 0.0,
        "robin_hood": sum(abs(v - mu) for v in n) / (2 * total),
        "gini": sum(abs(a - b) for a in n for b in n) / (2 * size * total),
        "hub_occurrence": sum(v for v in n if v >= hub_size * k) / total,
        "antihub_occurrence": sum(1 for v in n if v == 0) / size,
    }


def hub_prior_by_hand(
    seed: int, n: int, dim: int, *, k: int, threshold: int, pool_size: int
) -> tuple[torch.Tensor, np.ndarray, int]:
    """The first ``n`` float64 candidates ``z ~ N(0, I)`` (drawn in pools of ``pool_size``
    from ``torch.Generator().manual_seed(seed)``) whose brute-force ``N_k`` within their pool
    is at least ``threshold``: ``(latents, their N_k, rounds drawn)``."""
    gen = torch.Generator().manual_seed(seed)
    kept: list[torch.Tensor]
    values: list[np.ndarray]
    kept, values, rounds = [], [], 0
    while sum(len(v) for v in values) < n:
        pool = torch.randn(pool_size, dim, generator=gen, dtype=torch.float64)
        counts = brute_force_k_occurrence(pool.numpy(), k)
        keep = np.flatnonzero(counts >= threshold)
        kept.append(pool[keep])
        values.append(counts[keep])
        rounds += 1
    return torch.cat(kept)[:n], np.concatenate(values)[:n], rounds


def smallest_gap(X: np.ndarray, k: int) -> float:
    """Smallest relative gap between the k-th and (k+1)-th neighbour distance of any row:
    a float32 search can only disagree with float64 where this is tiny."""
    D = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(D, np.inf)
    part = np.sort(D, axis=1)[:, : k + 1]
    return float((np.diff(part, axis=1) / part[:, 1:]).min())


def tied_points(n: int, d: int, levels: int = 3, seed: int = 0) -> np.ndarray:
    """``n`` points of ``{0, ..., levels - 1}^d`` (float32): squared distances are small
    integers, so most neighbour lists end in exact ties."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, levels, size=(n, d)).astype(np.float32)
