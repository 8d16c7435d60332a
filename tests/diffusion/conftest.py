"""Fixtures shared by the diffusion tests: small data and a briefly trained tiny model."""

from __future__ import annotations

import pytest
import torch

from kexue.diffusion import NoiseSchedule, UNet, diffusion_loss, load_images


@pytest.fixture(scope="session")
def digits() -> torch.Tensor:
    """scikit-learn's 8x8 digits (training split) in [-1, 1], (N, 1, 8, 8) float32."""
    return load_images("digits8x8").train


@pytest.fixture(scope="session")
def tiny_schedule() -> NoiseSchedule:
    return NoiseSchedule.su_linear(50)


@pytest.fixture(scope="session")
def tiny_model(digits, tiny_schedule) -> UNet:
    """A tiny mean model trained briefly on the 8x8 digits: good enough that its error
    depends on t. Carries no schedule (as a model built in memory)."""
    torch.manual_seed(0)
    model = UNet(channels=8, channel_mults=(1, 2), blocks=1, T=tiny_schedule.T)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(digits), (32,), generator=gen)
        loss = diffusion_loss(model, tiny_schedule, digits[idx], gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)
