"""Diffusion models: schedules, U-Net, training, DDPM/DDIM sampling (reference: diffusion.md)."""

from kexue.diffusion.conditional import VarianceHead, load_variance_head, train_variance_head
from kexue.diffusion.likelihood import NLLResult, nll_bpd
from kexue.diffusion.moments import DiffusionMoments, estimate_moments
from kexue.diffusion.pretrained import load_pretrained
from kexue.diffusion.sampler import DiffusersEpsModel, from_diffusers, resolve_steps, sample
from kexue.diffusion.schedule import NoiseSchedule
from kexue.diffusion.unet import UNet, UNetConfig
from kexue.diffusion.variance import fixed_variance, optimal_trajectory, optimal_variance

__all__ = [
    "DiffusersEpsModel",
    "DiffusionMoments",
    "NLLResult",
    "NoiseSchedule",
    "UNet",
    "UNetConfig",
    "VarianceHead",
    "estimate_moments",
    "fixed_variance",
    "from_diffusers",
    "load_pretrained",
    "load_variance_head",
    "nll_bpd",
    "optimal_trajectory",
    "optimal_variance",
    "resolve_steps",
    "sample",
    "train_variance_head",
]
