"""``PerturbedArgmax`` as a torch Distribution: exact sampling, log_prob, entropy, relaxation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from kexue.distributions import NOISE_NAMES, PerturbedArgmax, uniform
from kexue.testing.perturbed_argmax import reference_probs

F64 = torch.float64


def test_probs_and_logits_match_the_reference(random_mu) -> None:
    mu = random_mu((2, 5))
    dist = PerturbedArgmax(mu, "normal", num_nodes=64)
    assert dist.batch_shape == (2,) and dist.event_shape == ()
    for row in range(2):
        ref = reference_probs(mu[row].numpy(), "normal")
        np.testing.assert_allclose(dist.probs[row].numpy(), ref, atol=1e-9)
        np.testing.assert_allclose(dist.logits[row].numpy(), np.log(ref), rtol=1e-8)


@pytest.mark.parametrize("family", NOISE_NAMES)
def test_exact_samples_follow_probs(random_mu, family: str) -> None:
    """Chi-square goodness of fit of 100k exact draws argmax(mu + eps) against probs."""
    mu = random_mu((4,), seed=1, scale=0.7)
    dist = PerturbedArgmax(mu, family, num_nodes=64)
    draws = dist.sample((100_000,), generator=torch.Generator().manual_seed(2))
    assert draws.shape == (100_000,) and draws.dtype == torch.long
    counts = np.bincount(draws.numpy(), minlength=4)
    p = dist.probs.numpy()
    keep = p > 0
    assert counts[~keep].sum() == 0
    pvalue = stats.chisquare(counts[keep], 100_000 * p[keep] / p[keep].sum()).pvalue
    assert pvalue > 1e-3


def test_sampling_uses_only_the_generator(random_mu) -> None:
    dist = PerturbedArgmax(random_mu((3, 6)), "logistic")
    state = torch.random.get_rng_state()
    a = dist.sample((50,), generator=torch.Generator().manual_seed(4))
    b = dist.sample((50,), generator=torch.Generator().manual_seed(4))
    assert a.shape == (50, 3) and torch.equal(a, b)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_log_prob_entropy_and_mode(random_mu) -> None:
    mu = random_mu((3, 5), seed=5)
    dist = PerturbedArgmax(mu, "laplace", num_nodes=64)
    value = torch.tensor([4, 0, 2])
    expected = [math.log(reference_probs(mu[i].numpy(), "laplace")[v]) for i, v in enumerate(value)]
    # Laplace maps converge algebraically (kinks): ~1e-5 at K = 64
    np.testing.assert_allclose(dist.log_prob(value).numpy(), expected, rtol=2e-4)
    assert dist.log_prob(torch.tensor(1)).shape == (3,)  # broadcasts over the batch
    ent = [stats.entropy(reference_probs(mu[i].numpy(), "laplace")) for i in range(3)]
    np.testing.assert_allclose(dist.entropy().numpy(), ent, rtol=2e-4)
    assert torch.equal(dist.mode, mu.argmax(-1))
    support = dist.enumerate_support()
    assert support.shape == (5, 3) and support[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_entropy_with_exact_zeros_is_finite_with_finite_gradient() -> None:
    mu = torch.tensor([0.0, -0.3, -5.0], dtype=F64, requires_grad=True)
    dist = PerturbedArgmax(mu, uniform(1.0))
    assert dist.probs[2] == 0
    p = reference_probs(mu.detach().numpy(), "uniform")
    assert dist.entropy().item() == pytest.approx(stats.entropy(p), abs=1e-4)
    dist.entropy().backward()
    assert torch.isfinite(mu.grad).all()


def test_relaxed_sample_tends_to_the_exact_sample(random_mu) -> None:
    mu = random_mu((2, 6), seed=6).requires_grad_()
    dist = PerturbedArgmax(mu, "normal")
    soft = dist.rsample_relaxed(0.5, (1000,), generator=torch.Generator().manual_seed(7))
    assert soft.shape == (1000, 2, 6)
    torch.testing.assert_close(soft.sum(-1), torch.ones(1000, 2, dtype=F64))
    soft.mean(0)[0, 0].backward()
    assert mu.grad is not None and mu.grad[0, 0] > 0
    cold = dist.rsample_relaxed(1e-4, (1000,), generator=torch.Generator().manual_seed(7))
    hard = dist.sample((1000,), generator=torch.Generator().manual_seed(7))
    assert torch.equal(cold.argmax(-1), hard)
    assert (cold.detach().amax(-1) > 0.99).float().mean() > 0.95


@pytest.mark.parametrize("tau, error", [(0.0, ValueError), (-1.0, ValueError), ("1", TypeError)])
def test_relaxed_sample_rejects_bad_tau(tau, error) -> None:
    with pytest.raises(error, match="tau must be a positive"):
        PerturbedArgmax(torch.zeros(3)).rsample_relaxed(tau)


def test_validation_and_expand() -> None:
    with pytest.raises(ValueError, match="mu must be finite"):
        PerturbedArgmax(torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match="num_nodes"):
        PerturbedArgmax(torch.zeros(3), num_nodes=1)
    with pytest.raises(ValueError, match="noise must be one of"):
        PerturbedArgmax(torch.zeros(3), "student")
    dist = PerturbedArgmax(torch.zeros(4), validate_args=True)
    with pytest.raises(ValueError):
        dist.log_prob(torch.tensor(4))
    big = dist.expand(torch.Size([3]))
    assert big.batch_shape == (3,)
    torch.testing.assert_close(big.probs, torch.full((3, 4), 0.25))
    assert "normal" in repr(big)
