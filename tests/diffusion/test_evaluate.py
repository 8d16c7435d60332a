"""Sample-quality measures against independent references (scipy, hand-made sets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kexue.diffusion.evaluate import (
    DigitClassifier,
    DigitEvaluator,
    classify,
    frechet_distance,
    precision_recall,
    train_digit_classifier,
)
from kexue.exceptions import CheckpointError


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_frechet_matches_scipy_and_is_zero_on_identical_sets():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=gen, dtype=torch.float64)
    b = (
        0.7
        * torch.randn(300, 6, generator=gen, dtype=torch.float64)
        @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
        + 1.5
    )
    assert frechet_distance(a, b) == pytest.approx(scipy_frechet(a.numpy(), b.numpy()), rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-8
    # two Gaussians with known parameters: FD = |mu|^2 + d (s1 - s2)^2 for isotropic covariances
    big = torch.randn(200_000, 3, generator=gen, dtype=torch.float64)
    fd = frechet_distance(big, 2 * big[:100_000] + 1)
    assert fd == pytest.approx(3 * 1 + 3 * (1 - 2) ** 2, rel=0.02)


def test_precision_recall_on_hand_made_sets():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(500, 2, generator=gen)
    p, r = precision_recall(real, real.clone(), k=3)
    assert p == 1.0 and r == 1.0
    p, r = precision_recall(real, real + 100.0, k=3)
    assert p == 0.0 and r == 0.0
    collapsed = real[:1].repeat(500, 1) + 1e-3 * torch.randn(500, 2, generator=gen)
    p, r = precision_recall(real, collapsed, k=3)
    assert p == 1.0 and r < 0.05  # mode collapse: precise but no recall
    with pytest.raises(ValueError):
        precision_recall(real[:3], real, k=3)


def test_shipped_classifier_recognises_held_out_digits():
    from kexue.diffusion.data import load_images

    data = load_images("mnist5k")
    model = DigitClassifier.from_pretrained("mnist5k")
    feats, probs = classify(model, data.heldout)
    assert feats.shape == (1000, 128)
    accuracy = float((probs.argmax(1) == data.heldout_labels).float().mean())
    assert accuracy >= 0.97
    evaluator = DigitEvaluator(classifier=model)
    real = evaluator(data.train[:1000])
    noise = evaluator(torch.rand(500, 1, 28, 28) * 2 - 1)
    assert real.frechet < 0.2 * noise.frechet
    assert real.confidence > 0.95 and real.label_entropy > 0.98 * np.log(10)
    assert real.precision > 0.7 and real.recall > 0.7
    with pytest.raises(ValueError, match="shape"):
        classify(model, torch.zeros(2, 1, 8, 8))


def test_classifier_save_load_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = DigitClassifier(info={"note": "random init"})
    path = model.save_pretrained(tmp_path / "c")
    loaded = DigitClassifier.from_pretrained(path)
    assert loaded.info == {"note": "random init"}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[100] ^= 0x10
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        DigitClassifier.from_pretrained(path)


def test_train_digit_classifier_checks_its_input():
    images = torch.zeros(8, 1, 28, 28)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        train_digit_classifier(images, torch.full((8,), 10), epochs=1, batch_size=4,
                               progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="shape"):
        train_digit_classifier(torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        train_digit_classifier(images, torch.zeros(7, dtype=torch.long))
