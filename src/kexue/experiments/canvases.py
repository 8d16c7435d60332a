"""Built-in data of the tour, from packages on PyPI (nothing is downloaded at run time)."""

from __future__ import annotations

import torch
from torch import Tensor

from kexue.datasets import mnist5k

__all__ = ["digit_canvases", "mnist5k"]


def digit_canvases(
    images: Tensor,
    labels: Tensor,
    count: int,
    *,
    class_weights: Tensor,
    max_digits: int = 4,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Multi-label images: a 2x2 grid of 14x14 cells, each empty or holding a digit.

    Each canvas holds 1..``max_digits`` digits whose classes are drawn with probabilities
    proportional to ``class_weights`` (skewed weights give rare classes, as in real
    multi-label data); the label vector marks the classes present. Returns flattened
    canvases ``(count, 784)`` and labels ``(count, 10)`` as float32.
    """
    if not 1 <= max_digits <= 4:
        raise ValueError(f"max_digits must be in 1..4, got {max_digits}")
    small = torch.nn.functional.avg_pool2d(images[:, None], 2)[:, 0]  # (N, 14, 14)
    by_class = [torch.nonzero(labels == c).squeeze(1) for c in range(10)]
    probs = class_weights / class_weights.sum()
    canvases = torch.zeros(count, 28, 28)
    targets = torch.zeros(count, 10)
    k = torch.randint(1, max_digits + 1, (count,), generator=generator)
    for i in range(count):
        cells = torch.randperm(4, generator=generator)[: int(k[i])]
        classes = torch.multinomial(probs, len(cells), replacement=True, generator=generator)
        for cell, c in zip(cells.tolist(), classes.tolist(), strict=True):
            pool = by_class[c]
            img = small[pool[torch.randint(len(pool), (1,), generator=generator)]][0]
            r, col = divmod(cell, 2)
            canvases[i, r * 14 : r * 14 + 14, col * 14 : col * 14 + 14] = img
            targets[i, c] = 1.0
    return canvases.reshape(count, -1), targets
