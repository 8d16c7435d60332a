"""The form over the maximum (``method="maximum"``, O(M n)): scipy references up to n = 10,000,
its window bounds, its gradients, and agreement with the pairwise form (O(K n^2))."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.autograd import gradcheck

from kexue.distributions import (
    perturbed_argmax_cross_entropy,
    perturbed_argmax_log_probs,
    perturbed_argmax_probs,
    uniform,
)
from kexue.distributions.maximum import maximum_nodes, maximum_window
from kexue.distributions.noise import noise_family
from kexue.testing.perturbed_argmax import (
    reference_prob_gradient,
    reference_probs,
    reference_probs_large,
)

F64 = torch.float64
GOAL = 1e-6  # max |p - p_ref| at the default nodes, float64


@pytest.mark.parametrize("family", ["normal", "logistic", "laplace"])
@pytest.mark.parametrize("n", [10, 100, 1000])
def test_default_map_is_within_1e6_of_scipy(random_mu, family: str, n: int) -> None:
    # Laplace's reference splits at every kink: at n = 1000 one spread (its worst measured)
    for scale in (3.0,) if (family, n) == ("laplace", 1000) else (0.3, 1.0, 3.0):
        mu = random_mu((n,), scale, seed=n)
        p = perturbed_argmax_probs(mu, family).numpy()
        assert np.abs(p - reference_probs_large(mu.numpy(), family)).max() <= GOAL


@pytest.mark.parametrize("family", ["normal", "logistic", "laplace"])
def test_ten_thousand_classes_within_1e6_of_scipy(random_mu, family: str) -> None:
    mu = random_mu((10_000,), 1.0, seed=10_000)
    p = perturbed_argmax_probs(mu, family).numpy()
    assert np.abs(p - reference_probs_large(mu.numpy(), family)).max() <= GOAL


def test_large_reference_agrees_with_the_pairwise_reference(random_mu) -> None:
    """The two scipy references (over the winner's noise, over the maximum) agree."""
    mu = random_mu((12,), 1.0, seed=3)
    for family in ("normal", "laplace"):
        a = reference_probs(mu.numpy(), family)
        b = reference_probs_large(mu.numpy(), family)
        assert np.abs(a - b).max() <= 1e-10


def test_gumbel_gives_softmax_at_any_number_of_nodes(random_mu) -> None:
    """h(x) = exp(-x) for Gumbel noise: every node is proportional to exp(mu_i)."""
    mu = random_mu((3, 50), 2.0, seed=4)
    for k in (2, 4, 16):
        p = perturbed_argmax_probs(mu, "gumbel", num_nodes=k, method="maximum", closed_form=False)
        assert (p - torch.softmax(mu, -1)).abs().max() <= 1e-13


def test_uniform_noise_keeps_exact_zeros_under_auto_and_refuses_maximum() -> None:
    mu = torch.tensor([0.0, -0.5, -3.0], dtype=F64)
    p = perturbed_argmax_probs(mu, uniform(1.0))  # auto: the pairwise form
    assert p[2] == 0 and p[1] > 0
    with pytest.raises(ValueError, match="method='maximum' needs noise with unbounded support"):
        perturbed_argmax_probs(mu, "uniform", method="maximum")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "fast"}, "method must be one of"),
        ({"method": 1}, "method must be one of"),
        ({"method": "maximum", "rule": "tanh-sinh"}, "rule must be one of .* method='maximum'"),
        ({"method": "pairwise", "rule": "trapezoid"}, "rule must be one of .* method='pairwise'"),
    ],
)
def test_bad_method_or_rule(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        perturbed_argmax_probs(torch.zeros(2, 3), **kwargs)


@pytest.mark.parametrize("family", ["normal", "logistic", "laplace"])
def test_maximum_and_pairwise_forms_agree(random_mu, family: str) -> None:
    mu = random_mu((2, 40), 1.5, seed=5).requires_grad_()
    w = random_mu((2, 40), 1.0, seed=6)
    maps = {
        m: perturbed_argmax_log_probs(
            mu, family, method=m, num_nodes=128 if m == "pairwise" else None
        )
        for m in ("maximum", "pairwise")
    }
    p = {m: v.exp() for m, v in maps.items()}
    assert (p["maximum"] - p["pairwise"]).abs().max() <= 1e-5
    grads = {m: torch.autograd.grad((w * p[m]).sum(), mu)[0] for m in maps}
    assert (grads["maximum"] - grads["pairwise"]).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["normal", "logistic", "laplace", "gumbel"])
