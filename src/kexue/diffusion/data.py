"""Image data for diffusion training: built-in digits or a user's folder, pixels in [-1, 1]."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kexue.datasets import digits8x8, held_out_split, mnist5k_split
from kexue.extras import require

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageData:
    """Training and held-out images ``(N, C, H, W)`` in [-1, 1]; labels when known."""

    name: str
    train: Tensor
    heldout: Tensor
    train_labels: Tensor | None = None
    heldout_labels: Tensor | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])  # type: ignore[return-value]


def to_signed(images01: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1], adding the channel dim to (N, H, W) input."""
    x = images01 if images01.ndim == 4 else images01[:, None]
    return x.float() * 2 - 1


def load_images(spec: str) -> ImageData:
    """``"mnist5k"`` (4,000 train / 1,000 held-out, fixed split), ``"digits8x8"``
    (scikit-learn, 1,500 / 297) or ``"folder:PATH"`` (every image file in PATH, 10% held out)."""
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string ('mnist5k', ...), got {type(spec).__name__}")
    if spec == "mnist5k":
        split = mnist5k_split()
        (xt, yt), (xh, yh) = split["train"], split["heldout"]
        return ImageData(spec, to_signed(xt), to_signed(xh), yt, yh)
    if spec == "digits8x8":
        images, labels = digits8x8()
        train, held = held_out_split(len(images), 297)
        return ImageData(
            spec, to_signed(images[train]), to_signed(images[held]), labels[train], labels[held]
        )
    if spec.startswith("folder:"):
        return _folder(Path(spec.removeprefix("folder:")))
    raise ValueError(f"data must be 'mnist5k', 'digits8x8' or 'folder:PATH', got {spec!r}")


def _folder(path: Path) -> ImageData:
    Image = require("PIL.Image", "diffusion", "reading image folders")

    if not path.is_dir():
        raise ValueError(f"folder:{path} is not a folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"folder:{path} holds {len(files)} image files; need at least 2")
    opened = [Image.open(f) for f in files]
    grey = all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in opened)
    arrays = []
    size = opened[0].size
    for file, im in zip(files, opened, strict=True):
        if im.size != size:
            raise ValueError(
                f"all images must have one size: {files[0].name} is {size}, {file.name} is "
                f"{im.size} (resize them first)"
            )
        arr = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.float32) / 255.0
        arrays.append(arr[None] if grey else arr.transpose(2, 0, 1))
    images = torch.from_numpy(np.stack(arrays))
    train, held = held_out_split(len(images), max(1, len(images) // 10))
    return ImageData(f"folder:{path}", to_signed(images[train]), to_signed(images[held]))
