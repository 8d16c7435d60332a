"""The perturbed-argmax map against independent references: softmax, the n = 2 closed form,
scipy adaptive quadrature in float64, Monte Carlo frequencies; properties 1-4; gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from scipy import special
from torch.autograd import gradcheck

import kexue.distributions.maximum as mx
import kexue.distributions.pairwise as pa
from kexue.distributions import (
    NOISE_NAMES,
    PerturbedArgmaxCrossEntropy,
    custom_noise,
    laplace,
    noise_family,
    perturbed_argmax_cross_entropy,
    perturbed_argmax_log_probs,
    perturbed_argmax_probs,
    uniform,
)
from kexue.testing.perturbed_argmax import monte_carlo_frequencies, reference_probs

F64 = torch.float64


# Gumbel = softmax -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 10, 100])
@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_gumbel_by_quadrature_is_softmax(random_mu, n: int, scale: float) -> None:
    mu = random_mu((4, n), scale, seed=n)
    p = perturbed_argmax_probs(mu, "gumbel", num_nodes=64, closed_form=False)
    assert (p - torch.softmax(mu, -1)).abs().max() <= 1e-6


def test_gumbel_closed_form_is_softmax(random_mu) -> None:
    mu = random_mu((3, 7), 2.0, seed=0)
    torch.testing.assert_close(perturbed_argmax_probs(mu, "gumbel"), torch.softmax(mu, -1))


def test_gumbel_gradient_by_quadrature_matches_softmax_autograd(random_mu) -> None:
    mu = random_mu((3, 9), 1.5, seed=1).requires_grad_()
    w = random_mu((3, 9), 1.0, seed=2)
    ours = perturbed_argmax_log_probs(mu, "gumbel", num_nodes=64, closed_form=False)
    (g_ours,) = torch.autograd.grad((w * ours).sum(), mu)
    (g_ref,) = torch.autograd.grad((w * torch.log_softmax(mu, -1)).sum(), mu)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-6)


# Normal noise ---------------------------------------------------------------------------------


def test_normal_two_classes_matches_closed_form() -> None:
    gap = torch.linspace(-8, 8, 81, dtype=F64)
    mu = torch.stack([gap, torch.zeros_like(gap)], -1)
    p = perturbed_argmax_probs(mu, "normal", num_nodes=64)
    expected = special.ndtr(gap.numpy() / math.sqrt(2))  # p_1 = Phi((mu_1 - mu_2) / sqrt 2)
    np.testing.assert_allclose(p[:, 0].numpy(), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("family", NOISE_NAMES)
def test_matches_monte_carlo_within_four_standard_errors(random_mu, family: str) -> None:
    samples = 200_000
    mu = random_mu((3, 6), 0.8, seed=5)
    p = perturbed_argmax_probs(mu, family, num_nodes=64, closed_form=False).numpy()
    for row in range(3):
        freq = monte_carlo_frequencies(mu[row].numpy(), family, samples, seed=row)
        se = np.sqrt(np.maximum(p[row] * (1 - p[row]), 1e-12) / samples)
        assert (np.abs(freq - p[row]) <= 4 * se).all(), (family, row, freq - p[row], se)


# Against scipy adaptive quadrature ------------------------------------------------------------

# max |p - p_ref| at K = 64 with the family's default rule; Laplace and uniform integrands
# have kinks (one per class), so their rules converge algebraically, not exponentially.
TOLERANCE = {"gumbel": 1e-8, "normal": 1e-8, "logistic": 1e-8, "laplace": 1e-4, "uniform": 1e-4}


@pytest.mark.parametrize(
    "family, n",
    [(f, n) for f in NOISE_NAMES for n in (3, 12)]
    + [("normal", 60), ("gumbel", 60), ("logistic", 60)]
    + [pytest.param(f, 60, marks=pytest.mark.slow) for f in ("laplace", "uniform")],
)
def test_matches_scipy_adaptive_quadrature(random_mu, family: str, n: int) -> None:
    mu = random_mu((2, n), 0.5 if family == "uniform" else 1.0, seed=n)
    p = perturbed_argmax_probs(mu, family, num_nodes=64, closed_form=False).numpy()
    for row in range(2):
        ref = reference_probs(mu[row].numpy(), family)
        assert np.abs(p[row] - ref).max() <= TOLERANCE[family]


def test_rules_converge_in_the_documented_order(random_mu) -> None:
    """Normal noise, n = 40: tanh-sinh beats Gauss–Legendre beats the article's rule."""
    mu = random_mu((40,), 1.0, seed=3)
    ref = reference_probs(mu.numpy(), "normal")
    err = {
        rule: np.abs(perturbed_argmax_probs(mu, num_nodes=32, rule=rule).numpy() - ref).max()
        for rule in ("tanh-sinh", "gauss-legendre", "midpoint")
    }
    assert err["tanh-sinh"] < 1e-6 < err["gauss-legendre"] < err["midpoint"]
    assert err["tanh-sinh"] * 100 < err["gauss-legendre"]


