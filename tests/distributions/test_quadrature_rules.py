"""Quadrature rules on (0, 1) against closed-form integrals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kexue.distributions import RULES, quadrature_rule


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("k", [2, 3, 16, 64])
def test_nodes_weights_and_complements(rule: str, k: int) -> None:
    u, v, w = quadrature_rule(rule, k)
    assert u.shape == v.shape == w.shape == (k,)
    assert (u > 0).all() and (u <= 1).all() and (v > 0).all() and (w > 0).all()
    assert math.fsum(w) == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_allclose(u + v, 1.0, rtol=0, atol=2.3e-16)
    assert (np.diff(u) > 0).all()


def test_cached_rules_are_read_only() -> None:
    rule = quadrature_rule("tanh-sinh", 8)
    with pytest.raises(ValueError, match="read-only"):
        rule.u[0] = 0.5


def test_midpoint_is_the_articles_rule() -> None:
    u, _, w = quadrature_rule("midpoint", 7)
    np.testing.assert_array_equal(u, np.arange(1, 8) / 8)
    np.testing.assert_array_equal(w, np.full(7, 1 / 7))


@pytest.mark.parametrize("k", [2, 5, 12])
def test_gauss_legendre_is_exact_for_degree_2k_minus_1(k: int) -> None:
    u, _, w = quadrature_rule("gauss-legendre", k)
    for degree in range(2 * k):
        assert (w * u**degree).sum() == pytest.approx(1 / (degree + 1), rel=1e-13)


def test_tanh_sinh_handles_endpoint_singularities() -> None:
    """Integrals whose integrand is unbounded or non-smooth at 0 and 1 (closed forms)."""
    u, v, w = quadrature_rule("tanh-sinh", 64)
    cases = [
        (-np.log(u), 1.0),  # int_0^1 -log u du
        (np.sqrt(-np.log(v)), math.sqrt(math.pi) / 2),  # int_0^1 sqrt(-log(1 - u)) du
        (np.log(u) * np.log(v), 2 - math.pi**2 / 6),  # int_0^1 log u log(1 - u) du
    ]
    gl = quadrature_rule("gauss-legendre", 64)
    for values, exact in cases:
        assert (w * values).sum() == pytest.approx(exact, rel=1e-8)
    # Gauss–Legendre, same K: the log singularity costs it four more digits
    assert abs((gl.weights * -np.log(gl.u)).sum() - 1.0) > 1e-5


def test_tanh_sinh_complement_is_accurate_near_one() -> None:
    u, v, _ = quadrature_rule("tanh-sinh", 256)
    assert v.min() < 1e-16  # the upper tail is reached, not rounded to u = 1
    assert (v > 0).all() and (u > 0).all()


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, True, "8"])
def test_bad_num_nodes(bad) -> None:
    with pytest.raises(ValueError, match="num_nodes must be an integer >= 2"):
        quadrature_rule("gauss-legendre", bad)


def test_unknown_rule() -> None:
    with pytest.raises(ValueError, match="rule must be one of"):
        quadrature_rule("simpson", 8)
