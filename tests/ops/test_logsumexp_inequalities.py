"""Property tests (float64) of the six inequalities of ``docs/guides/ops.md``.

Every expected value is computed in float64 by ``kexue.testing.logsumexp`` (``math.fsum`` over
explicit terms), never with the library. Tolerances: a non-strict inequality may be violated by
``1e-12`` times the magnitude of the quantities involved (rounding); a strict inequality is only
asserted when the true gap is several ulps wide, i.e. representable in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kexue.ops import logsumexp, logsumexp_bounds, logsumexp_lower_bound, smooth_max
from kexue.testing.logsumexp import lse_terms, renyi_entropy_ref, weighted_sum_ref

N_EXAMPLES = 1000
REL = 1e-12

_base = st.floats(-50.0, 50.0, allow_nan=False, allow_infinity=False)
_scales = st.sampled_from([1.0, 1.0, 1.0, 1e-6, 1e-2, 20.0, 1e3])


@st.composite
def vectors(draw, min_size: int = 1, max_size: int = 64, size: int | None = None) -> np.ndarray:
    """float64 vectors of length 1..64 with entries in [-50, 50], sometimes rescaled."""
    n = size if size is not None else draw(st.integers(min_size, max_size))
    base = draw(hnp.arrays(np.float64, n, elements=_base))
    return base * draw(_scales)


@st.composite
def vector_and_probs(draw) -> tuple[np.ndarray, np.ndarray]:
    """A vector x and a probability vector p of the same length (zeros allowed)."""
    x = draw(vectors())
    raw = draw(
        hnp.arrays(
            np.float64,
            len(x),
            elements=st.one_of(st.just(0.0), st.floats(0.0, 1.0), st.floats(1e-8, 1e-3)),
        )
    )
    if raw.sum() <= 0.0:
        raw[draw(st.integers(0, len(x) - 1))] = 1.0
    return x, raw / raw.sum()


def _slack(*values: float) -> float:
    """Rounding slack: 1e-12 relative to the magnitude of the quantities compared."""
    return REL * max(sum(abs(v) for v in values), 1e-300)


def _visible(gap: float, *magnitudes: float) -> bool:
    """True when a true gap is wide enough (16 ulps) to survive float64 rounding."""
    return gap > 16 * float(np.spacing(max(*(abs(m) for m in magnitudes), 1.0)))


def _second_gap(x: np.ndarray) -> float:
    """Distance from the max to the next entry (0 if the max is tied)."""
    s = np.sort(x)
    return float(s[-1] - s[-2])


def _lse(x: np.ndarray) -> float:
    return logsumexp(torch.from_numpy(x)).item()


# 1. Basic bounds -----------------------------------------------------------------------------


@settings(max_examples=N_EXAMPLES)
@given(x=vectors())
def test_basic_bounds(x: np.ndarray) -> None:
    n, x_max = len(x), float(np.max(x))
    lse = _lse(x)
    lower, upper = logsumexp_bounds(torch.from_numpy(x))
    assert lower.item() == x_max
    assert abs(upper.item() - (x_max + math.log(n))) <= _slack(x_max, math.log(n))
    tol = _slack(x_max, math.log(n))
    assert x_max - tol <= lse <= x_max + math.log(n) + tol
    assert abs(lse - lse_terms(x)) <= tol
    if n >= 2:
        gap = math.log1p(math.exp(-_second_gap(x)))  # lse - x_max >= this
        if _visible(gap, x_max):
            assert lse > x_max
        # Right side is an equality only when all entries are equal.
        spread = float(x_max - np.min(x))
        deficit = math.log(n) - math.log(n - 1 + math.exp(-spread))
        if _visible(deficit, x_max, math.log(n)):
            assert lse < x_max + math.log(n)


@settings(max_examples=N_EXAMPLES // 2)
@given(c=st.floats(-1e4, 1e4, allow_nan=False), n=st.integers(1, 64))
def test_equal_entries_reach_the_upper_bound(c: float, n: int) -> None:
    x = np.full(n, c)
    lse = _lse(x)
    assert abs(lse - (c + math.log(n))) <= _slack(c, math.log(n))
    upper = logsumexp_bounds(torch.from_numpy(x)).upper.item()
    assert abs(lse - upper) <= _slack(c, math.log(n))


# 2. Temperature ------------------------------------------------------------------------------


@settings(max_examples=N_EXAMPLES)
@given(x=vectors(), log_tau=st.floats(-3.0, 3.0))
def test_temperature_bound(x: np.ndarray, log_tau: float) -> None:
    tau = 10.0**log_tau
    n, x_max = len(x), float(np.max(x))
    sm = smooth_max(torch.from_numpy(x), tau=tau).item()
    ref = tau * lse_terms(x / tau)
    tol = _slack(x_max, tau * math.log(n), tau)
    assert abs(sm - ref) <= tol
    assert x_max - tol <= sm <= x_max + tau * math.log(n) + tol
    if n >= 2:
        gap = tau * math.log1p(math.exp(-_second_gap(x) / tau))
        if _visible(gap, x_max, tau):
            assert sm > x_max


@settings(max_examples=N_EXAMPLES)
@given(x=vectors(), log_err=st.floats(-6.0, 1.0))
def test_smooth_max_with_max_error(x: np.ndarray, log_err: float) -> None:
    err = 10.0**log_err
    n, x_max = len(x), float(np.max(x))
    sm = smooth_max(torch.from_numpy(x), max_error=err).item()
    tol = _slack(x_max, err)
    if n == 1:
        assert abs(sm - x_max) <= tol
        return
    # The documented temperature: tau = max_error / log n.
    tau = err / math.log(n)
    assert abs(sm - tau * lse_terms(x / tau)) <= tol
    assert x_max - tol <= sm <= x_max + err + tol
    gap = tau * math.log1p(math.exp(-_second_gap(x) / tau))
    if _visible(gap, x_max, tau):
        assert sm > x_max


# 3. Mean bound -------------------------------------------------------------------------------


@settings(max_examples=N_EXAMPLES)
@given(x=vectors())
def test_mean_bound(x: np.ndarray) -> None:
    n = len(x)
    mean = math.fsum(x) / n
    lse = _lse(x)
    tol = _slack(float(np.max(np.abs(x))), math.log(n))
    assert lse >= mean + math.log(n) - tol
    # With a uniform p the weighted bound is the mean bound.
    uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
    for order in (1.0, 2.0, 3.5, math.inf):
        bound = logsumexp_lower_bound(torch.from_numpy(x), uniform, order=order).item()
        assert abs(bound - (mean + math.log(n))) <= tol


# 4. Weighted bounds --------------------------------------------------------------------------


def _check_weighted_bound(x: np.ndarray, p: np.ndarray, order: float) -> float:
    """Checks the library's bound against numpy and against lse; returns the bound."""
    ref = weighted_sum_ref(x, p) + renyi_entropy_ref(p, order)
    got = logsumexp_lower_bound(torch.from_numpy(x), torch.from_numpy(p), order=order).item()
    tol = _slack(float(np.max(np.abs(x))), math.log(len(x)), 1.0)
    assert abs(got - ref) <= tol
    assert _lse(x) >= got - tol
    return got