def test_blocks_over_classes_give_the_same_map_and_gradient(random_mu, monkeypatch) -> None:
    """A tiny block budget forces the one-row, few-classes path of the O(K n) memory loop."""
    monkeypatch.setattr(pa, "BLOCK_ELEMENTS", 64)
    mu = random_mu((2, 12), 1.0, seed=4)
    p = perturbed_argmax_probs(mu, "normal", num_nodes=48, method="pairwise").numpy()
    for row in range(2):
        assert np.abs(p[row] - reference_probs(mu[row].numpy(), "normal")).max() <= 1e-7
    leaf = mu[:, :5].clone().requires_grad_()
    assert gradcheck(
        lambda m: perturbed_argmax_log_probs(m, num_nodes=8, method="pairwise"), (leaf,)
    )


def test_blocks_cover_every_class_once_within_budget() -> None:
    for rows, n, k, budget in [(5, 3, 4, 100), (3, 50, 8, 1000), (2, 7, 16, 112), (1, 1, 2, 2)]:
        seen = np.zeros((rows, n), dtype=int)
        for r, c in pa.pairwise_blocks(rows, n, k, max(budget, n * k)):
            seen[r, c] += 1
            size = (r.stop - r.start) * (c.stop - c.start) * k * n
            assert size <= max(budget, n * k)
        assert (seen == 1).all()


# Properties 1-4 for every family --------------------------------------------------------------

FAMILIES = [*NOISE_NAMES, uniform(0.4), uniform(3.0)]
scores_st = st.lists(
    st.floats(-10, 10, allow_nan=False, allow_infinity=False), min_size=1, max_size=8
)


@given(
    family=st.sampled_from(FAMILIES),
    values=scores_st,
    shift=st.floats(-50, 50, allow_nan=False),
    rule=st.sampled_from(["auto", "gauss-legendre", "midpoint"]),
)
def test_properties_hold_for_every_family(family, values, shift, rule) -> None:
    mu = torch.tensor(values, dtype=F64)
    p = perturbed_argmax_probs(mu, family, num_nodes=16, rule=rule, closed_form=False)
    # 1. non-negative, 2. normalised
    assert torch.isfinite(p).all() and (p >= 0).all()
    assert abs(p.sum().item() - 1.0) <= 1e-12
    # 3. ordered like mu: weakly everywhere (up to rounding), strictly for clear gaps
    bigger = mu[:, None] > mu[None, :]
    assert (p[:, None] >= p[None, :] - 1e-12)[bigger].all()
    ties = mu[:, None] == mu[None, :]
    assert ((p[:, None] - p[None, :]).abs() <= 1e-12)[ties].all()
    clear = (mu[:, None] - mu[None, :] > 1e-3) & (p[None, :] > 1e-9)
    assert (p[:, None] > p[None, :])[clear].all()
    # 4. shift invariance
    shifted = perturbed_argmax_probs(mu + shift, family, num_nodes=16, rule=rule, closed_form=False)
    assert (shifted - p).abs().max() <= 1e-9


