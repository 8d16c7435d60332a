"""The multi-label comparison harness: metrics against scikit-learn, data, baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from kexue.experiments.canvases import digit_canvases
from kexue.experiments.multilabel import (
    METHODS,
    MultilabelTrainConfig,
    Split,
    asymmetric_loss,
    compare_methods,
    focal_loss,
    reliability_curve,
    scores_metrics,
    sentinel_zlpr,
    tune_threshold,
)
from kexue.losses import zlpr_loss


def test_metrics_match_scikit_learn():
    gen = torch.Generator().manual_seed(0)
    y = (torch.rand(300, 12, generator=gen) < 0.2).float()
    y[:, 11] = 0  # a label with no positive: left out of the macro averages
    probs = (0.6 * y + 0.5 * torch.rand(300, 12, generator=gen)).clamp(0, 1)
    got = scores_metrics(probs, y, 0.5)
    pred = (probs > 0.5).numpy()
    yn = y.numpy()
    present = yn.sum(0) > 0
    assert got["micro_f1"] == pytest.approx(f1_score(yn, pred, average="micro"), abs=1e-6)
    per_class = f1_score(yn[:, present], pred[:, present], average=None, zero_division=0)
    assert got["macro_f1"] == pytest.approx(per_class.mean(), abs=1e-6)
    ap = [average_precision_score(yn[:, c], probs[:, c].numpy()) for c in np.where(present)[0]]
    assert got["mAP"] == pytest.approx(np.mean(ap), abs=1e-5)


def test_reliability_curve_by_hand():
    probs = torch.tensor([[0.05, 0.05, 0.95, 0.95]])
    y = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    mean_p, freq, count = reliability_curve(probs, y, bins=10)
    np.testing.assert_allclose(mean_p, [0.05, 0.95], rtol=1e-6)
    np.testing.assert_allclose(freq, [0.5, 1.0])
    np.testing.assert_array_equal(count, [2, 2])


def test_tune_threshold_finds_the_separating_value():
    y = torch.tensor([[1.0, 0.0]] * 50 + [[0.0, 1.0]] * 50)
    probs = torch.where(y > 0, 0.3, 0.1)  # positives at 0.3, negatives at 0.1
    t = tune_threshold(probs, y)
    assert 0.1 <= t < 0.3


def test_sentinel_port_agrees_with_zlpr_in_float64():
    gen = torch.Generator().manual_seed(1)
    s = 4 * torch.randn(16, 30, generator=gen, dtype=torch.float64)
    t = (torch.rand(16, 30, generator=gen, dtype=torch.float64) < 0.2).to(torch.float64)
    assert float(sentinel_zlpr(s, t)) == pytest.approx(float(zlpr_loss(s, t)), rel=1e-12)


def test_baselines_reduce_to_bce_by_hand():
    s = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    bce = np.log1p(np.exp(-1.0)) + np.log1p(np.exp(-2.0))
    p = 1 / (1 + np.exp(-s.numpy()[0]))
    # focal with gamma=0 and alpha=0.5 is half the BCE
    assert float(focal_loss(s, t, gamma=0.0, alpha=0.5)) == pytest.approx(bce / 2)
    # ASL with no focusing and no clipping is BCE
    assert float(asymmetric_loss(s, t, 0.0, 0.0, 0.0)) == pytest.approx(bce)
    # ASL's clipped negative: p_m = p - clip
    pm = p[1] - 0.05
    expected = np.log1p(np.exp(-1.0)) - pm**4 * np.log1p(-pm)
    assert float(asymmetric_loss(s, t, 0.0, 4.0, 0.05)) == pytest.approx(expected)


def test_digit_canvases_labels_match_content():
    gen = torch.Generator().manual_seed(0)
    images = torch.zeros(20, 28, 28)
    labels = torch.arange(20) % 10
    for i in range(20):  # image of class c is a constant (c + 1) / 10
        images[i] = (labels[i] + 1) / 10
    weights = torch.ones(10)
    x, y = digit_canvases(images, labels, 200, class_weights=weights, generator=gen)
    cells = x.reshape(200, 2, 14, 2, 14).permute(0, 1, 3, 2, 4).reshape(200, 4, 196)
    for i in range(200):
        present = {round(float(c[0]) * 10) - 1 for c in cells[i] if c.abs().sum() > 0}
        assert present == set(torch.nonzero(y[i]).flatten().tolist())
        assert 1 <= int((cells[i].abs().sum(-1) > 0).sum()) <= 4
    only_three = torch.zeros(10)
    only_three[3] = 1
    _, y3 = digit_canvases(images, labels, 50, class_weights=only_three, generator=gen)
    assert (y3[:, 3] == 1).all() and y3.sum() == 50


def test_compare_methods_learns_an_easy_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=gen)
    y = (x[:, :4] > 0.5).float()  # 4 labels, each a simple threshold of one input
    train, val, test = (
        Split(x[:400], y[:400]),
        Split(x[400:500], y[400:500]),
        Split(x[500:], y[500:]),
    )
    cfg = MultilabelTrainConfig(hidden=32, dropout=0.0, epochs=40, batch_size=32, lr=1e-2)
    methods = [m for m in METHODS if m.name in ("BCE (t=0.5)", "ZLPR (s>0)")]
    results = compare_methods(train, val, test, [0], cfg, methods)
    for r in results:
        assert r.metrics["micro_f1"] > 0.9, (r.method, r.metrics)
