"""The simplified U-Net: shapes, size of the default, options, input errors."""

from __future__ import annotations

import pytest
import torch

from kexue.diffusion import UNet, UNetConfig


def test_default_size_and_shape():
    model = UNet()
    assert 1_000_000 <= model.num_parameters() <= 3_000_000
    x = torch.randn(2, 1, 28, 28)
    out = model(x, torch.tensor([1, 1000]))
    assert out.shape == x.shape
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(m.__class__.__name__ == "Attention" for m in model.modules())  # none by default


def test_output_starts_at_zero_and_depends_on_t_after_a_step():
    torch.manual_seed(0)
    model = UNet(channels=16, channel_mults=(1, 2))
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(model(x, torch.tensor(5)), torch.zeros_like(x))  # zero-initialised head
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # head first, then the blocks' zero convs, then t enters
        opt.zero_grad()
        (model(x, torch.tensor([1, 2, 3, 4])) - x).pow(2).sum().backward()
        opt.step()
    with torch.no_grad():
        a, b = model(x, torch.tensor(1)), model(x, torch.tensor(900))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kind", ["sinusoidal", "learned"])
def test_options(kind):
    cfg = UNetConfig(in_channels=3, channels=8, channel_mults=(1, 2, 2), blocks=1,
                     attention_levels=(2,), time_embedding=kind, T=50)  # fmt: skip
    model = UNet(cfg)
    assert sum(m.__class__.__name__ == "Attention" for m in model.modules()) == 3  # down, mid, up
    out = model(torch.randn(2, 3, 12, 12), torch.tensor([1, 50]))
    assert out.shape == (2, 3, 12, 12)
    assert UNetConfig(**cfg.to_dict()) == cfg


def test_errors():
    model = UNet(channels=8, channel_mults=(1, 2))
    with pytest.raises(ValueError, match=r"shape \(N, 1, H, W\)"):
        model(torch.randn(2, 3, 8, 8), torch.tensor(1))
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(2, 1, 7, 7), torch.tensor(1))
    with pytest.raises(ValueError, match="divisible by groups"):
        UNetConfig(channels=12)
    with pytest.raises(ValueError, match="time_embedding"):
        UNetConfig(time_embedding="fourier")
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(attention_levels=(5,))
