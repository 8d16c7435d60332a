"""Label smoothing, mixup and the Beta sampler behind mixup."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kexue.losses import label_smoothing, mixup, sample_beta

F64 = torch.float64


# Label smoothing --------------------------------------------------------------------------------


def test_label_smoothing_hand_examples() -> None:
    t = torch.tensor([[1.0, 0.0, 0.5], [0.25, 1.0, 0.0]], dtype=F64)
    got = label_smoothing(t, 0.2)
    # (1 - 0.2) t + 0.1
    expected = torch.tensor([[0.9, 0.1, 0.5], [0.3, 0.9, 0.1]], dtype=F64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
    hard = torch.tensor([True, False, True])
    torch.testing.assert_close(
        label_smoothing(hard, 0.1), torch.tensor([0.95, 0.05, 0.95]), rtol=0, atol=1e-7
    )
    torch.testing.assert_close(label_smoothing(t, 0.0), t, rtol=0, atol=0)
    torch.testing.assert_close(label_smoothing(t, 1.0), torch.full_like(t, 0.5), rtol=0, atol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.3, 1.0])
def test_label_smoothing_range(gen, alpha: float) -> None:
    t = torch.rand(50, 20, generator=gen(0), dtype=F64)
    t[0, :2] = torch.tensor([0.0, 1.0], dtype=F64)
    out = label_smoothing(t, alpha)
    assert out.min().item() >= alpha / 2 - 1e-15
    assert out.max().item() <= 1 - alpha / 2 + 1e-15
    assert out[0, 0].item() == pytest.approx(alpha / 2, abs=1e-15)
    assert out[0, 1].item() == pytest.approx(1 - alpha / 2, abs=1e-15)


def test_label_smoothing_errors() -> None:
    t = torch.rand(3, 4)
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="alpha"):
            label_smoothing(t, bad)
    with pytest.raises(ValueError, match="target"):
        label_smoothing(t + 1.0, 0.1)
    with pytest.raises(TypeError, match="target"):
        label_smoothing(torch.ones(3, 4, dtype=torch.long), 0.1)


# Mixup ------------------------------------------------------------------------------------------


def _recover(mixed: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """From mixed one-hot rows ``lam_i e_i + (1 - lam_i) e_perm(i)``: lam (per row) and perm."""
    b = mixed.shape[0]
    lam = torch.empty(b, dtype=F64)
    perm = []
    for i in range(b):
        row = mixed[i]
        nonzero = row.nonzero().flatten().tolist()
        others = [j for j in nonzero if j != i]
        assert len(others) <= 1, "each mixed row has at most two sources"
        if others:
            perm.append(others[0])
            lam[i] = row[i]
            assert row[i] + row[others[0]] == pytest.approx(1.0, abs=1e-12)
        else:  # paired with itself: the row is unchanged whatever lam is
            perm.append(i)
            assert row[i].item() == pytest.approx(1.0, abs=1e-12)
            lam[i] = math.nan
    assert sorted(perm) == list(range(b)), "perm must be a permutation of the batch"
    return lam, perm


@pytest.mark.parametrize("alpha", [0.4, 1.0, 2.0])
def test_mixup_is_a_convex_mix_with_a_permutation(gen, alpha: float) -> None:
    b, n = 16, 5
    x = torch.eye(b, dtype=F64).reshape(b, 1, b).expand(b, 3, b).clone()  # extra dim: 3 copies
    t = torch.rand(b, n, generator=gen(1), dtype=F64)
    x_mix, t_mix = mixup(x, t, alpha, generator=gen(2))
    assert x_mix.shape == x.shape and t_mix.shape == t.shape
    assert torch.equal(x_mix[:, 0], x_mix[:, 2])
    lam, perm = _recover(x_mix[:, 0])
    known = lam[~lam.isnan()]
    assert known.numel() > 0
    lam0 = known[0].item()
    assert 0.0 < lam0 < 1.0
    torch.testing.assert_close(known, torch.full_like(known, lam0), rtol=0, atol=1e-12)
    expected_t = lam0 * t + (1 - lam0) * t[perm]
    torch.testing.assert_close(t_mix, expected_t, rtol=0, atol=1e-12)
    assert t_mix.min().item() >= 0.0 and t_mix.max().item() <= 1.0


def test_mixup_per_sample(gen) -> None:
    b = 32
    x = torch.eye(b, dtype=F64)
    t = (torch.rand(b, 6, generator=gen(3)) < 0.3).float()
    x_mix, t_mix = mixup(x, t, 1.0, generator=gen(4), per_sample=True)
    lam, perm = _recover(x_mix)
    known = lam[~lam.isnan()]
    assert known.unique().numel() > 1, "per-sample mixup draws one lam per row"
    for i in range(b):
        li = 1.0 if math.isnan(lam[i]) else lam[i].item()
        expected = li * t[i] + (1 - li) * t[perm[i]]
        torch.testing.assert_close(t_mix[i], expected, rtol=0, atol=1e-6)
    assert t_mix.min().item() >= 0.0 and t_mix.max().item() <= 1.0


@pytest.mark.parametrize("alpha", [0.4, 2.0])
@pytest.mark.parametrize("per_sample", [False, True])
def test_mixup_lambda_follows_beta_alpha_alpha(gen, alpha: float, per_sample: bool) -> None:
    """The mixing weights recovered from one-hot inputs follow Beta(alpha, alpha): a
    Kolmogorov-Smirnov test against scipy's Beta CDF (the symmetric law, not Beta(alpha, 1))."""
    stats = pytest.importorskip("scipy.stats")
    b, draws = (64, []) if per_sample else (4, [])
    g = gen(21)
    x, t = torch.eye(b, dtype=F64), torch.zeros(b, 1, dtype=F64)
    for _ in range(40 if per_sample else 600):
        mixed = mixup(x, t, alpha, generator=g, per_sample=per_sample)[0]
        moved = (mixed != 0).sum(1) == 2  # rows mixed with another row: lam_i = mixed[i, i]
        lam = mixed.diagonal()[moved]
        draws += lam.tolist() if per_sample else lam[:1].tolist()
    assert len(draws) > 500
    assert stats.kstest(draws, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    assert abs(float(np.mean(draws)) - 0.5) < 0.03  # symmetric: Beta(alpha, 1) has mean < 0.5


def test_mixup_bool_targets_become_soft(gen) -> None:
    x = torch.randn(10, 4, generator=gen(5))
    t = torch.rand(10, 7, generator=gen(6)) < 0.5
    _, t_mix = mixup(x, t, 0.5, generator=gen(7))
    assert t_mix.is_floating_point()
    assert t_mix.min().item() >= 0.0 and t_mix.max().item() <= 1.0


def test_mixup_reproducible_with_generator(gen) -> None:
    x = torch.randn(20, 8, generator=gen(8))
    t = torch.rand(20, 3, generator=gen(9))
    a = mixup(x, t, 0.7, generator=gen(123))
    b = mixup(x, t, 0.7, generator=gen(123))
    c = mixup(x, t, 0.7, generator=gen(124))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_mixup_errors() -> None:
    x = torch.randn(4, 3)
    t = torch.rand(4, 2)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="alpha"):
            mixup(x, t, bad)
    with pytest.raises(ValueError, match="batch"):
        mixup(x, torch.rand(5, 2), 1.0)
    with pytest.raises(TypeError, match="x"):
        mixup(torch.ones(4, 3, dtype=torch.long), t, 1.0)
    with pytest.raises(ValueError, match="target"):
        mixup(x, t + 2.0, 1.0)


