"""Diffusion models: schedules, U-Net, training, DDPM/DDIM sampling (reference: diffusion.md)."""

from kexue.diffusion.pretrained import load_pretrained
from kexue.diffusion.sampler import DiffusersEpsModel, from_diffusers, resolve_steps, sample
from kexue.diffusion.schedule import NoiseSchedule
from kexue.diffusion.unet import UNet, UNetConfig

__all__ = [
    "DiffusersEpsModel",
    "NoiseSchedule",
    "UNet",
    "UNetConfig",
    "from_diffusers",
    "load_pretrained",
    "resolve_steps",
    "sample",
]
