"""Noise families against scipy.stats (float64), their kernels, sampling and custom families."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from kexue.distributions import (
    NOISE_NAMES,
    NoiseFamily,
    custom_noise,
    noise_family,
    uniform,
)

F64 = torch.float64
SCIPY = {
    "gumbel": stats.gumbel_r(),
    "normal": stats.norm(),
    "logistic": stats.logistic(),
    "laplace": stats.laplace(),
    "uniform": stats.uniform(0.0, 1.0),
}
# d log Phi / dx = pdf / cdf in closed form (scipy's exp(logpdf - logcdf) cancels for Gumbel).
HAZARD = {
    "gumbel": lambda x: np.exp(-x),
    "normal": lambda x: np.exp(stats.norm.logpdf(x) - stats.norm.logcdf(x)),
    "logistic": lambda x: special.expit(-x),
    "laplace": lambda x: np.where(x < 0, 1.0, 1.0 / (2.0 * np.exp(np.maximum(x, 0)) - 1.0)),
    "uniform": lambda x: np.where((x > 0) & (x < 1), 1.0 / x, 0.0),
}
X = np.concatenate([np.linspace(-40, 40, 801), [-1e-3, 0.0, 1e-3, 0.999, 1.0, 1.001]])
U = np.concatenate([[1e-15, 1e-9, 1e-4], np.linspace(0.01, 0.99, 99), [1 - 1e-4, 1 - 1e-9]])


@pytest.mark.parametrize("name", NOISE_NAMES)
def test_cdf_and_log_cdf_match_scipy(name: str) -> None:
    family, ref = noise_family(name), SCIPY[name]
    x = torch.tensor(X, dtype=F64)
    np.testing.assert_allclose(family.cdf(x).numpy(), ref.cdf(X), rtol=1e-12, atol=1e-300)
    with np.errstate(divide="ignore"):
        expected = ref.logcdf(X)
    got = family.log_cdf(x).numpy()
    finite = np.isfinite(expected)
    assert (got[~finite] == -np.inf).all()
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-10, atol=1e-15)


def test_log_cdf_is_stable_in_the_far_lower_tail() -> None:
    x = torch.tensor([-50.0, -200.0, -1e4], dtype=F64)
    expected = {  # scipy for normal and logistic; closed form x - log 2 for Laplace
        "normal": stats.norm.logcdf(x.numpy()),
        "logistic": stats.logistic.logcdf(x.numpy()),
        "laplace": x.numpy() - math.log(2.0),
    }
    for name, ref in expected.items():
        got = noise_family(name).log_cdf(x).numpy()
        assert np.isfinite(got).all(), name
        np.testing.assert_allclose(got, ref, rtol=1e-10, err_msg=name)


@pytest.mark.parametrize("name", NOISE_NAMES)
def test_icdf_and_isf_match_scipy(name: str) -> None:
    family, ref = noise_family(name), SCIPY[name]
    u = torch.tensor(U, dtype=F64)
    np.testing.assert_allclose(family.icdf(u).numpy(), ref.ppf(U), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(family.isf(u).numpy(), ref.isf(U), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", NOISE_NAMES)
def test_kernels_match_scipy(name: str, dtype: torch.dtype) -> None:
    """The fast in-place kernels: ``log Phi`` to absolute accuracy near the dtype's epsilon,
    ``(log Phi)' = pdf / cdf`` where the cdf is positive (0 where it is not)."""
    family, ref = noise_family(name), SCIPY[name]
    x = torch.tensor(X[(X > -35) & (X < 35)], dtype=dtype)  # the kernels clamp beyond +-87
    xs = x.double().numpy()  # the reference at the rounded arguments
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_cdf = ref.logcdf(xs)
        slope = HAZARD[name](xs)
    # Rounding z = x / sqrt 2 moves log Phi(x) by ~ x^2 eps in the tails: relative tolerance.
    eps = torch.finfo(dtype).eps
    rtol = 16 * eps * (1 + xs**2)
    got = family.kernel_log_cdf_(x.clone()).double().numpy()
    inside = xs > family.support_lower  # below, any finite value: those nodes are dropped
    assert not np.isnan(got).any() and np.isfinite(got[~inside]).all()
    err = np.abs(got[inside] - log_cdf[inside])
    assert (err <= 2 * eps + rtol[inside] * np.abs(log_cdf[inside])).all(), err.max()
    got_slope = family.kernel_dlog_cdf_(x.clone()).double().numpy()
    assert np.isfinite(got_slope).all()
    inside &= ~np.isin(xs, [0.0, 1.0])  # kinks of Laplace / uniform: one-sided slopes differ
    err = np.abs(got_slope - slope)[inside]
    assert (err <= 2 * eps + (rtol * np.abs(slope))[inside]).all(), err.max()


