"""Independent float64 references for the perturbed-argmax map, written from the note.

``p_i = integral phi(e) prod_{j != i} Phi(mu_i - mu_j + e) de`` (the integral over the noise
value ``e``, before the substitution ``u = Phi(e)`` that kexue uses), integrated with scipy's
adaptive Gauss–Kronrod quadrature (``quad_vec``, ``quad``) with scipy.stats densities and
CDFs; the kinks of the integrand (Laplace where an argument crosses 0, uniform where a factor
reaches 0 or 1) split the range into pieces integrated separately.
Nothing from kexue is used. Also: Monte Carlo frequencies with numpy's generator.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import integrate, stats

FAMILIES = {
    "gumbel": lambda width: stats.gumbel_r(),
    "normal": lambda width: stats.norm(),
    "logistic": lambda width: stats.logistic(),
    "laplace": lambda width: stats.laplace(),
    "uniform": lambda width: stats.uniform(0.0, width),
}


def reference_probs(mu, family: str, width: float = 1.0, tol: float = 1e-14) -> np.ndarray:
    """``p`` for one score vector ``mu`` (length n), float64.

    Smooth families: one vector-valued ``quad_vec`` over all classes. Laplace and uniform:
    class by class with ``quad`` on the pieces between the kinks of that class's integrand
    (where an argument ``mu_i - mu_j + e`` crosses 0, or ``w`` for uniform noise).
    """
    mu = np.asarray(mu, dtype=np.float64)
    dist = FAMILIES[family](width)
    d = mu[:, None] - mu[None, :]
    np.fill_diagonal(d, np.inf)  # Phi(inf) = 1 drops j = i from the product
    lo, hi = dist.support()
    if family not in ("laplace", "uniform"):

        def integrand(e: float) -> np.ndarray:
            with np.errstate(divide="ignore", over="ignore"):
                return np.exp(dist.logcdf(d + e).sum(1) + dist.logpdf(e))

        total = integrate.quad_vec(integrand, lo, hi, epsabs=tol, epsrel=tol, norm="max")[0]
        return total / total.sum()
    total = np.zeros(len(mu))
    for i, row in enumerate(d):
        kinks = -row[np.isfinite(row)]
        kinks = np.concatenate([kinks, kinks + width] if family == "uniform" else [kinks, [0.0]])
        edges = [lo, *sorted({float(k) for k in kinks if lo < k < hi}), hi]

        def integrand_i(e: float, row=row) -> float:
            with np.errstate(divide="ignore"):
                return float(np.exp(dist.logcdf(row + e).sum() + dist.logpdf(e)))

        total[i] = sum(
            integrate.quad(integrand_i, a, b, epsabs=tol, epsrel=tol, limit=200)[0]
            for a, b in itertools.pairwise(edges)
        )
    return total / total.sum()


def monte_carlo_frequencies(
    mu, family: str, samples: int, seed: int, width: float = 1.0, chunk: int = 100_000
) -> np.ndarray:
    """Frequencies of ``argmax(mu + eps)`` over ``samples`` draws (numpy's PCG64)."""
    mu = np.asarray(mu, dtype=np.float64)
    dist = FAMILIES[family](width)
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(mu))
    done = 0
    while done < samples:
        m = min(chunk, samples - done)
        eps = dist.rvs(size=(m, len(mu)), random_state=rng)
        counts += np.bincount((mu + eps).argmax(1), minlength=len(mu))
        done += m
    return counts / samples