@given(
    width=st.floats(0.05, 5.0),
    values=st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=10),
)
def test_uniform_noise_gives_exact_zeros_below_max_minus_width(width, values) -> None:
    mu = torch.tensor(values, dtype=F64, requires_grad=True)
    p = perturbed_argmax_probs(mu, uniform(width))
    below = mu.detach() < mu.detach().max() - width
    assert (p[below] == 0).all()
    assert p[mu.detach().argmax()] > 0
    log_p = perturbed_argmax_log_probs(mu, uniform(width))
    assert torch.isneginf(log_p[below]).all() and torch.isfinite(log_p[~below & (p > 0)]).all()
    (grad,) = torch.autograd.grad(p.sum() + (p * torch.arange(len(p))).sum(), mu)
    assert torch.isfinite(grad).all() and (grad[below] == 0).all()


def test_uniform_ties_at_the_top_and_a_single_class() -> None:
    mu = torch.tensor([[1.0, 1.0, 0.5, -2.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64)
    p = perturbed_argmax_probs(mu, uniform(1.0), num_nodes=64)
    for row in range(2):
        assert np.abs(p[row].numpy() - reference_probs(mu[row].numpy(), "uniform")).max() <= 1e-5
    assert p[0, 3] == 0 and p[0, 0] == p[0, 1] > p[0, 2] > 0
    assert perturbed_argmax_probs(torch.tensor([2.0]), "uniform").item() == 1.0


# Gradients ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [*NOISE_NAMES, "exponential"])
def test_gradcheck(random_mu, family: str) -> None:
    if family == "exponential":  # a custom family: its derivative comes from autograd
        from kexue.distributions import custom_noise

        noise = custom_noise(
            lambda x: -torch.expm1(-x.clamp(min=0)),
            lambda u: -torch.log1p(-u),
            log_cdf=lambda x: torch.log(-torch.expm1(-x.clamp(min=0))),
        )
    else:
        noise = noise_family(family)
    mu = random_mu((2, 5), 1.0, seed=9).requires_grad_()
    # The form over the maximum differentiates at fixed nodes (the exact map does not depend on
    # them) while finite differences move them with mu: the two agree once the rule is
    # accurate, so those families get enough nodes; the pairwise form keeps 12.
    nodes = {"normal": 64, "logistic": 64, "laplace": 256, "gumbel": 64}.get(family, 12)
    if family == "uniform":  # log p = -inf at exact zeros: check p itself
        fn = lambda m: perturbed_argmax_probs(m, noise, num_nodes=nodes)  # noqa: E731
    else:
        fn = lambda m: perturbed_argmax_log_probs(m, noise, num_nodes=nodes, closed_form=False)  # noqa: E731
    assert gradcheck(fn, (mu,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradient_sums_to_zero_along_classes(random_mu) -> None:
    """Shift invariance, differentiated: sum_l d log p_i / d mu_l = 0."""
    mu = random_mu((3, 30), 2.0, seed=10).requires_grad_()
    out = perturbed_argmax_log_probs(mu, "logistic")
    (grad,) = torch.autograd.grad((out * random_mu((3, 30), 1.0, seed=11)).sum(), mu)
    assert grad.sum(-1).abs().max() <= 1e-10


# Shapes, dtypes, dim --------------------------------------------------------------------------


def test_dim_and_leading_dimensions(random_mu) -> None:
    mu = random_mu((4, 3, 2), 1.0, seed=12)
    p = perturbed_argmax_probs(mu, "gumbel", dim=0, num_nodes=64, closed_form=False)
    assert p.shape == mu.shape
    assert (p - torch.softmax(mu, 0)).abs().max() <= 1e-6


def test_single_class_has_probability_one() -> None:
    assert perturbed_argmax_probs(torch.tensor([[3.0], [-1.0]])).tolist() == [[1.0], [1.0]]


@pytest.mark.parametrize("n", [10, 200])
def test_float32_is_accurate_to_single_precision(random_mu, n: int) -> None:
    mu = random_mu((n,), 1.0, seed=n)
    p = perturbed_argmax_probs(mu.float(), num_nodes=48)
    assert p.dtype == torch.float32
    assert np.abs(p.double().numpy() - reference_probs(mu.numpy(), "normal")).max() <= 2e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float32(random_mu, dtype: torch.dtype) -> None:
    mu = random_mu((2, 6), 1.0, seed=13).to(dtype)
    p = perturbed_argmax_probs(mu, "laplace")
    assert p.dtype == dtype
    # scipy on exactly the rounded scores; the result may differ by its rounding to ``dtype``
    # (half an ulp, relative) plus the float32 quadrature's own error.
    ref = np.stack([reference_probs(row, "laplace") for row in mu.double().numpy()])
    bound = torch.finfo(dtype).eps / 2 * ref + 1e-4
    assert (np.abs(p.double().numpy() - ref) <= bound).all()


def test_wide_scores_stay_finite_and_ordered() -> None:
    """Gaps of hundreds (the far tails of every kernel) in float32 and float64."""
    for dtype in (torch.float32, F64):
        mu = torch.tensor([0.0, -40.0, -300.0, 500.0, -2000.0], dtype=dtype)
        for family in NOISE_NAMES:
            log_p = perturbed_argmax_log_probs(mu, family, closed_form=False)
            assert not torch.isnan(log_p).any(), (family, dtype)
            assert log_p[3] == 0 or log_p[3] > -1e-6
            finite = torch.isfinite(log_p)
            order = torch.argsort(mu[finite], descending=True)
            assert (torch.diff(log_p[finite][order]) <= 0).all(), (family, dtype)


# Bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"mu": torch.tensor([0.0, math.nan])}, ValueError, "mu must be finite, got a NaN"),
        (
            {"mu": torch.tensor([0.0, math.inf])},
            ValueError,
            "mu must be finite, got an infinite score",
        ),
        ({"mu": torch.tensor([1, 2])}, TypeError, "mu must be a floating-point tensor"),
        ({"mu": [0.0, 1.0]}, TypeError, "mu must be a torch.Tensor"),
        ({"mu": torch.tensor(1.0)}, ValueError, "at least one dimension"),
        ({"mu": torch.zeros(2, 0)}, ValueError, "at least one class"),
        ({"num_nodes": 1}, ValueError, "num_nodes must be an integer >= 2"),
        ({"num_nodes": 8.0}, ValueError, "num_nodes must be an integer >= 2"),
        ({"noise": "cauchy"}, ValueError, "noise must be one of"),
        ({"noise": None}, TypeError, "noise must be a name or a NoiseFamily"),
        ({"rule": "simpson"}, ValueError, "rule must be 'auto' or one of"),
        ({"dim": 2}, ValueError, "dim=2 is out of range"),
        ({"dim": 0.5}, TypeError, "dim must be an int"),
        ({"closed_form": 1}, TypeError, "closed_form must be a bool"),
    ],
)
def test_bad_input_gives_a_clear_error(kwargs, error, match) -> None:
    args = {"mu": torch.zeros(2, 3), **kwargs}
    with pytest.raises(error, match=match):
        perturbed_argmax_probs(**args)


# Cross-entropy --------------------------------------------------------------------------------


def test_cross_entropy_with_gumbel_is_torch_cross_entropy(random_mu) -> None:
    mu = random_mu((5, 7), 2.0, seed=14)
    target = torch.tensor([0, 6, 3, 3, 1])
    for reduction in ("mean", "sum", "none"):
        ours = perturbed_argmax_cross_entropy(mu, target, "gumbel", reduction=reduction)
        torch.testing.assert_close(ours, F.cross_entropy(mu, target, reduction=reduction))


def test_cross_entropy_normal_matches_reference(random_mu, backend) -> None:
    mu = random_mu((3, 6), 1.0, seed=15)
    target = torch.tensor([2, 0, 5])
    loss = perturbed_argmax_cross_entropy(mu, target, num_nodes=64, reduction="none")
    ref = [-math.log(reference_probs(mu[i].numpy(), "normal")[t]) for i, t in enumerate([2, 0, 5])]
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-7)
    leaf = mu.clone().requires_grad_()
    assert gradcheck(lambda m: perturbed_argmax_cross_entropy(m, target, num_nodes=64), (leaf,))


def _erf_normal():
    """Normal noise known only by its CDF and quantile: the generic kernels (autograd for the
    density and its slope)."""
    return custom_noise(
        lambda x: 0.5 * torch.erfc(-x / math.sqrt(2.0)),
        lambda u: math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0),
        name="erf-normal",
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("family", ["normal", "logistic", "laplace", "custom"])
def test_cross_entropy_is_the_picked_log_probability(
    random_mu, family: str, reduction, backend
) -> None:
    """The loss (one autograd node, in linear space: see ``_MaximumCrossEntropy``) against
    ``-log p_target`` from :func:`perturbed_argmax_log_probs` (log space), value and gradient,
    with leading dimensions and the classes along ``dim=1``; normal and logistic take the
    backward's affine-slope branch, Laplace and the custom family the generic one."""
    mu = random_mu((2, 9, 3), 1.5, seed=16)
    mu[1, 5, 2] = -30.0  # a class whose h underflows in linear space
    target = torch.tensor([[0, 8, 4], [3, 3, 5]])
    weight = random_mu((2, 3), 1.0, seed=17)
    noise = _erf_normal() if family == "custom" else family
    method = "maximum"

    def picked(m: torch.Tensor) -> torch.Tensor:
        log_p = perturbed_argmax_log_probs(m, noise, dim=1, method=method)
        loss = -log_p.gather(1, target[:, None, :]).squeeze(1)
        return {"mean": loss.mean(), "sum": loss.sum(), "none": loss}[reduction]

    leaves = [mu.clone().requires_grad_() for _ in range(2)]
    ours = perturbed_argmax_cross_entropy(
        leaves[0], target, noise, dim=1, reduction=reduction, method=method
    )
    ref = picked(leaves[1])
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    (ours * (weight if reduction == "none" else 1.0)).sum().backward()
    (ref * (weight if reduction == "none" else 1.0)).sum().backward()
    torch.testing.assert_close(leaves[0].grad, leaves[1].grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", ["normal", "logistic"])
def test_cross_entropy_in_float32_matches_float64_for_far_and_wide_scores(
    family: str, backend
) -> None:
    """Linear space in float32: scores spread over 20 units (the lower classes' h underflows)
    and a target far below the top still give the float64 loss and gradient to float32
    precision; the far target's loss is large but finite. (Far below the window the map holds
    only its absolute error, ``delta``, so much wider spreads lose the far targets' loss in
    either precision.)"""
    gen = torch.Generator().manual_seed(5)
    mu = torch.randn(6, 40, generator=gen, dtype=F64) * 4.0
    target = torch.tensor([0, 1, 2, 3, 4, 5])
    target[0] = int(mu[0].argmin())  # the worst class: ~18 below the top
    leaves = [mu.clone().float().requires_grad_(), mu.clone().requires_grad_()]
    losses = [perturbed_argmax_cross_entropy(m, target, family, reduction="none") for m in leaves]
    assert torch.isfinite(losses[0]).all() and losses[0][0] > {"normal": 50, "logistic": 10}[family]
    torch.testing.assert_close(losses[0].double(), losses[1].detach(), rtol=2e-5, atol=2e-5)
    for loss in losses:
        loss.sum().backward()
    # float32's own error, as the log-space map (perturbed_argmax_log_probs) makes it
    log_space = mu.clone().float().requires_grad_()
    log_p = perturbed_argmax_log_probs(log_space, family)
    (-log_p.gather(-1, target[:, None])).sum().backward()
    exact = leaves[1].grad
    error = (leaves[0].grad.double() - exact).abs().max()
    assert error <= 5e-5 * exact.abs().max()
    assert error <= 1.5 * (log_space.grad.double() - exact).abs().max() + 1e-6


@pytest.mark.parametrize("family", ["normal", "laplace"])
def test_cross_entropy_in_row_blocks_is_the_one_block_result(random_mu, monkeypatch, family):
    """A block budget of 2 rows' terms splits the linear-space loss into blocks of rows
    (the path of large n); value and gradient equal the one-block result."""
    mu = random_mu((7, 30), 2.0, seed=18)
    target = torch.tensor([0, 5, 29, 3, 3, 17, 8])
    results = []
    for budget in (None, 2 * 48 * 30):
        if budget is not None:
            monkeypatch.setattr(mx, "BLOCK_ELEMENTS", budget)
        leaf = mu.clone().requires_grad_()
        loss = perturbed_argmax_cross_entropy(leaf, target, family, num_nodes=48, reduction="none")
        (loss * torch.arange(1.0, 8.0, dtype=F64)).sum().backward()
        results.append((loss.detach(), leaf.grad))
    assert mx._block_rows(7, 48 + (48 if family == "laplace" else 0), 30, mu.device) <= 2
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-12, atol=1e-13)


def test_cross_entropy_module_dim_and_far_targets() -> None:
    module = PerturbedArgmaxCrossEntropy(laplace(), num_nodes=16, reduction="sum")
    assert "laplace" in repr(module)
    mu = torch.tensor([[0.0, -60.0, 1.0]], dtype=F64, requires_grad=True)
    loss = module(mu, torch.tensor([1]))
    assert torch.isfinite(loss) and loss > 30  # p_target ~ 1e-26: large but finite
    loss.backward()
    assert torch.isfinite(mu.grad).all() and mu.grad[0, 1] < 0
    by_dim = perturbed_argmax_cross_entropy(mu.detach().T, torch.tensor([1]), laplace(), dim=0)
    torch.testing.assert_close(
        by_dim, perturbed_argmax_cross_entropy(mu.detach(), torch.tensor([1]), laplace())
    )
    zero = perturbed_argmax_cross_entropy(mu.detach(), torch.tensor([1]), uniform(1.0))
    assert zero == math.inf  # the target cannot win under bounded noise


@pytest.mark.parametrize(
    "target, error, match",
    [
        (torch.tensor([0.0, 1.0]), TypeError, "integer class indices"),
        (torch.tensor([0, 1, 2]), ValueError, r"target must have shape \(2,\)"),
        (torch.tensor([0, 3]), ValueError, r"class indices in \[0, 3\)"),
        (torch.tensor([-1, 0]), ValueError, r"class indices in \[0, 3\)"),
        ([0, 1], TypeError, "target must be a torch.Tensor"),
    ],
)
def test_cross_entropy_bad_target(target, error, match) -> None:
    with pytest.raises(error, match=match):
        perturbed_argmax_cross_entropy(torch.zeros(2, 3), target)
    with pytest.raises(ValueError, match="reduction"):
        perturbed_argmax_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), reduction="avg")


def test_cross_entropy_names_tensors_on_different_devices() -> None:
    with pytest.raises(ValueError, match=r"target is on meta but mu is on cpu"):
        perturbed_argmax_cross_entropy(
            torch.zeros(2, 3), torch.zeros(2, dtype=torch.long, device="meta")
        )
