"""k-occurrence against brute force, the measures against their textbook formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from kexue.hubness import (
    Hubness,
    NotFittedError,
    antihub_occurrence,
    atkinson_index,
    gini_index,
    hub_occurrence,
    hubness_scores,
    k_occurrence,
    k_skewness,
    occurrence_counts,
    robin_hood_index,
)
from kexue.testing.hubness import brute_force_k_occurrence, textbook_measures


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize(("n", "d", "k"), [(40, 3, 1), (300, 20, 5), (500, 100, 10)])
def test_k_occurrence_equals_brute_force(metric, n, d, k, points):
    X = points(n, d, seed=d)
    ref = brute_force_k_occurrence(X.numpy(), k, metric=metric)
    ours = k_occurrence(X, k, metric=metric)
    assert ours.dtype == torch.int64 and ours.shape == (n,)
    np.testing.assert_array_equal(ours.numpy(), ref)
    assert int(ours.sum()) == n * k


def test_self_including_convention_counts_each_point_once_more(points):
    X = points(200, 30, seed=1)
    with_self = k_occurrence(X, 6, exclude_self=False)
    without = k_occurrence(X, 5)
    assert torch.equal(with_self, without + 1)
    assert int(with_self.sum()) == 200 * 6


def test_k_occurrence_over_separate_queries(points):
    X, Y = points(100, 8, seed=2), points(37, 8, seed=3)
    counts = k_occurrence(X, 4, Y=Y)
    ref = np.zeros(100, dtype=np.int64)
    d = ((Y.numpy()[:, None] - X.numpy()[None]) ** 2).sum(-1)
    for row in np.argsort(d, axis=1)[:, :4]:
        ref[row] += 1
    np.testing.assert_array_equal(counts.numpy(), ref)


def test_occurrence_counts_skips_empty_slots_and_checks_range():
    idx = torch.tensor([[1, 2], [2, -1], [2, 0]])
    assert occurrence_counts(idx, 4).tolist() == [1, 1, 3, 0]
    with pytest.raises(ValueError, match="not a row of 2 points"):
        occurrence_counts(idx, 2)


# N = 5 points, k = 2: 10 neighbour slots; mean 2
HAND = [0, 0, 1, 3, 6]


def test_measures_on_a_hand_made_example():
    n = np.array(HAND, dtype=float)
    c = n - n.mean()  # [-2, -2, -1, 1, 4]
    assert k_skewness(HAND) == pytest.approx((48 / 5) / (26 / 5) ** 1.5, rel=1e-12)
    assert k_skewness(HAND) == pytest.approx(stats.skew(n), rel=1e-12)
    assert robin_hood_index(HAND) == pytest.approx(np.abs(c).sum() / (2 * n.sum()))
    assert robin_hood_index(HAND) == pytest.approx(0.5)
    pairs = sum(abs(a - b) for a in HAND for b in HAND)  # 60
    assert gini_index(HAND) == pytest.approx(pairs / (2 * 5 * 10)) == pytest.approx(0.6)
    sqrt_mean = (math.sqrt(1) + math.sqrt(3) + math.sqrt(6)) / 5
    assert atkinson_index(HAND, 0.5) == pytest.approx(1 - sqrt_mean**2 / 2, rel=1e-12)
    assert atkinson_index(HAND, 0.0) == pytest.approx(0.0)
    assert atkinson_index(HAND, 1.0) == 1.0  # two anti-hubs: geometric mean 0
    assert atkinson_index([1, 2, 4], 1.0) == pytest.approx(1 - 2 / (7 / 3))  # (1*2*4)^(1/3) = 2
    harmonic = 1 / np.mean([1, 0.5, 0.25])
    assert atkinson_index([1, 2, 4], 2.0) == pytest.approx(1 - harmonic / (7 / 3))
    # hubs: N_k >= 2k = 4 -> only the point with 6 of the 10 slots
    assert hub_occurrence(HAND, 2) == pytest.approx(6 / 10)
    assert antihub_occurrence(HAND) == pytest.approx(2 / 5)


def test_hub_rule_boundary_issue_vs_reference_note():
    counts = [0, 0, 4, 4, 2]  # N = 5, k = 2: two points exactly at 2k
    assert hub_occurrence(counts, 2) == pytest.approx(8 / 10)  # N_k >= hub_size * k
    # the reference note's N_k > 2k is hub_size = (2k + 1) / k for integer counts
    assert hub_occurrence(counts, 2, hub_size=2.5) == 0.0
    scores = hubness_scores(counts, 2)
    assert (scores.n_hubs, scores.n_antihubs, scores.max_occurrence) == (2, 2, 4)


def test_equal_counts_have_no_hubness():
    flat = [3] * 7
    assert k_skewness(flat) == 0.0
    assert robin_hood_index(flat) == 0.0
    assert gini_index(flat) == 0.0
    assert atkinson_index(flat) == pytest.approx(0.0, abs=1e-15)
    assert hub_occurrence(flat, 3) == 0.0 and antihub_occurrence(flat) == 0.0


def test_one_hub_takes_everything():
    counts = [0] * 9 + [18]  # N = 10, k = ... every list points at one point
    assert robin_hood_index(counts) == pytest.approx(0.9)  # (N - 1) / N
    assert gini_index(counts) == pytest.approx(0.9)
    assert hub_occurrence(counts, 2, n_queries=9) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("fn", "arg", "match"),
    [
        (k_skewness, [], "non-empty 1-D"),
        (k_skewness, [[1, 2]], "non-empty 1-D"),
        (robin_hood_index, [1, -1], "non-negative"),
        (gini_index, [0, 0], "all zeros"),
        (k_skewness, [1, float("nan")], "finite"),
    ],
)
def test_measures_reject_bad_counts(fn, arg, match):
    with pytest.raises(ValueError, match=match):
        fn(arg)


def test_atkinson_and_hub_arguments_are_checked():
    with pytest.raises(ValueError, match="eps must be"):
        atkinson_index([1, 2], -0.5)
    with pytest.raises(ValueError, match="hub_size must be"):
        hub_occurrence([1, 2], 1, hub_size=0)
    with pytest.raises(ValueError, match="k must be a positive int"):
        hub_occurrence([1, 2], 0)


def test_skewness_grows_with_dimension_for_gaussianpoints(points):
    skew = {d: k_skewness(k_occurrence(points(2000, d, seed=d), 5)) for d in (2, 10, 100)}
    # measured with these seeds: about 0.05, 0.76 and 5.0
    assert skew[2] < 0.3 < skew[10] < skew[100]
    assert skew[100] > 3.0


def test_hubs_are_close_to_the_centre(points):
    X = points(2000, 100, seed=4)
    n_k = k_occurrence(X, 5).double()
    rho = stats.spearmanr(n_k.numpy(), X.norm(dim=1).numpy()).statistic
    assert rho < -0.5
    low_d = points(2000, 2, seed=4)
    rho_2 = stats.spearmanr(k_occurrence(low_d, 5).numpy(), low_d.norm(dim=1).numpy()).statistic
    assert abs(rho_2) < abs(rho)


def test_estimator_fits_several_k_from_one_search(points):
    X = points(600, 50, seed=5)
    hub = Hubness(k=(10, 3, 5, 5))
    assert hub.fit(X) is hub
    assert hub.k_values_ == (3, 5, 10)
    assert hub.k_occurrence_.shape == (3, 600)
    assert (hub.n_samples_in_, hub.n_features_in_) == (600, 50)
    assert hub.neighbors_.indices.shape == (600, 10)
    for row, k in enumerate(hub.k_values_):
        separate = k_occurrence(X, k)
        assert torch.equal(hub.k_occurrence_[row], separate)
        assert torch.equal(hub.k_occurrence(k), separate)
        assert hub.score(k=k) == pytest.approx(k_skewness(separate))
        assert hub.score("gini", k=k) == pytest.approx(gini_index(separate))
        assert hub.scores_[k] == hubness_scores(separate, k)
    assert hub.score() == hub.score(k=3)
    hubs = hub.hubs(5)
    counts = hub.k_occurrence(5)
    assert set(hubs.tolist()) == set((counts >= 10).nonzero().flatten().tolist())
    assert (counts[hubs].diff() <= 0).all()
    assert torch.equal(hub.antihubs(5), (counts == 0).nonzero().flatten())


def test_estimator_validates_at_fit_and_names_the_argument(points):
    X = points(20, 3, seed=6)
    with pytest.raises(NotFittedError, match="call fit"):
        Hubness().score()
    for params, match in [
        ({"k": 0}, "k must be a positive int"),
        ({"k": []}, "non-empty sequence"),
        ({"k": 20}, "k=20 is too large"),
        ({"hub_size": -1.0}, "hub_size"),
        ({"atkinson_eps": -1.0}, "eps"),
        ({"metric": "l1"}, "metric"),
    ]:
        est = Hubness(**params)  # construction never fails
        with pytest.raises(ValueError, match=match):
            est.fit(X)
    fitted = Hubness(k=3).fit(X)
    with pytest.raises(ValueError, match="measure must be one of"):
        fitted.score("entropy")
    with pytest.raises(ValueError, match="k=4 was not fitted"):
        fitted.score(k=4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_measures_equal_their_definitions_on_random_counts(seed):
    rng = np.random.default_rng(seed)
    counts = rng.geometric(0.2, size=60) - 1  # skewed, with zeros (anti-hubs)
    k = 3
    ref = textbook_measures(counts, k)
    scores = hubness_scores(counts, k, n_queries=int(counts.sum()) // k)
    assert scores.k_skewness == pytest.approx(ref["k_skewness"], rel=1e-12)
    assert scores.robin_hood == pytest.approx(ref["robin_hood"], rel=1e-12)
    assert scores.gini == pytest.approx(ref["gini"], rel=1e-12)
    assert scores.antihub_occurrence == pytest.approx(ref["antihub_occurrence"], rel=1e-12)
    assert hub_occurrence(counts, k) == pytest.approx(ref["hub_occurrence"], rel=1e-12)
