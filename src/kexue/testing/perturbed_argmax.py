"""Independent float64 references for perturbed-argmax maps (``docs/guides/distributions.md``).

``p_i = P[argmax_j (mu_j + eps_j) = i]`` for i.i.d. noise with density ``f`` and CDF ``F``, by
scipy's adaptive Gauss–Kronrod quadrature (``quad_vec``, ``quad``) with scipy.stats densities
and CDFs, and by Monte Carlo with numpy's generator. Nothing from kexue's distributions is used.

- :func:`reference_probs`: the integral over the noise value ``e`` of class ``i``,
  ``p_i = int f(e) prod_{j != i} F(mu_i - mu_j + e) de``, with the product written out
  (``O(n^2)`` per evaluation: n up to about 1,000).
- :func:`reference_prob_gradient`: the gradient of ``sum_i w_i p_i`` by central differences
  of :func:`reference_probs`.
- :func:`reference_probs_large`: the same integral over the value ``y = mu_i + e`` of the
  maximum, ``p_i = int f(y - mu_i) prod_{j != i} F(y - mu_j) dy``, the product over ``j != i``
  formed as ``exp(sum_j log F(y - mu_j) - log F(y - mu_i))`` (``O(n)`` per evaluation: n of
  10,000 and more). The tests check it against :func:`reference_probs` where both run.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from kexue.extras import require

__all__ = [
    "FAMILIES",
    "monte_carlo_frequencies",
    "reference_prob_gradient",
    "reference_probs",
    "reference_probs_large",
]

_integrate = require("scipy.integrate", "dev", "kexue.testing")
_stats = require("scipy.stats", "dev", "kexue.testing")
_optimize = require("scipy.optimize", "dev", "kexue.testing")

FAMILIES = {
    "gumbel": lambda width: _stats.gumbel_r(),
    "normal": lambda width: _stats.norm(),
    "logistic": lambda width: _stats.logistic(),
    "laplace": lambda width: _stats.laplace(),
    "uniform": lambda width: _stats.uniform(0.0, width),
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
    np.fill_diagonal(d, np.inf)  # F(inf) = 1 drops j = i from the product
    lo, hi = dist.support()
    if family not in ("laplace", "uniform"):

        def integrand(e: float) -> np.ndarray:
            with np.errstate(divide="ignore", over="ignore"):
                return np.exp(dist.logcdf(d + e).sum(1) + dist.logpdf(e))

        total = _integrate.quad_vec(integrand, lo, hi, epsabs=tol, epsrel=tol, norm="max")[0]
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
            _integrate.quad(integrand_i, a, b, epsabs=tol, epsrel=tol, limit=200)[0]
            for a, b in itertools.pairwise(edges)
        )
    return total / total.sum()


def reference_prob_gradient(mu, w, family: str, step: float = 1e-4) -> np.ndarray:
    """``d/dmu_l sum_i w_i p_i`` for one score vector, by central differences of
    :func:`reference_probs` (truncation error ``O(step^2)``, about 1e-8 at the default step;
    the references' own error, 1e-14, divided by the step adds 1e-10)."""
    mu = np.asarray(mu, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    grad = np.empty_like(mu)
    for j in range(len(mu)):
        e = np.zeros_like(mu)
        e[j] = step
        up = reference_probs(mu + e, family) @ w
        down = reference_probs(mu - e, family) @ w
        grad[j] = (up - down) / (2 * step)
    return grad


def reference_probs_large(mu, family: str, tol: float = 1e-13) -> np.ndarray:
    """``p`` for one score vector ``mu`` with many classes (normal, logistic, Laplace, Gumbel).

    Integrates ``f(y - mu_i) exp(log P(y) - log F(y - mu_i))`` over ``y`` with
    ``log P(y) = sum_j log F(y - mu_j)`` (the CDF of the maximum), between the point where
    ``log P = -745`` (below it every integrand is under ``1e-320``) and the point where the top
    class's upper tail ``1 - F(y - max mu)`` falls below ``1e-18``. For Laplace noise the kinks
    of the integrands inside that range (``y = mu_j``) are passed to ``quad_vec`` as
    breakpoints.
    """
    if family not in ("gumbel", "normal", "logistic", "laplace"):
        raise ValueError(f"reference_probs_large supports unbounded families, got {family!r}")
    mu = np.asarray(mu, dtype=np.float64)
    dist = FAMILIES[family](1.0)

    def log_p(y: float) -> float:
        return float(dist.logcdf(y - mu).sum())

    top = float(mu.max())
    hi = top + float(dist.isf(1e-18))
    step = 1.0
    while log_p(top - step) > -745.0:  # log P increases with y: bracket its level -745
        step *= 2.0
    lo = _optimize.brentq(lambda y: log_p(y) + 745.0, top - step, hi, xtol=1e-12)
    points = None
    if family == "laplace":
        inside = np.unique(mu[(mu > lo) & (mu < hi)])
        points = [float(v) for v in inside] or None

    def integrand(y: float) -> np.ndarray:
        x = y - mu
        log_f = dist.logcdf(x)
        return np.exp(dist.logpdf(x) + (log_f.sum() - log_f))

    total = _integrate.quad_vec(
        integrand, lo, hi, epsabs=tol, epsrel=tol, norm="max", points=points, limit=10_000
    )[0]
    if not math.isfinite(float(total.sum())) or total.sum() <= 0:
        raise FloatingPointError("reference_probs_large: the integral did not converge")
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
