"""Models that ship with kexue (package assets): ``load_pretrained("mnist5k")``."""

from __future__ import annotations

from pathlib import Path

from kexue.diffusion.schedule import NoiseSchedule
from kexue.diffusion.unet import UNet

ASSETS = Path(__file__).parent / "assets"


def available() -> list[str]:
    """Names of the shipped diffusion models."""
    if not ASSETS.exists():
        return []
    return sorted(p.name for p in ASSETS.iterdir() if (p / "ema.safetensors").exists())


def pretrained_path(name: str = "mnist5k") -> Path:
    path = ASSETS / name
    if not (path / "ema.safetensors").exists():
        raise ValueError(f"no shipped model named {name!r}; available: {available()}")
    return path


def load_pretrained(name: str = "mnist5k") -> tuple[UNet, NoiseSchedule]:
    """The EMA weights and noise schedule of a shipped model, ready for ``sample``."""
    from kexue.diffusion.train import load_model

    return load_model(pretrained_path(name))