# Beta sampler ------------------------------------------------------------------------------------


def _beta_raw_moment(a: float, b: float, k: int) -> float:
    return math.prod((a + r) / (a + b + r) for r in range(k))


@pytest.mark.parametrize("a,b", [(0.2, 0.2), (0.5, 2.0), (1.0, 1.0), (2.0, 5.0), (0.3, 4.0)])
def test_sample_beta_moments(gen, a: float, b: float) -> None:
    size = 200_000
    x = sample_beta(a, b, size, generator=gen(10))
    assert x.shape == (size,) and x.dtype == F64
    assert x.min().item() >= 0.0 and x.max().item() <= 1.0
    m1, m2, m3, m4 = (_beta_raw_moment(a, b, k) for k in (1, 2, 3, 4))
    var = m2 - m1**2
    mu4 = m4 - 4 * m3 * m1 + 6 * m2 * m1**2 - 3 * m1**4  # 4th central moment
    assert abs(x.mean().item() - m1) <= 4 * math.sqrt(var / size)
    assert abs(x.var().item() - var) <= 4 * math.sqrt((mu4 - var**2) / size)


def test_sample_beta_reproducible_and_errors(gen) -> None:
    assert torch.equal(
        sample_beta(0.5, 0.5, 10, generator=gen(1)), sample_beta(0.5, 0.5, 10, generator=gen(1))
    )
    assert not torch.equal(
        sample_beta(0.5, 0.5, 10, generator=gen(1)), sample_beta(0.5, 0.5, 10, generator=gen(2))
    )
    for a, b in ((0.0, 1.0), (1.0, -1.0)):
        with pytest.raises(ValueError, match="Beta"):
            sample_beta(a, b, 3)