def test_gradcheck_of_the_maximum_form(random_mu, family: str) -> None:
    """The backward holds the nodes fixed; finite differences move them with mu. Enough nodes
    make the difference (the quadrature error's own derivative) vanish."""
    mu = random_mu((2, 6), 1.0, seed=7).requires_grad_()
    nodes = 256 if family == "laplace" else 64
    fn = lambda m: perturbed_argmax_log_probs(  # noqa: E731
        m, family, num_nodes=nodes, method="maximum", closed_form=False
    )
    assert gradcheck(fn, (mu,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_of_the_cross_entropy_many_classes(random_mu) -> None:
    mu = random_mu((2, 30), 2.0, seed=8).requires_grad_()
    target = torch.tensor([3, 17])
    fn = lambda m: perturbed_argmax_cross_entropy(m, target, "normal", num_nodes=64)  # noqa: E731
    assert gradcheck(fn, (mu,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("family", ["normal", "logistic", "laplace"])
def test_default_gradient_is_close_to_the_exact_one(random_mu, family: str) -> None:
    """At the default nodes the gradient of sum_i w_i p_i is within 1e-6 of the exact one
    (scipy's adaptive quadrature of the derivative, float64), and sums to zero over the
    classes like the exact one."""
    mu = random_mu((1, 8), 1.5, seed=21).requires_grad_()
    w = random_mu((1, 8), 1.0, seed=22)
    p = perturbed_argmax_probs(mu, family)
    (grad,) = torch.autograd.grad((w * p).sum(), mu)
    exact = reference_prob_gradient(mu.detach()[0].numpy(), w[0].numpy(), family)
    np.testing.assert_allclose(grad[0].numpy(), exact, atol=1e-6)
    assert abs(float(grad.sum())) <= 1e-12


@pytest.mark.parametrize("family", ["normal", "logistic", "laplace"])
@pytest.mark.parametrize("n", [1, 2, 7, 300])
def test_window_bounds_hold(random_mu, family: str, n: int) -> None:
    """P(y_lo) <= exp(-45) and 1 - P(y_hi) <= 1e-11 (float64), P the CDF of the maximum,
    computed with scipy."""
    dist = {"normal": stats.norm(), "logistic": stats.logistic(), "laplace": stats.laplace()}
    for scale in (0.1, 1.0, 10.0):
        mu = random_mu((n,), scale, seed=n).sort(descending=True).values
        lo, hi = maximum_window(mu[None], noise_family(family))
        log_p_lo = dist[family].logcdf(lo.item() - mu.numpy()).sum()
        tail_hi = -math.expm1(dist[family].logcdf(hi.item() - mu.numpy()).sum())
        assert log_p_lo <= -45 + 1e-9
        assert tail_hi <= 1e-11 * (1 + 1e-9)
        assert hi > lo


def test_fifty_thousand_classes_run_in_float32() -> None:
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 50_000, generator=gen).requires_grad_()
    loss = perturbed_argmax_cross_entropy(mu, torch.tensor([0, 1]), "normal")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(mu.grad).all()
    p = perturbed_argmax_probs(mu.detach(), "normal")
    assert (p.sum(-1) - 1).abs().max() <= 1e-5 and (p >= 0).all()
    top = mu.detach().argmax(-1)
    assert (p.argmax(-1) == top).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", ["normal", "laplace"])
@pytest.mark.parametrize("n", [1, 5, 100, 300])
def test_nodes_placed_in_numpy_match_torch(random_mu, family: str, n: int, dtype) -> None:
    """On CPU the window is placed in numpy (cheaper than a dozen tiny torch operations);
    elsewhere in torch. Both give the same nodes and weights (to a rounding of the last
    step)."""
    mu = random_mu((7, n), 2.0, seed=n).to(dtype)
    fam = noise_family(family)
    rule = "split-gauss-legendre" if family == "laplace" else "trapezoid"
    by_numpy = maximum_nodes(mu, fam, 24, rule, in_numpy=True)
    by_torch = maximum_nodes(mu, fam, 24, rule, in_numpy=False)
    eps = torch.finfo(dtype).eps
    for a, b in zip(by_numpy, by_torch, strict=True):  # nodes near 0: error on the scale of y
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0.0, atol=8 * eps * float(b.abs().max()))
