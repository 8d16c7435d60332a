"""The digit GAN: the shipped generator's samples, save/load, training and resume, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kexue.exceptions import CheckpointError
from kexue.hubness import DigitGenerator, GANTrainConfig, train_gan
from kexue.hubness.gan import (
    DigitDiscriminator,
    critic_hinge_loss,
    latest_gan_checkpoint,
    shift_images,
    standing_statistics,
)

TINY = {"g_channels": 8, "d_channels": 4, "batch_size": 8, "ckpt_every": 3}


def _digits(n: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shipped_generator_draws_recognisable_balanced_digits():
    from kexue.diffusion import DigitEvaluator

    gan = DigitGenerator.from_pretrained("mnist-gan")
    assert (gan.latent_dim, gan.training) == (128, False)
    images = gan.generate(500, generator=torch.Generator().manual_seed(12345))
    assert images.shape == (500, 1, 28, 28) and images.abs().max() <= 1
    quality = DigitEvaluator()(images)
    assert quality.confidence >= 0.9
    shares = torch.tensor(quality.histogram, dtype=torch.float64) / 500
    assert quality.label_entropy >= 0.97 * math.log(10)  # near-uniform labels ...
    assert shares.min() >= 0.04  # ... and no digit missing or rare


def test_save_and_load_give_the_same_generator_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    gan = DigitGenerator(latent_dim=16, channels=8)
    gan.training_info = {"step": 3}
    standing_statistics(gan, batches=2, batch_size=32)
    gan.save_pretrained(tmp_path / "g")
    again = DigitGenerator.from_pretrained(tmp_path / "g")
    assert again.training_info == {"step": 3}
    for (name, a), (_, b) in zip(gan.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    z = torch.randn(5, 16)
    assert torch.equal(gan(z), again(z))
    (tmp_path / "g" / "generator.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="SHA-256"):
        DigitGenerator.from_pretrained(tmp_path / "g")


def test_folders_without_refine_load_the_two_layer_generator(tmp_path):
    """Generators saved before ``refine`` existed (no key in config.json) are the
    two-up-convolution layout; the key, when present, selects the layout."""
    torch.manual_seed(0)
    old = DigitGenerator(latent_dim=8, channels=6, refine=False)
    old.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["refine"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    again = DigitGenerator.from_pretrained(tmp_path / "old")
    assert again.refine is False and len(again.body) == len(old.body) == 7
    z = torch.randn(3, 8)
    assert torch.equal(old.eval()(z), again(z))
    new = DigitGenerator(latent_dim=8, channels=8)
    assert new.refine and new(z).shape == (3, 1, 28, 28)
    assert [m.kernel_size for m in new.body if isinstance(m, torch.nn.Conv2d)] == [(3, 3)] * 2


def test_shift_moves_every_image_by_its_own_offset():
    x = torch.arange(2 * 28 * 28, dtype=torch.float32).view(2, 1, 28, 28) / 2000 - 0.5
    gen = torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 5, (2, 2, 1, 1), generator=torch.Generator().manual_seed(3))
    out = shift_images(x, 2, gen)
    for i in range(2):
        oy, ox = int(dy[i]) - 2, int(dx[i]) - 2  # out[r, c] = x[r + oy, c + ox]
        for r in range(28):
            for c in range(28):
                inside = 0 <= r + oy < 28 and 0 <= c + ox < 28
                want = x[i, 0, r + oy, c + ox] if inside else -1.0
                assert out[i, 0, r, c] == want
    assert torch.equal(shift_images(x, 0, gen), x)


def test_hinge_loss_against_its_formula():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-3.0, 0.0])
    # relu(1 - real) = [0, 0.5, 2] -> 2.5 / 3; relu(1 + fake) = [0, 1] -> 0.5
    assert float(critic_hinge_loss(real, fake)) == pytest.approx(2.5 / 3 + 0.5)


def test_standing_statistics_are_exact_batch_averages():
    torch.manual_seed(1)
    gan = DigitGenerator(latent_dim=6, channels=4)
    standing_statistics(gan, batches=3, batch_size=10, seed=5)
    gen = torch.Generator().manual_seed(5)
    z = torch.cat([torch.randn(10, 6, generator=gen) for _ in range(3)])
    h = gan.project(z).view(-1, 4, 7, 7)  # the first batch norm's input, per batch of 10
    means = torch.stack([chunk.mean(dim=(0, 2, 3)) for chunk in h.split(10)]).mean(0)
    torch.testing.assert_close(gan.body[0].running_mean, means, rtol=1e-5, atol=1e-6)


def test_training_resumes_bit_exactly(tmp_path):
    data = _digits()
    # the learning rate decays over the last 30% of the planned steps: a run planned for 3
    # steps and extended to 6 meets the straight run's schedule only if its first 3 steps ran
    # at the full rate in both plans (3 - 2 >= 0.3 * 3)
    tiny = TINY | {"decay_from": 0.7}
    straight = train_gan(
        tmp_path / "a", GANTrainConfig(steps=6, **tiny), images=data, progress=False
    )
    train_gan(tmp_path / "b", GANTrainConfig(steps=3, **tiny), images=data, progress=False)
    assert latest_gan_checkpoint(tmp_path / "b").name == "step-00000003"
    resumed = train_gan(tmp_path / "b", resume=True, steps=6, images=data, progress=False)
    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert resumed.training_info["step"] == 6
    assert DigitGenerator.from_pretrained(tmp_path / "b" / "generator").training_info["step"] == 6


def test_runs_saved_before_refine_resume_with_the_two_layer_generator(tmp_path):
    """A checkpoint whose saved settings lack ``g_refine`` and ``d_deep`` (runs before they
    existed) resumes with the layouts its weights have."""
    data = _digits()
    cfg = GANTrainConfig(steps=3, g_refine=False, d_deep=False, **TINY)
    train_gan(tmp_path / "run", cfg, images=data, progress=False)
    config_path = latest_gan_checkpoint(tmp_path / "run") / "config.json"
    config = json.loads(config_path.read_text())
    del config["train"]["g_refine"], config["train"]["d_deep"]
    config_path.write_text(json.dumps(config))
    resumed = train_gan(tmp_path / "run", resume=True, steps=4, images=data, progress=False)
    assert resumed.training_info["step"] == 4 and resumed.refine is False
    assert resumed.training_info["config"]["d_deep"] is False


def test_the_deep_critic_adds_a_lipschitz_bounded_layer_after_each_strided_one():
    torch.manual_seed(0)
    shallow, deep = DigitDiscriminator(8), DigitDiscriminator(8, deep=True)
    convs = [m for m in deep.body if isinstance(m, torch.nn.Conv2d)]
    assert [(m.kernel_size, m.stride, m.out_channels) for m in convs] == [
        ((4, 4), (2, 2), 8), ((3, 3), (1, 1), 8), ((4, 4), (2, 2), 16), ((3, 3), (1, 1), 16)
    ]  # fmt: skip
    assert len([m for m in shallow.body if isinstance(m, torch.nn.Conv2d)]) == 2
    x = torch.randn(5, 1, 28, 28)
    assert deep(x).shape == shallow(x).shape == (5,)
    with torch.no_grad():  # weights 10x larger: spectral normalisation still divides them out
        for param in deep.parameters():
            param.mul_(10)
    for _ in range(20):  # power iterations
        deep(x)
    deep.eval()
    for m in convs:
        sigma = torch.linalg.matrix_norm(m.weight.flatten(1), ord=2)
        assert sigma < 1.3, sigma
    with pytest.raises(TypeError, match="deep must be a bool"):
        DigitDiscriminator(8, deep=1)  # type: ignore[arg-type]


def test_training_moves_the_generator_towards_the_data(tmp_path):
    data = torch.full((40, 1, 28, 28), -1.0)  # dark digits with a bright square
    data[:, :, 10:18, 10:18] = 1.0
    cfg = GANTrainConfig(steps=60, lr=5e-3, **(TINY | {"ckpt_every": 30}))
    with torch.random.fork_rng(devices=[]):  # the weights train_gan starts from
        torch.manual_seed(cfg.seed)
        untrained = DigitGenerator(cfg.latent_dim, cfg.g_channels, cfg.g_refine)
    standing_statistics(untrained, batches=4, batch_size=100)
    gan = train_gan(tmp_path / "run", cfg, images=data, progress=False)
    z = torch.Generator().manual_seed(0)
    before = untrained.generate(64, generator=z)[:, :, :4, :4].mean()
    after = gan.generate(64, generator=torch.Generator().manual_seed(0))[:, :, :4, :4].mean()
    assert after < before - 0.3  # the corners of every training digit are -1


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: DigitGenerator(latent_dim=0), ValueError, "latent_dim must be >= 1"),
        (lambda: DigitGenerator(channels=6), ValueError, "multiple of 4 with refine=True"),
        (lambda: DigitGenerator(channels=7, refine=False), ValueError, "multiple of 2, got 7"),
        (lambda: DigitGenerator(refine=1), TypeError, "refine must be a bool"),
        (lambda: DigitGenerator(latent_dim=2.5), TypeError, "latent_dim must be an int"),
        (lambda: DigitGenerator(8)(torch.zeros(3, 9)), ValueError, r"z must have shape \(N, 8\)"),
        (lambda: DigitGenerator(8)(torch.zeros(3, 8, dtype=torch.float64)), TypeError, "float64"),
        (lambda: DigitGenerator(8)([0.0] * 8), TypeError, "z must be a torch.Tensor"),
        (lambda: DigitGenerator(8).generate(0), ValueError, "n must be >= 1"),
        (lambda: GANTrainConfig(steps=0), ValueError, "steps must be >= 1"),
        (lambda: GANTrainConfig(lr=-1.0), ValueError, "lr must be > 0"),
        (lambda: GANTrainConfig(ema_decay=1.0), ValueError, "ema_decay must be < 1"),
    ],
)
def test_bad_arguments_name_themselves(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_run_folders_are_not_overwritten_or_resumed_by_mistake(tmp_path):
    data = _digits()
    with pytest.raises(ValueError, match="holds no GAN checkpoint"):
        train_gan(tmp_path / "none", resume=True, images=data, progress=False)
    train_gan(tmp_path / "run", GANTrainConfig(steps=3, **TINY), images=data, progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        train_gan(tmp_path / "run", GANTrainConfig(steps=3, **TINY), images=data, progress=False)
    with pytest.raises(ValueError, match="images must have shape"):
        train_gan(tmp_path / "x", GANTrainConfig(**TINY), images=data[:, :, :20], progress=False)
    with pytest.raises(ValueError, match="neither a shipped"):
        DigitGenerator.from_pretrained("no-such-gan")
