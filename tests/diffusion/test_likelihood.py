"""nll_bpd against an independent float64 computation: for a linear eps-model every term of the
bound has a closed-form expectation over the noise (the decoder's by Gauss-Hermite quadrature
with SciPy's normal CDF), so the Monte Carlo estimate of nll_bpd must match it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from kexue.diffusion import NoiseSchedule, UNet
from kexue.diffusion.likelihood import discretized_gaussian_log_likelihood, nll_bpd
from kexue.distributed import keyed_generator
from kexue.exceptions import NonFiniteError
from kexue.testing.diffusion import gaussian_eps as linear_eps

S = NoiseSchedule.cosine(25)
WRONG_STD = 0.7  # the eps-model is optimal for N(0, 0.7^2), not for the data: an imperfect mean


def bin_logprob(x: float, mean: np.ndarray, std: float) -> np.ndarray:
    """log P(bin of x) under N(mean, std^2), 256 bins on [-1, 1], outer bins open (SciPy)."""
    half = 1 / 255
    upper = 1.0 if x > 1 - half else norm.cdf((x + half - mean) / std)
    lower = 0.0 if x < -1 + half else norm.cdf((x - half - mean) / std)
    return np.log(np.maximum(upper - lower, 1e-300))


def reference_bound(x0: np.ndarray, steps: list[int], variances: list[float], eta: float):
    """E[negative ELBO] in bits/dim of one image x0 (flat, float64), eps_theta = c_t x_t."""
    abar, bbar = S.abar.numpy(), S.bbar.numpy()
    d = x0.size
    top = steps[-1]
    total = 0.5 * np.sum(abar[top] ** 2 * x0**2 + bbar[top] ** 2 - 1 - np.log(bbar[top] ** 2))
    for i in range(len(steps) - 1, 0, -1):
        t, s = steps[i], steps[i - 1]
        a, b, a_s, b_s = abar[t], bbar[t], abar[s], bbar[s]
        c = b / (a**2 * WRONG_STD**2 + b**2)
        sigma2 = eta**2 * (b_s / b) ** 2 * (1 - a**2 / a_s**2)
        direction = math.sqrt(b_s**2 - sigma2)
        # mu_q - mu_p = alpha x0 + beta eps (both linear in x0 and the noise eps of x_t)
        alpha = a_s * b * c - direction * c * a
        beta = -a_s * (1 - b * c) * b / a + direction * (1 - c * b)
        v = variances[i]
        total += np.sum(0.5 * (np.log(v / sigma2) + (sigma2 + alpha**2 * x0**2 + beta**2) / v - 1))
    t = steps[0]
    a, b = abar[t], bbar[t]
    c = b / (a**2 * WRONG_STD**2 + b**2)
    nodes, weights = np.polynomial.hermite_e.hermegauss(120)  # E over eps ~ N(0, 1)
    weights = weights / weights.sum()
    for x in x0:
        mean = (1 - b * c) * x + (1 - b * c) * (b / a) * nodes  # x0_hat
        total -= np.sum(weights * bin_logprob(x, mean, math.sqrt(variances[0])))
    return total / (d * math.log(2))


def ddpm_variances(steps: list[int], kind: str) -> list[float]:
    abar, bbar = S.abar.numpy(), S.bbar.numpy()
    out = []
    for i, t in enumerate(steps):
        s = steps[i - 1] if i else 0
        forward = 1 - abar[t] ** 2 / abar[s] ** 2
        out.append(forward if kind == "large" else (bbar[s] / bbar[t]) ** 2 * forward)
    t2, t1 = steps[1], steps[0]  # DDPM's decoder: the posterior variance of tau_2 -> tau_1
    out[0] = (bbar[t1] / bbar[t2]) ** 2 * (1 - abar[t2] ** 2 / abar[t1] ** 2)
    return out


IMAGES = torch.tensor(
    [[-1.0, 1.0, 2 * 100 / 255 - 1, 2 * 128 / 255 - 1],
     [2 * 3 / 255 - 1, 2 * 250 / 255 - 1, -1.0, 2 * 200 / 255 - 1],
     [2 * 60 / 255 - 1, -1.0, -1.0, 2 * 255 / 255 - 1]],
    dtype=torch.float64,
).view(3, 1, 2, 2)  # fmt: skip
REPEATS = 1500


@pytest.mark.parametrize(
    "steps, eta, kind",
    [(None, 1.0, "small"), (None, 1.0, "large"), ([1, 4, 9, 17, 25], 1.0, "small"),
     ([1, 4, 9, 17, 25], 1.0, "large"), ([1, 4, 9, 17, 25], 0.5, "custom"),
     ([2, 11, 20], 1.0, "custom")],
)  # fmt: skip
def test_nll_matches_the_closed_form_expectation(steps, eta, kind):
    kept = list(range(1, 26)) if steps is None else steps
    if kind == "custom":  # any per-step variance, e.g. twice the forward variance
        variances = [2.0 * v for v in ddpm_variances(kept, "large")]
        spec = torch.tensor(variances, dtype=torch.float64)
    else:
        variances, spec = ddpm_variances(kept, kind), kind
    data = IMAGES.repeat_interleave(REPEATS, 0)
    result = nll_bpd(
        linear_eps(S, WRONG_STD), S, data, steps=steps, variance=spec, eta=eta,
        batch_size=len(data), generator=torch.Generator().manual_seed(0), progress=False,
    )  # fmt: skip
    assert result.steps == kept
    per = result.bpd_per_image.view(3, REPEATS)
    for k in range(3):
        ref = reference_bound(IMAGES[k].flatten().numpy(), kept, variances, eta)
        se = float(per[k].std()) / math.sqrt(REPEATS)
        assert abs(float(per[k].mean()) - ref) < 4.5 * se + 1e-9, (k, float(per[k].mean()), ref)
    # the parts add up, and the prior is exact (no Monte Carlo in it)
    assert result.bpd == pytest.approx(result.prior + float(result.per_step.sum()), rel=1e-12)
    a, b = float(S.abar[kept[-1]]), float(S.bbar[kept[-1]])
    prior = 0.5 * (a**2 * IMAGES**2 + b**2 - 1 - math.log(b**2)).flatten(1).sum(1)
    assert result.prior == pytest.approx(float(prior.mean()) / (4 * math.log(2)), rel=1e-12)


def test_same_draws_give_the_same_terms_as_a_direct_float64_computation():
    """With the noise drawn as nll_bpd documents it (one seed from the generator, then image
    j's eps at step t from keyed_generator(seed, j, t)), every term written out from the guide
    must agree to 1e-10."""
    kept, eta = [1, 4, 9, 17, 25], 0.8
    variances = [2.0 * v for v in ddpm_variances(kept, "large")]
    eps_model = linear_eps(S, WRONG_STD)
    data = IMAGES.repeat_interleave(3, 0)
    got = nll_bpd(eps_model, S, data, steps=kept, eta=eta, variance=torch.tensor(variances),
                  generator=torch.Generator().manual_seed(7), progress=False)  # fmt: skip
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(7)))
    abar, bbar = S.abar.numpy(), S.bbar.numpy()
    x0 = data.flatten(1).numpy()
    nats = 0.5 * np.sum(abar[25] ** 2 * x0**2 + bbar[25] ** 2 - 1 - np.log(bbar[25] ** 2), 1)
    for i in range(len(kept) - 1, -1, -1):
        t = kept[i]
        eps = np.stack([
            torch.randn(data.shape[1:], generator=keyed_generator(seed, j, t),
                        dtype=torch.float64).flatten().numpy()
            for j in range(len(data))
        ])  # fmt: skip
        x_t = abar[t] * x0 + bbar[t] * eps
        eps_theta = bbar[t] * x_t / (abar[t] ** 2 * WRONG_STD**2 + bbar[t] ** 2)
        x0_hat = (x_t - bbar[t] * eps_theta) / abar[t]
        v = variances[i]
        if i == 0:
            for row in range(len(x0)):
                for j in range(x0.shape[1]):
                    nats[row] -= bin_logprob(x0[row, j], np.array(x0_hat[row, j]), math.sqrt(v))
            continue
        s = kept[i - 1]
        sigma2 = eta**2 * (bbar[s] / bbar[t]) ** 2 * (1 - abar[t] ** 2 / abar[s] ** 2)
        c = math.sqrt(bbar[s] ** 2 - sigma2)
        mu_q = abar[s] * x0 + c * eps
        mu_p = abar[s] * x0_hat + c * eps_theta
        nats += np.sum(0.5 * (np.log(v / sigma2) + (sigma2 + (mu_q - mu_p) ** 2) / v - 1), 1)
    want = nats / (4 * math.log(2))
    np.testing.assert_allclose(got.bpd_per_image.numpy(), want, rtol=1e-10)


def test_small_variance_bound_explodes_at_few_steps():
    """The guide's observation: with few steps DDPM's small variance gives a much worse bound."""
    data = IMAGES.repeat_interleave(50, 0)
    kw = {"steps": 3, "progress": False, "generator": torch.Generator().manual_seed(1)}
    results = nll_bpd(linear_eps(S, WRONG_STD), S, data, variance={"small": "small",
                      "large": "large"}, **kw)  # fmt: skip
    assert results["small"].bpd > results["large"].bpd + 1


def test_variances_in_a_dict_share_the_draws():
    data = IMAGES.repeat_interleave(4, 0)
    eps = linear_eps(S, WRONG_STD)
    kw = {"steps": 6, "progress": False}
    both = nll_bpd(eps, S, data, variance={"s": "small", "l": "large"},
                   generator=torch.Generator().manual_seed(2), **kw)  # fmt: skip
    alone = nll_bpd(eps, S, data, variance="large", generator=torch.Generator().manual_seed(2),
                    **kw)  # fmt: skip
    assert torch.equal(both["l"].bpd_per_image, alone.bpd_per_image)
    table = torch.tensor(ddpm_variances(S.trajectory(6), "large"), dtype=torch.float64)
    called = nll_bpd(
        eps, S, data, variance=lambda x, t, s, e: table[S.trajectory(6).index(t)],
        generator=torch.Generator().manual_seed(2), **kw,
    )  # fmt: skip
    torch.testing.assert_close(called.bpd_per_image, alone.bpd_per_image, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "x, mean, std",
    [(0.2, 0.21, 0.05), (-1.0, -0.9, 0.1), (1.0, 0.95, 0.02), (0.5, -0.9, 0.01),
     (-0.3, 0.8, 0.004), (2 * 7 / 255 - 1, 2 * 7 / 255 - 1, 1e-4), (0.0, 0.0, 30.0)],
)  # fmt: skip
def test_discretized_gaussian_against_high_precision(x, mean, std):
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    half = mpmath.mpf(1) / 255
    xm, mm, sm = mpmath.mpf(x), mpmath.mpf(mean), mpmath.mpf(std)
    z_hi = mpmath.inf if x > 1 - 1 / 255 else (xm + half - mm) / sm
    z_lo = -mpmath.inf if x < -1 + 1 / 255 else (xm - half - mm) / sm
    # P = Phi(z_hi) - Phi(z_lo) = Phi(-z_lo) - Phi(-z_hi); 50 digits and unbounded exponents
    prob = (
        mpmath.ncdf(-z_lo) - mpmath.ncdf(-z_hi)
        if z_lo > 0
        else mpmath.ncdf(z_hi) - mpmath.ncdf(z_lo)
    )
    want = float(mpmath.log(prob))
    got = discretized_gaussian_log_likelihood(
        torch.tensor([x], dtype=torch.float64), torch.tensor([mean], dtype=torch.float64), std**2
    )
    assert float(got) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_bins_sum_to_one():
    grid = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, var in ((0.3, 0.01), (-0.99, 0.5), (1.4, 1e-4)):
        logp = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean), var)
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-12)


def test_bad_inputs():
    eps = linear_eps(S, WRONG_STD)
    kw = {"progress": False}
    with pytest.raises(ValueError, match="8-bit"):
        nll_bpd(eps, S, (IMAGES + 0.001).clamp(-1, 1), **kw)
    with pytest.raises(ValueError, match="lie in"):
        nll_bpd(eps, S, IMAGES * 1.5, **kw)
    with pytest.raises(ValueError, match="eta"):
        nll_bpd(eps, S, IMAGES, eta=0.0, **kw)
    with pytest.raises(ValueError, match=r"1\.\.T"):
        nll_bpd(eps, S, IMAGES, steps=[0, 5], **kw)
    with pytest.raises(ValueError, match=r"1\.\.T"):
        nll_bpd(eps, S, IMAGES, steps=[3, 26], **kw)
    with pytest.raises(ValueError, match="one entry per kept step"):
        nll_bpd(eps, S, IMAGES, steps=5, variance=torch.ones(4), **kw)
    with pytest.raises(ValueError, match="decoder"):
        nll_bpd(eps, S, IMAGES, steps=5, variance=torch.tensor([0.0, 1, 1, 1, 1]), **kw)
    with pytest.raises(ValueError, match="non-negative"):
        nll_bpd(eps, S, IMAGES, steps=5, variance=torch.tensor([1.0, -1, 1, 1, 1]), **kw)
    with pytest.raises(ValueError, match="broadcast"):
        nll_bpd(eps, S, IMAGES, steps=5, variance=torch.ones(5, 3, 3), **kw)
    with pytest.raises(ValueError, match="negative"):
        nll_bpd(eps, S, IMAGES, steps=5, variance=lambda x, t, s, e: -torch.ones_like(x), **kw)
    with pytest.raises(ValueError, match="small"):
        nll_bpd(eps, S, IMAGES, variance="analytic", **kw)
    with pytest.raises(TypeError, match="eps_model"):
        nll_bpd("model", S, IMAGES, **kw)
    with pytest.raises(ValueError, match="bins"):
        nll_bpd(eps, S, IMAGES, bins=1, **kw)
    with pytest.raises(ValueError, match="at least one image"):
        nll_bpd(eps, S, IMAGES[:0], **kw)
    with pytest.raises(TypeError, match="data"):
        nll_bpd(eps, S, IMAGES.tolist(), **kw)
    model = UNet(channels=8, channel_mults=(1, 2), blocks=1, T=25, schedule=S)
    with pytest.raises(ValueError, match="schedule"):
        nll_bpd(model, NoiseSchedule.su_linear(25), IMAGES, **kw)


def test_nan_from_the_model_names_the_step():
    def broken(x, t):
        return torch.full_like(x, math.nan) if int(t[0]) == 9 else 0 * x

    with pytest.raises(NonFiniteError, match="t=9"):
        nll_bpd(broken, S, IMAGES, steps=[1, 4, 9, 17, 25], progress=False)


def test_works_with_a_diffusers_unet():
    """The whole pipeline takes any eps-model, here a diffusers UNet2DModel via from_diffusers:
    moments, optimal variance with its shape check, sampling and the NLL bound."""
    pytest.importorskip("diffusers")
    from kexue.diffusion import estimate_moments, from_diffusers, optimal_variance, sample
    from kexue.testing.diffusion import tiny_diffusers_unet

    unet = tiny_diffusers_unet()
    model = from_diffusers(unet).eval()
    s = NoiseSchedule.su_linear(50)
    data = torch.round(torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 255)
    data = data / 127.5 - 1
    with torch.no_grad():
        m = estimate_moments(model, s, data, num_images=None, progress=False)
        var = optimal_variance(m, s, 5, eta=0.0, shape=data.shape)
        images = sample(model, s, (2, 1, 8, 8), steps=5, eta=0.0, variance=var, progress=False)
        assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
        decoder = optimal_variance(m, s, 5, eta=1.0, last_step="decoder", cap_second_last=None)
        got = nll_bpd(model, s, data, steps=5, variance=decoder, progress=False,
                      generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert math.isfinite(got.bpd) and got.bpd > 0
    with pytest.raises(ValueError, match="shape"):
        optimal_variance(m, s, 5, shape=(2, 3, 8, 8))