def test_normal_kernel_far_tail_falls_back_to_the_exact_form() -> None:
    x = torch.tensor([-80.0, -38.0, -1.0, 30.0], dtype=F64)
    got = noise_family("normal").kernel_log_cdf_(x.clone()).numpy()
    np.testing.assert_allclose(got, stats.norm.logcdf(x.numpy()), rtol=1e-12, atol=1e-16)
    slope = noise_family("normal").kernel_dlog_cdf_(x.clone()).numpy()
    ref = np.exp(stats.norm.logpdf(x.numpy()) - stats.norm.logcdf(x.numpy()))
    np.testing.assert_allclose(slope, ref, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", ["gumbel", "normal", "logistic", "laplace", "custom"])
def test_maximum_terms_match_scipy(name: str, dtype: torch.dtype) -> None:
    """The kernel of the form over the maximum: ``log Phi`` and ``log h = log pdf - log cdf``
    as ``c - u``, including the normal's far lower tail (below -12 / -37) and a custom family
    (autograd density)."""
    ref = SCIPY["normal" if name == "custom" else name]
    family = (
        custom_noise(
            lambda t: 0.5 * torch.erfc(-t * math.sqrt(0.5)),
            torch.special.ndtri,
            log_cdf=torch.special.log_ndtr,
        )
        if name == "custom"
        else noise_family(name)
    )
    low, high = {"gumbel": (-4, 30), "custom": (-5, 8)}.get(name, (-30, 30))
    grid = X[(X > low) & (X < high)]
    if name == "normal":
        grid = np.concatenate([grid, [-50.0, -38.0, -13.0]])
    x = torch.tensor(grid)
    x = x.to(dtype)[None, :]
    xs = x.double().numpy()
    log_cdf, u, c = family.kernel_maximum_terms_(x.clone(), torch.empty_like(x), float(x.min()))
    with np.errstate(divide="ignore"):
        want_cdf = ref.logcdf(xs)
        want_h = ref.logpdf(xs) - want_cdf
    # log Phi may round to 0 within ~1e-7 / 1e-16 of it (module docstring): 8 eps absolute;
    # forming u from x rounds at eps |x|
    eps = torch.finfo(dtype).eps
    rtol = 64 * eps * (1 + xs**2)
    err_cdf = np.abs(log_cdf.double().numpy() - want_cdf)
    assert (err_cdf <= 8 * eps + rtol * np.abs(want_cdf)).all(), err_cdf.max()
    err_h = np.abs(c - u.double().numpy() - want_h)
    assert (err_h <= 8 * eps * (1 + np.abs(xs)) + rtol * np.abs(want_h)).all(), err_h.max()


@pytest.mark.parametrize("name", NOISE_NAMES)
def test_samples_follow_the_cdf(name: str) -> None:
    family = noise_family(name)
    draws = family.sample((20_000,), generator=torch.Generator().manual_seed(3), dtype=F64)
    assert draws.shape == (20_000,) and draws.dtype == F64
    assert stats.kstest(draws.numpy(), SCIPY[name].cdf).pvalue > 1e-3


def test_sampling_uses_only_the_generator() -> None:
    family = noise_family("logistic")
    state = torch.random.get_rng_state()
    a = family.sample(5, generator=torch.Generator().manual_seed(7))
    b = family.sample(5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("name", ["normal", "gumbel"])
def test_sample_rejects_bad_shape_and_dtype(name: str) -> None:
    family = noise_family(name)
    with pytest.raises(TypeError, match="dtype must be a floating"):
        family.sample(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="negative"):
        family.sample((2, -1))
    with pytest.raises(TypeError, match="shape must be an int"):
        family.sample("3")  # type: ignore[arg-type]


def test_uniform_width_scales_support() -> None:
    family = uniform(2.5)
    x = torch.tensor([-1.0, 0.0, 1.25, 2.5, 4.0], dtype=F64)
    assert family.cdf(x).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    draws = family.sample(1000, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert 0 <= draws.min() and draws.max() <= 2.5
    assert repr(family) == "uniform(width=2.5)"


@pytest.mark.parametrize("width", [0.0, -1.0, math.inf, math.nan])
def test_uniform_rejects_bad_width(width: float) -> None:
    with pytest.raises(ValueError, match="width"):
        uniform(width)
    with pytest.raises(TypeError, match="width"):
        uniform("1")  # type: ignore[arg-type]


def test_noise_family_names_and_errors() -> None:
    assert {noise_family(n).name for n in NOISE_NAMES} == set(NOISE_NAMES)
    fam = uniform(0.3)
    assert noise_family(fam) is fam
    with pytest.raises(ValueError, match="noise must be one of"):
        noise_family("cauchy")
    with pytest.raises(TypeError, match="noise"):
        noise_family(3)  # type: ignore[arg-type]


def test_public_methods_validate_their_argument() -> None:
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        noise_family("normal").cdf(0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="u must be a floating-point tensor"):
        noise_family("normal").icdf(torch.tensor([1]))


# Custom families -------------------------------------------------------------------------------


def test_custom_family_from_callables_matches_scipy() -> None:
    """Exponential noise, a family not built in: Phi(x) = 1 - exp(-x) for x >= 0."""
    family = custom_noise(
        lambda x: -torch.expm1(-x.clamp(min=0)),
        lambda u: -torch.log1p(-u),
        log_cdf=lambda x: torch.log(-torch.expm1(-x.clamp(min=0))),
        name="exponential",
    )
    assert isinstance(family, NoiseFamily)
    x = torch.tensor(X, dtype=F64)
    np.testing.assert_allclose(family.cdf(x).numpy(), stats.expon.cdf(X), atol=1e-15)
    u = torch.tensor(U, dtype=F64)
    np.testing.assert_allclose(family.icdf(u).numpy(), stats.expon.ppf(U), rtol=1e-9)
    draws = family.sample(5000, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert stats.kstest(draws.numpy(), stats.expon.cdf).pvalue > 1e-3
    assert "exponential" in repr(family)


def test_custom_family_rejects_non_monotone_cdf() -> None:
    def wiggly(x: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(x) + 0.05 * torch.sin(3 * x)).clamp(0, 1)

    with pytest.raises(ValueError, match=r"cdf must be non-decreasing, but cdf\("):
        custom_noise(wiggly, torch.logit)


def test_custom_family_rejects_cdf_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match=r"cdf must lie in \[0, 1\]"):
        custom_noise(lambda x: 2 * torch.sigmoid(x), torch.logit)


def test_custom_family_rejects_an_icdf_that_does_not_invert() -> None:
    with pytest.raises(ValueError, match="icdf must invert cdf"):
        custom_noise(torch.sigmoid, lambda u: 2 * torch.logit(u))


def test_custom_family_rejects_inconsistent_log_cdf() -> None:
    with pytest.raises(ValueError, match=r"log_cdf must equal log\(cdf\)"):
        custom_noise(torch.sigmoid, torch.logit, log_cdf=lambda x: torch.sigmoid(x))


def test_custom_family_rejects_bad_callables() -> None:
    with pytest.raises(TypeError, match="cdf must be callable"):
        custom_noise(0.5, torch.logit)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="same shape"):
        custom_noise(lambda x: x.sum(), torch.logit)
    with pytest.raises(ValueError, match="icdf must return finite"):
        custom_noise(torch.sigmoid, lambda u: torch.full_like(u, math.nan))
