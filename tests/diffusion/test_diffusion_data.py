"""Built-in image data and users' folders, scaled to [-1, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kexue.datasets import mnist5k
from kexue.diffusion.data import load_images


def test_mnist5k_split_is_fixed_and_disjoint():
    a, b = load_images("mnist5k"), load_images("mnist5k")
    assert a.train.shape == (4000, 1, 28, 28) and a.heldout.shape == (1000, 1, 28, 28)
    assert torch.equal(a.heldout, b.heldout)
    assert a.train.min() == -1 and a.train.max() == 1
    raw, _ = mnist5k()
    flat = {bytes(x.numpy().tobytes()) for x in ((raw * 2 - 1)[:, None])}
    held = {bytes(x.numpy().tobytes()) for x in a.heldout}
    train = {bytes(x.numpy().tobytes()) for x in a.train}
    assert held <= flat and train <= flat and not (held & train)
    assert len(torch.unique(a.heldout_labels)) == 10


def test_digits8x8():
    d = load_images("digits8x8")
    assert d.train.shape[1:] == (1, 8, 8) and len(d.train) + len(d.heldout) == 1797
    assert -1 <= float(d.train.min()) and float(d.train.max()) <= 1


def test_folder_of_images(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (6, 4), dtype=np.uint8)).save(tmp_path / f"g{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    d = load_images(f"folder:{tmp_path}")
    assert d.train.shape == (11, 1, 6, 4) and d.heldout.shape == (1, 1, 6, 4)
    first = np.asarray(Image.open(tmp_path / "g0.png"), dtype=np.float32) / 255 * 2 - 1
    every = torch.cat([d.train, d.heldout])[:, 0]
    assert any(torch.allclose(x, torch.from_numpy(first)) for x in every)
    Image.fromarray(rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)).save(tmp_path / "colour.png")
    assert load_images(f"folder:{tmp_path}").train.shape[1] == 3  # any colour image -> RGB
    Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match="one size"):
        load_images(f"folder:{tmp_path}")


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="mnist5k"):
        load_images("cifar10")
    with pytest.raises(ValueError, match="not a folder"):
        load_images(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="at least 2"):
        load_images(f"folder:{tmp_path}")
