"""Hub-prior sampling reproduced by hand, its errors, and the truncated-normal baseline."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from kexue.hubness import HubPriorSampler, truncated_normal_latents
from kexue.testing.hubness import brute_force_k_occurrence, hub_prior_by_hand


def test_sampler_keeps_exactly_the_candidates_that_reach_the_threshold():
    d, pool, k, t, n = 24, 400, 5, 15, 30
    sampler = HubPriorSampler(
        d, k=k, threshold=t, pool_size=pool, generator=torch.Generator().manual_seed(0),
        progress=False, dtype=torch.float64,
    )  # fmt: skip
    z = sampler.sample(n)
    # the same rounds by hand: same generator stream, float64 brute-force N_k
    expected_z, values, rounds = hub_prior_by_hand(0, n, d, k=k, threshold=t, pool_size=pool)
    assert torch.equal(z, expected_z)
    assert sampler.hub_values_.tolist() == values.tolist()
    assert (values == t).any()  # the boundary is exercised: N_k = threshold is kept
    assert sampler.rounds_ == rounds
    assert sampler.candidates_seen_ == sampler.rounds_ * pool
    gen = torch.Generator().manual_seed(0)
    passed = sum(
        int((brute_force_k_occurrence(torch.randn(pool, d, generator=gen, dtype=torch.float64)
                                      .numpy(), k) >= t).sum())
        for _ in range(rounds)
    )  # fmt: skip
    assert sampler.acceptance_rate_ == pytest.approx(passed / (rounds * pool))
    assert (sampler.hub_values_ >= t).all()


def test_hub_prior_latents_are_closer_to_the_centre_than_random_ones():
    gen = torch.Generator().manual_seed(1)
    z = HubPriorSampler(64, threshold=30, pool_size=2000, generator=gen, progress=False).sample(200)
    random = torch.randn(2000, 64, generator=gen)
    assert z.norm(dim=1).mean() < random.norm(dim=1).mean() - 0.5


def test_latent_shapes_and_sample_from_a_generator():
    calls = []

    def generate(latents: torch.Tensor) -> torch.Tensor:
        calls.append(len(latents))
        return latents.flatten(1).sum(1, keepdim=True) * 2

    sampler = HubPriorSampler(
        (1, 4, 4), threshold=12, pool_size=500, generator=torch.Generator().manual_seed(2),
        progress=False,
    )  # fmt: skip
    out = sampler.sample_from(generate, 25, batch_size=10)
    assert calls == [10, 10, 5]
    assert sampler.latents_.shape == (25, 1, 4, 4)
    torch.testing.assert_close(out, generate(sampler.latents_))
    again = HubPriorSampler(
        (1, 4, 4), threshold=12, pool_size=500, generator=torch.Generator().manual_seed(2),
        progress=False,
    ).sample(25)  # fmt: skip
    assert torch.equal(again, sampler.latents_)
    with pytest.raises(ValueError, match="one row per latent"):
        sampler.sample_from(lambda z: z[:1], 3)
    with pytest.raises(TypeError, match="generate_fn must be callable"):
        sampler.sample_from(None, 3)


def test_impossible_thresholds_fail_clearly():
    with pytest.raises(ValueError, match=r"threshold=1000 can never be met.*pool of 1,?000"):
        HubPriorSampler(8, threshold=1000, pool_size=1000)
    HubPriorSampler(8, threshold=1000, pool_size=1000, exclude_self=False)  # reachable then
    # in the plane a point is among the 5 nearest neighbours of few others: 300 never happens
    sampler = HubPriorSampler(
        2, threshold=300, pool_size=1000, max_rounds=2, progress=False,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"after 2 rounds.*only 0 of 5.*largest N_k seen"):
        sampler.sample(5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"latent_dim": 0}, "latent_dim"),
        ({"latent_dim": (3, 0)}, "latent_dim"),
        ({"k": 0}, "k must be a positive int"),
        ({"pool_size": 5, "k": 5}, "k=5 must be < pool_size=5"),
        ({"threshold": -1}, "threshold=-1 can never be met"),
        ({"metric": "l2"}, "metric"),
        ({"max_rounds": 0}, "max_rounds"),
    ],
)
def test_sampler_arguments_are_checked(kwargs, match):
    kwargs = {"latent_dim": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        HubPriorSampler(**kwargs)
    with pytest.raises(ValueError, match="n must be a positive int"):
        HubPriorSampler(8).sample(0)


@pytest.mark.parametrize("psi", [0.3, 1.0, 2.5])
def test_truncated_normal_matches_scipy(psi):
    z = truncated_normal_latents(
        40_000, psi, latent_dim=2, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    assert z.shape == (40_000, 2)
    assert z.abs().max() <= psi
    ref = stats.truncnorm(-psi, psi)
    # KS test against scipy's truncated normal; 40k draws detect a 0.01 CDF error
    assert stats.kstest(z.flatten().numpy(), ref.cdf).statistic < 0.01
    assert float(z.var()) == pytest.approx(ref.var(), rel=0.03)


def test_truncation_variants():
    gen = torch.Generator().manual_seed(5)
    plain = truncated_normal_latents(4, math.inf, latent_dim=(2, 3), generator=gen)
    assert plain.shape == (4, 2, 3)
    a = truncated_normal_latents(
        6, 0.7, latent_dim=5, method="scale", generator=torch.Generator().manual_seed(6)
    )
    b = 0.7 * torch.randn(6, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    torch.testing.assert_close(a, b.float())
    with pytest.raises(ValueError, match="psi must be a positive number"):
        truncated_normal_latents(4, 0.0, latent_dim=2)
    with pytest.raises(ValueError, match="method must be"):
        truncated_normal_latents(4, 1.0, latent_dim=2, method="clip")
    with pytest.raises(ValueError, match="latent_dim"):
        truncated_normal_latents(4, 1.0, latent_dim=-2)


def test_sampler_rejects_a_latent_dtype_it_cannot_draw():
    # torch.randn(dtype=torch.int64) fails deep inside with NotImplementedError
    with pytest.raises(TypeError, match=r"dtype must be a floating torch\.dtype"):
        HubPriorSampler(8, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype"):
        HubPriorSampler(8, dtype="float32")
    with pytest.raises(TypeError, match="dtype must be a floating"):
        truncated_normal_latents(4, 1.0, latent_dim=2, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        HubPriorSampler(8, generator=0)
    with pytest.raises(TypeError, match="k must be a positive int"):
        HubPriorSampler(8, k=2.0)
    with pytest.raises(TypeError, match="exclude_self must be a bool"):
        HubPriorSampler(8, exclude_self=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        HubPriorSampler(8, backend="annoy")
    z = HubPriorSampler(
        8, threshold=5, pool_size=200, progress=False, dtype=torch.float64,
        generator=torch.Generator().manual_seed(7),
    ).sample(3)  # fmt: skip
    assert z.dtype == torch.float64
