"""The simplified U-Net: shapes, size of the default, options, input errors."""

from __future__ import annotations

import pytest
import torch

from kexue.diffusion import NoiseSchedule, UNet, UNetConfig
from kexue.exceptions import CheckpointError


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


def test_save_pretrained_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    schedule = NoiseSchedule.cosine(50)
    cfg = UNetConfig(channels=8, channel_mults=(1, 2), blocks=1, T=50, time_embedding="learned")
    model = UNet(cfg, schedule=schedule, info={"step": 7, "image_shape": [1, 8, 8]})
    for p in model.parameters():  # non-zero weights everywhere (the init zeroes some)
        p.data.normal_()
    path = model.save_pretrained(tmp_path / "m")
    loaded = UNet.from_pretrained(path)
    assert loaded.config == cfg and loaded.info == {"step": 7, "image_shape": [1, 8, 8]}
    assert loaded.schedule.same_as(schedule) and torch.equal(loaded.schedule.abar, schedule.abar)
    state = model.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    for key, value in loaded.state_dict().items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x, torch.tensor([3, 40])), model(x, torch.tensor([3, 40])))
    data = bytearray((path / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        UNet.from_pretrained(path)
    with pytest.raises(ValueError, match="mnist5k"):
        UNet.from_pretrained("no-such-model")


def test_shipped_model_carries_its_schedule():
    model = UNet.from_pretrained("mnist5k")
    assert model.schedule.same_as(NoiseSchedule.su_linear(1000))
    assert model.info["step"] == 8000 and model.info["image_shape"] == [1, 28, 28]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(CheckpointError, match="DigitClassifier"):
        UNet.from_pretrained(UNet.pretrained_assets / "classifiers" / "mnist5k")


def test_float64_model():
    model = UNet(channels=8, channel_mults=(1, 2), blocks=1).double()
    out = model(torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 9]))
    assert out.dtype == torch.float64
