"""Independent float64 NumPy references for the hubness tests (no kexue code)."""

from __future__ import annotations

import numpy as np


def brute_force_neighbors(
    X: np.ndarray, k: int, *, Y: np.ndarray | None = None, metric: str = "euclidean"
) -> tuple[np.ndarray, np.ndarray]:
    """Full float64 distance matrix by broadcasting, a stable argsort per row."""
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
    _, order = brute_force_neighbors(X, k, **kwargs)
    counts = np.zeros(len(X), dtype=np.int64)
    for row in order:
        for j in row:
            counts[j] += 1
    return counts


def smallest_gap(X: np.ndarray, k: int) -> float:
    """Smallest relative gap between the k-th and (k+1)-th neighbour distance of any row:
    the float32 search can only disagree with float64 where this is tiny."""
    D = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(D, np.inf)
    part = np.sort(D, axis=1)[:, : k + 1]
    return float((np.diff(part, axis=1) / part[:, 1:]).min())