@settings(max_examples=N_EXAMPLES)
@given(xp=vector_and_probs())
def test_cauchy_schwarz_bound(xp: tuple[np.ndarray, np.ndarray]) -> None:
    x, p = xp
    bound = _check_weighted_bound(x, p, 2.0)
    # The explicit form of the reference: sum p x - log sum p^2.
    explicit = weighted_sum_ref(x, p) - math.log(math.fsum(p**2))
    assert abs(bound - explicit) <= _slack(float(np.max(np.abs(x))), 1.0)


@settings(max_examples=N_EXAMPLES)
@given(xp=vector_and_probs(), t=st.floats(1.01, 30.0))
def test_holder_bound_and_order_monotonicity(xp: tuple[np.ndarray, np.ndarray], t: float) -> None:
    x, p = xp
    b_t = _check_weighted_bound(x, p, t)
    b_1 = _check_weighted_bound(x, p, 1.0)
    b_inf = _check_weighted_bound(x, p, math.inf)
    # Renyi entropy decreases with the order: the Shannon bound is the best of the family.
    tol = _slack(float(np.max(np.abs(x))), math.log(len(x)), 1.0)
    assert b_inf <= b_t + tol
    assert b_t <= b_1 + tol


@settings(max_examples=N_EXAMPLES)
@given(xp=vector_and_probs())
def test_shannon_bound_gap_is_kl(xp: tuple[np.ndarray, np.ndarray]) -> None:
    x, p = xp
    bound = _check_weighted_bound(x, p, 1.0)
    lse_ref = lse_terms(x)
    nz = p > 0
    log_q = x[nz] - lse_ref  # log softmax(x), computed independently
    kl = math.fsum(p[nz] * (np.log(p[nz]) - log_q))
    tol = _slack(float(np.max(np.abs(x))), math.log(len(x)), 1.0)
    assert kl >= -tol
    assert abs((_lse(x) - bound) - kl) <= tol


