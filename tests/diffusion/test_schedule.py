"""NoiseSchedule: identities of the notation, conversions, trajectories, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kexue.diffusion import NoiseSchedule

ALL = [
    NoiseSchedule.su_linear(1000),
    NoiseSchedule.ddpm_linear(1000, 1e-4, 0.02),
    NoiseSchedule.cosine(1000),
    NoiseSchedule.from_betas(torch.linspace(1e-3, 0.05, 50)),
]


@pytest.mark.parametrize("s", ALL, ids=repr)
def test_identities(s: NoiseSchedule):
    assert s.alpha.dtype == torch.float64 and s.alpha.shape == (s.T + 1,)
    torch.testing.assert_close(s.alpha**2 + s.beta**2, torch.ones_like(s.alpha), rtol=0, atol=1e-15)
    torch.testing.assert_close(s.abar**2 + s.bbar**2, torch.ones_like(s.abar), rtol=0, atol=1e-14)
    assert s.alpha[0] == 1 and s.beta[0] == 0 and s.abar[0] == 1 and s.bbar[0] == 0
    expected = torch.tensor(
        [math.prod(s.alpha[1 : t + 1].tolist()) for t in range(s.T + 1)], dtype=torch.float64
    )
    torch.testing.assert_close(s.abar, expected.double(), rtol=1e-12, atol=1e-300)
    assert (s.abar[1:] < s.abar[:-1]).all()  # strictly more noise at every step


def test_su_linear_is_the_articles_schedule():
    s = NoiseSchedule.su_linear(1000)
    t = torch.arange(1, 1001, dtype=torch.float64)
    torch.testing.assert_close(s.alpha[1:], torch.sqrt(1 - 0.02 * t / 1000))
    # abar_T = exp(0.5 sum log(1 - 0.02 t/T)) ~ exp(-5.005): x_T is essentially N(0, I)
    assert s.abar[-1] < 0.01
    assert float(s.abar[-1]) == pytest.approx(math.exp(0.5 * torch.log1p(-0.02 * t / 1000).sum()))


def test_paper_betas_round_trip():
    paper = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    s = NoiseSchedule.ddpm_linear(1000, 1e-4, 0.02)
    torch.testing.assert_close(s.to_diffusers_betas(), paper)
    torch.testing.assert_close(s.beta[1:] ** 2, paper)  # our beta is the paper's sqrt(beta)
    back = NoiseSchedule.from_betas(s.to_diffusers_betas())
    torch.testing.assert_close(back.abar, s.abar)
    # the paper's alpha-bar is our abar squared
    torch.testing.assert_close(s.abar[1:] ** 2, torch.cumprod(1 - paper, 0))


@pytest.mark.parametrize("s", ALL[:3], ids=repr)
def test_config_round_trip(s):
    again = NoiseSchedule.from_config(s.config)
    assert torch.equal(again.abar, s.abar)


@pytest.mark.parametrize("spacing", ["even", "quadratic"])
@pytest.mark.parametrize("K", [2, 3, 10, 57, 100, 999, 1000])
def test_trajectory(spacing, K):
    steps = NoiseSchedule.su_linear(1000).trajectory(K, spacing)
    assert len(steps) == K and steps[0] == 1 and steps[-1] == 1000
    assert all(b > a for a, b in itertools.pairwise(steps))


def test_quadratic_is_denser_at_small_t():
    steps = NoiseSchedule.su_linear(1000).trajectory(10, "quadratic")
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    assert gaps == sorted(gaps) and gaps[0] < gaps[-1]
    assert NoiseSchedule.su_linear(1000).trajectory(10) == [
        1,
        112,
        223,
        334,
        445,
        556,
        667,
        778,
        889,
        1000,
    ]


def test_errors():
    s = NoiseSchedule.su_linear(100)
    with pytest.raises(ValueError, match=r"K must be in 2\.\.T=100"):
        s.trajectory(1)
    with pytest.raises(ValueError, match="K must be"):
        s.trajectory(101)
    with pytest.raises(TypeError, match="K must be an int"):
        s.trajectory(2.5)
    with pytest.raises(ValueError, match="spacing"):
        s.trajectory(10, "log")
    with pytest.raises(ValueError, match="strictly increasing"):
        s.check_steps([1, 5, 5])
    with pytest.raises(ValueError, match="strictly increasing"):
        s.check_steps([0, 5])
    with pytest.raises(ValueError, match="strictly increasing"):
        s.check_steps([5, 101])
    with pytest.raises(ValueError, match="paper_betas"):
        NoiseSchedule.from_betas([0.1, 1.0])
    with pytest.raises(ValueError, match="paper_betas"):
        NoiseSchedule.from_betas([0.0, 0.1])
    with pytest.raises(ValueError, match="T must be"):
        NoiseSchedule.su_linear(0)
    with pytest.raises(ValueError, match="beta_start"):
        NoiseSchedule.ddpm_linear(10, 0.5, 0.1)
    with pytest.raises(ValueError, match="unknown schedule kind"):
        NoiseSchedule.from_config({"kind": "nope"})


def test_add_noise_is_the_forward_jump():
    """x_t = abar_t x_0 + bbar_t eps, per item, against the product of the alphas written out."""
    s = NoiseSchedule.cosine(50)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 7, 30, 50])
    got = s.add_noise(x0, eps, t)
    for i, step in enumerate(t.tolist()):
        a = math.prod(s.alpha[1 : step + 1].tolist())
        want = a * x0[i] + math.sqrt(1 - a * a) * eps[i]
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-14)
    assert torch.equal(s.add_noise(x0, eps, 0), x0)  # t = 0 is the clean data
    torch.testing.assert_close(s.add_noise(x0, eps, 7), s.add_noise(x0, eps, torch.full((4,), 7)))
    half = s.add_noise(x0.half(), eps.half(), t)
    assert half.dtype == torch.float16  # x0's dtype is kept
    torch.testing.assert_close(half.double(), got, rtol=0, atol=5e-3)


def test_timesteps_and_noise_batch():
    s = NoiseSchedule.su_linear(20)
    t = s.sample_timesteps(20_000, generator=torch.Generator().manual_seed(1))
    assert t.dtype == torch.long and int(t.min()) == 1 and int(t.max()) == 20
    counts = torch.bincount(t, minlength=21)[1:].double()
    assert counts.min() > 850 and counts.max() < 1150  # uniform: 1000 each, sd ~31
    x0 = torch.rand(5, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    batch = s.noise_batch(x0, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # the documented order: steps, then the noise
    t_ref = torch.randint(1, 21, (5,), generator=gen)
    eps_ref = torch.randn(x0.shape, generator=gen)
    assert torch.equal(batch.t, t_ref) and torch.equal(batch.eps, eps_ref)
    a = s.abar.float()[t_ref].view(-1, 1, 1, 1)
    b = s.bbar.float()[t_ref].view(-1, 1, 1, 1)
    assert torch.equal(batch.x_t, a * x0 + b * eps_ref)


def test_add_noise_errors():
    s = NoiseSchedule.su_linear(10)
    x0 = torch.zeros(3, 1, 2, 2)
    with pytest.raises(ValueError, match="eps"):
        s.add_noise(x0, torch.zeros(3, 1, 2), 1)
    with pytest.raises(ValueError, match=r"t must hold steps in 0\.\.T=10"):
        s.add_noise(x0, x0, torch.tensor([1, 2, 11]))
    with pytest.raises(ValueError, match="shape"):
        s.add_noise(x0, x0, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="t must be"):
        s.add_noise(x0, x0, torch.tensor([0.5, 1.0, 2.0]))
    with pytest.raises(ValueError, match="t must be <= 10"):
        s.add_noise(x0, x0, 11)
    with pytest.raises(TypeError, match="x0"):
        s.add_noise(torch.zeros(3, dtype=torch.long), torch.zeros(3), 1)
    with pytest.raises(TypeError, match="x0"):
        s.add_noise([0.0], torch.zeros(1), 1)
    with pytest.raises(ValueError, match="n must be"):
        s.sample_timesteps(-1)
