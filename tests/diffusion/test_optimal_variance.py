"""optimal_variance / fixed_variance / optimal_trajectory against formulas written out here,
and sampling with the optimal variance on Gaussian data, where it makes every reverse step
exact (so the samples have exactly the data's variance; DDPM's small variance does not)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kexue.diffusion import NoiseSchedule, sample
from kexue.diffusion.moments import DiffusionMoments, estimate_moments
from kexue.diffusion.sampler import jumps
from kexue.diffusion.variance import (
    SECOND_TO_LAST_CAP,
    fixed_variance,
    jump_costs,
    optimal_trajectory,
    optimal_variance,
)
from kexue.testing.diffusion import gaussian_eps


def moments_with(
    schedule: NoiseSchedule, sbar2: list[float], shape=(1, 2, 2), error: list[float] | None = None
) -> DiffusionMoments:
    """Moments whose Gamma form gives exactly ``sbar2`` (and is the better-conditioned form)
    and whose MLE form gives ``error`` (default: ``sbar2``, a perfect mean)."""
    T = schedule.T
    s2 = torch.tensor(sbar2, dtype=torch.float64)
    abar = schedule.abar.double()
    ratio = (1 - abar[1:] ** 2) / abar[1:] ** 2
    gamma = 1 - s2 / ratio
    zeros = torch.zeros(T, dtype=torch.float64)
    diag = torch.zeros((T, *shape), dtype=torch.float64)
    err = torch.tensor(sbar2 if error is None else error, dtype=torch.float64) / ratio
    return DiffusionMoments(
        Gamma=gamma, Gamma_sq=gamma**2, eps2=diag + gamma.view(-1, 1, 1, 1), moment=zeros,
        moment_sq=zeros + 1.0, moment_diag=diag, err=err, err_sq=err**2, err_diag=diag,
        abar=abar.clone(), data_var=0.3, num_images=100, image_shape=shape,
        schedule_config=dict(schedule.config),
    )  # fmt: skip


def reference_variance(schedule, steps, sbar2, eta):
    """The general posterior of the guide: sigma^2 + gamma^2 sbar^2 per jump, floats only."""
    out = []
    for i, t in enumerate(steps):
        s = steps[i - 1] if i else 0
        a_t, b_t = float(schedule.abar[t]), float(schedule.bbar[t])
        a_s, b_s = float(schedule.abar[s]), float(schedule.bbar[s])
        sigma2 = eta**2 * (b_s / b_t) ** 2 * (1 - a_t**2 / a_s**2)
        gamma = a_s - a_t * math.sqrt(max(b_s**2 - sigma2, 0.0)) / b_t
        out.append(sigma2 + gamma**2 * sbar2[t - 1])
    return out


S = NoiseSchedule.su_linear(50)
STEPS = [1, 4, 12, 30, 50]


def in_range_sbar2(schedule):
    a = schedule.abar.double()[1:]
    ratio = (1 - a**2) / a**2
    return (0.5 * torch.minimum(ratio, torch.ones_like(ratio))).tolist()


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_formula_matches_the_note(eta):
    sbar2 = in_range_sbar2(S)
    m = moments_with(S, sbar2)
    got = optimal_variance(m, S, STEPS, eta=eta, last_step="decoder", cap_second_last=None)
    want = reference_variance(S, STEPS, sbar2, eta)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=0)
    assert (got > 0).all()  # non-zero even for DDIM (eta = 0)
    assert got[0] == pytest.approx(sbar2[0], rel=1e-10)  # last jump: sigma = 0, gamma = 1


def test_clipping_encodes_the_two_bounds():
    a = S.abar.double()[1:]
    ratio = (1 - a**2) / a**2
    bound = torch.minimum(ratio, torch.ones_like(ratio))
    raw = [(-0.5 if t % 2 else 5.0) * float(r) for t, r in enumerate(ratio)]  # below 0 / above
    m = moments_with(S, raw)
    kept = list(range(1, 51))
    lower = torch.tensor(reference_variance(S, kept, [0.0] * 50, 1.0), dtype=torch.float64)
    upper = torch.tensor(reference_variance(S, kept, bound.tolist(), 1.0), dtype=torch.float64)
    got = optimal_variance(m, S, None, eta=1.0, last_step="decoder", cap_second_last=None)
    assert ((got - lower).abs() < 1e-15)[1::2].all()  # negative estimates -> forward posterior
    torch.testing.assert_close(got[0::2], upper[0::2], rtol=1e-12, atol=0)  # capped at bound
    unclipped = optimal_variance(m, S, None, eta=1.0, clip=False, last_step="decoder",
                                 cap_second_last=None)  # fmt: skip
    want = torch.tensor(reference_variance(S, kept, raw, 1.0), dtype=torch.float64)
    torch.testing.assert_close(unclipped, want, rtol=1e-10, atol=1e-15)


def test_last_step_and_second_to_last_cap():
    sbar2 = in_range_sbar2(S)
    m = moments_with(S, sbar2)
    raw = optimal_variance(m, S, STEPS, eta=1.0, last_step="decoder", cap_second_last=None)
    assert raw[1] > SECOND_TO_LAST_CAP  # so the cap has something to do
    default = optimal_variance(m, S, STEPS, eta=1.0)
    assert default[0] == 0.0
    assert default[1] == pytest.approx(SECOND_TO_LAST_CAP)
    assert SECOND_TO_LAST_CAP == pytest.approx((2 * (2 / 255) * math.sqrt(math.pi / 2)) ** 2)
    torch.testing.assert_close(default[2:], raw[2:])
    loose = optimal_variance(m, S, STEPS, eta=1.0, cap_second_last=1.0)
    assert loose[1] == raw[1]


def test_fixed_variances_match_ddpm():
    small = fixed_variance(S, STEPS, "small", last_step="decoder", cap_second_last=None)
    large = fixed_variance(S, STEPS, "large", last_step="decoder", cap_second_last=None)
    for i, t in enumerate(STEPS[1:], start=1):
        s = STEPS[i - 1]
        a_t, a_s = float(S.abar[t]), float(S.abar[s])
        b_t, b_s = float(S.bbar[t]), float(S.bbar[s])
        assert large[i] == pytest.approx(1 - a_t**2 / a_s**2, rel=1e-12)
        assert small[i] == pytest.approx((b_s / b_t) ** 2 * (1 - a_t**2 / a_s**2), rel=1e-12)
    # DDPM's decoder variance (its clipped log-variance): the next jump's posterior variance
    assert small[0] == large[0] == small[1]
    sampler = torch.tensor(
        [j.noise_var for j in reversed(jumps(S, STEPS, 1.0, "small"))], dtype=torch.float64
    )
    for_sampling = fixed_variance(S, STEPS, "small")
    torch.testing.assert_close(for_sampling[2:], sampler[2:])
    assert float(for_sampling[1]) == pytest.approx(min(float(sampler[1]), SECOND_TO_LAST_CAP))
    assert for_sampling[0] == fixed_variance(S, STEPS, "large")[0] == 0.0


@pytest.mark.parametrize("error", ["assumed", "mle"])
def test_dynamic_programming_finds_the_cheapest_trajectory(error):
    """Brute force over all trajectories of a short schedule, with the per-jump cost (the
    expected KL per dim of the jump) written out from the guide. The model's mean error is 3x
    the perfect-mean estimate, so the two cost modes differ."""
    s = NoiseSchedule.su_linear(12)
    g = torch.Generator().manual_seed(0)
    sbar2 = (torch.rand(12, generator=g, dtype=torch.float64) * 0.5 + 0.01).tolist()
    mean_error = [3 * v for v in sbar2]
    m = moments_with(s, sbar2, error=mean_error)

    def cost(a, b):  # jump b -> a, eta = 1
        a_t, b_t = float(s.abar[b]), float(s.bbar[b])
        a_s, b_s = float(s.abar[a]), float(s.bbar[a])
        lam2 = (b_s / b_t) ** 2 * (1 - a_t**2 / a_s**2)
        gamma = a_s - a_t * math.sqrt(b_s**2 - lam2) / b_t
        used = min(sbar2[b - 1], (1 - a_t**2) / a_t**2, 1.0)  # the clipped estimate
        v = lam2 + gamma**2 * used
        e = used if error == "assumed" else mean_error[b - 1]  # E|mu_q - mu_p|^2 = gamma^2 e
        return 0.5 * (math.log(v / lam2) + (lam2 + gamma**2 * e) / v - 1)

    J = jump_costs(m, s, error=error)
    assert J[3, 7] == pytest.approx(cost(3, 7), rel=1e-12)
    for K in (3, 4, 6):
        best = min(
            ([1, *mid, 12] for mid in itertools.combinations(range(2, 12), K - 2)),
            key=lambda p: sum(cost(a, b) for a, b in itertools.pairwise(p)),
        )
        found = optimal_trajectory(m, s, K, error=error)
        assert found == best
        assert len(found) == K and found[0] == 1 and found[-1] == 12
    assert optimal_trajectory(m, s, 12) == list(range(1, 13))
    if error == "mle":
        assert not torch.allclose(J[1:, 2:], jump_costs(m, s, error="assumed")[1:, 2:])


def test_trajectory_of_a_real_shape_beats_even_spacing():
    s = NoiseSchedule.su_linear(200)
    a = s.abar.double()[1:]
    sbar2 = (0.25 * (1 - a**2) / (a**2 * 0.25 + 1 - a**2)).tolist()  # N(0, 0.5^2) data
    m = moments_with(s, sbar2)
    J = jump_costs(m, s)
    total = lambda p: sum(float(J[x, y]) for x, y in itertools.pairwise(p))  # noqa: E731
    dp, even = optimal_trajectory(m, s, 10), s.trajectory(10)
    assert total(dp) <= total(even) + 1e-12
    assert dp != even


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_optimal_variance_makes_gaussian_sampling_exact(eta):
    """Data N(0, s^2), exact eps-model, K = 5 steps: the true reverse step is
    N(mean, sigma^2 + gamma^2 Var[x_0 | x_t]), so sampling with the optimal variance (estimated
    from data) reproduces Var = s^2; DDPM/DDIM with the fixed variance is over-smoothed."""
    s, std = NoiseSchedule.su_linear(1000), 0.5
    gen = torch.Generator().manual_seed(5)
    data = std * torch.randn(2000, 1, 2, 2, generator=gen, dtype=torch.float64)
    eps = gaussian_eps(s, std)
    steps = s.trajectory(5)
    m = estimate_moments(eps, s, data, timesteps=steps, num_images=None, generator=gen,
                         progress=False, data_range=(-math.inf, math.inf))  # fmt: skip
    var = optimal_variance(m, s, steps, eta=eta, last_step="decoder", cap_second_last=None)
    x_T = torch.randn(10_000, 1, 2, 2, generator=gen, dtype=torch.float64)
    x_T = x_T * math.sqrt(float(s.abar[-1]) ** 2 * std**2 + float(s.bbar[-1]) ** 2)
    common = {"steps": steps, "eta": eta, "x_T": x_T, "dtype": torch.float64, "progress": False}
    exact = sample(eps, s, x_T.shape, variance=var, generator=gen, **common)
    fixed = sample(eps, s, x_T.shape, variance="small" if eta else None, generator=gen, **common)
    # 40k draws: the standard error of the variance is s^2 sqrt(2/40000) = 0.0018
    assert abs(float(exact.var()) - std**2) < 0.008
    assert float(fixed.var()) < std**2 - 0.03


def test_bad_inputs_name_the_problem():
    m = moments_with(S, in_range_sbar2(S))
    with pytest.raises(ValueError, match="schedule"):
        optimal_variance(m, NoiseSchedule.cosine(50), 10)
    with pytest.raises(ValueError, match="shape"):
        optimal_variance(m, S, 10, shape=(16, 1, 28, 28))
    with pytest.raises(ValueError, match=r"1\.\.T"):
        optimal_variance(m, S, [0, 5, 10])
    with pytest.raises(ValueError, match=r"1\.\.T"):
        optimal_variance(m, S, [3, 51])
    with pytest.raises(ValueError, match="K must be"):
        optimal_variance(m, S, 51)
    with pytest.raises(ValueError, match="kind"):
        optimal_variance(m, S, 10, kind="paper")
    with pytest.raises(ValueError, match="eta"):
        optimal_variance(m, S, 10, eta=-1.0)
    with pytest.raises(ValueError, match="last_step"):
        optimal_variance(m, S, 10, last_step="noise")
    with pytest.raises(TypeError, match="moments"):
        optimal_variance({"Gamma": 1}, S, 10)
    with pytest.raises(ValueError, match="K must be"):
        optimal_trajectory(m, S, 1)
    with pytest.raises(ValueError, match="error"):
        optimal_trajectory(m, S, 5, error="true")
    with pytest.raises(ValueError, match="small"):
        fixed_variance(S, 10, "medium")


def test_negative_variance_from_a_callable_is_refused():
    s = NoiseSchedule.su_linear(20)
    with pytest.raises(ValueError, match="negative"):
        sample(lambda x, t: 0 * x, s, (2, 1, 2, 2), steps=5, progress=False,
               variance=lambda x, t, s_, e: -torch.ones_like(x))  # fmt: skip