@settings(max_examples=N_EXAMPLES // 2)
@given(x=vectors())
def test_shannon_bound_tight_at_softmax(x: np.ndarray) -> None:
    e = np.exp(x - np.max(x))
    p = e / e.sum()
    bound = _check_weighted_bound(x, p, 1.0)
    assert abs(_lse(x) - bound) <= _slack(float(np.max(np.abs(x))), math.log(len(x)), 1.0)


# 5. Lipschitz in the max-norm ----------------------------------------------------------------


@st.composite
def vector_pairs(draw) -> tuple[np.ndarray, np.ndarray]:
    x = draw(vectors())
    if draw(st.booleans()):
        y = draw(vectors(size=len(x)))
    else:  # nearby points: the ratio |lse(x) - lse(y)| / ||x - y|| is closest to 1 here
        delta = draw(hnp.arrays(np.float64, len(x), elements=st.floats(-1.0, 1.0)))
        y = x + delta * draw(st.sampled_from([1e-6, 1e-2, 1.0]))
    return x, y


@settings(max_examples=N_EXAMPLES)
@given(xy=vector_pairs())
def test_lipschitz_max_norm(xy: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = xy
    dist = float(np.max(np.abs(x - y)))
    tol = _slack(float(np.max(np.abs(x))), float(np.max(np.abs(y))), math.log(len(x)))
    assert abs(_lse(x) - _lse(y)) <= dist + tol


@settings(max_examples=N_EXAMPLES // 2)
@given(x=vectors(), c=st.floats(-100.0, 100.0))
def test_shift_attains_the_lipschitz_constant(x: np.ndarray, c: float) -> None:
    # lse(x + c) = lse(x) + c: equality in the Lipschitz bound.
    tol = _slack(float(np.max(np.abs(x))), c, math.log(len(x)))
    assert abs(_lse(x + c) - (_lse(x) + c)) <= tol


# 6. Convexity and Jensen ---------------------------------------------------------------------


@settings(max_examples=N_EXAMPLES)
@given(xy=vector_pairs(), s=st.floats(0.0, 1.0))
def test_convexity(xy: tuple[np.ndarray, np.ndarray], s: float) -> None:
    x, y = xy
    z = s * x + (1.0 - s) * y
    lhs = _lse(z)
    rhs = s * _lse(x) + (1.0 - s) * _lse(y)
    tol = _slack(float(np.max(np.abs(x))), float(np.max(np.abs(y))), math.log(len(x)))
    assert lhs <= rhs + tol


@settings(max_examples=N_EXAMPLES)
@given(
    samples=st.tuples(st.integers(2, 8), st.integers(1, 32)).flatmap(
        lambda shape: hnp.arrays(np.float64, shape, elements=_base)
    ),
    scale=_scales,
)
def test_jensen(samples: np.ndarray, scale: float) -> None:
    xs = torch.from_numpy(samples * scale)  # k samples of a random vector X, equally likely
    e_lse = logsumexp(xs, dim=1).mean().item()
    lse_e = logsumexp(xs.mean(dim=0)).item()
    assert e_lse >= lse_e - _slack(float(xs.abs().max()), math.log(xs.shape[1]))
    # The same with the float64 reference alone, so the library enters on one side only.
    tol = _slack(float(xs.abs().max()), math.log(xs.shape[1]))
    assert abs(e_lse - float(np.mean([lse_terms(row) for row in samples * scale]))) <= tol
    assert abs(lse_e - lse_terms(np.mean(samples * scale, axis=0))) <= tol
