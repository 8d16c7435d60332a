"""Conditional variance heads (SN / NPR): the regression targets, the variance callable against
the guide's formula, body reuse in the sampler, that training learns the conditional mean, saving,
and the two CLI commands on a tiny run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kexue.cli import main
from kexue.diffusion import NoiseSchedule, UNet, VarianceHead, sample, train_variance_head
from kexue.diffusion.conditional import variance_head_loss
from kexue.diffusion.variance import SECOND_TO_LAST_CAP
from kexue.exceptions import CheckpointError

S = NoiseSchedule.su_linear(50)


@pytest.fixture(scope="module")
def base(tiny_model, tiny_schedule) -> UNet:
    assert tiny_schedule.same_as(S)
    return tiny_model


@pytest.mark.parametrize("kind", ["sn", "npr"])
def test_regression_targets(base, digits, kind):
    head = VarianceHead(base, S, kind)
    x0 = digits[:6]
    loss, _ = variance_head_loss(head, x0, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(1, S.T + 1, (6,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = S.abar.float()[t].view(-1, 1, 1, 1)
    b = S.bbar.float()[t].view(-1, 1, 1, 1)
    x_t = a * x0 + b * eps
    target = eps**2 if kind == "sn" else (eps - base(x_t, t)) ** 2
    g = head.head(base.features(x_t, t), base.time_embedding(t))
    want = (g - target).pow(2).sum(dim=(1, 2, 3)).mean()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)


def test_variance_callable_is_the_note_formula(base, digits):
    head = VarianceHead(base, S, "sn")
    torch.nn.init.normal_(head.head.out.weight, std=0.3)  # a head with a varied output
    steps, eta = [1, 10, 30, 50], 0.4
    fn = head.reverse_variance(steps, eta=eta)
    x = S.abar.float()[30] * digits[:4] + S.bbar.float()[30] * torch.randn(4, 1, 8, 8)
    eps_theta = head(x, torch.full((4,), 30))
    got = fn(x, 30, 10, eps_theta)
    a_t, b_t, a_s, b_s = (float(v) for v in (S.abar[30], S.bbar[30], S.abar[10], S.bbar[10]))
    sigma2 = eta**2 * (b_s / b_t) ** 2 * (1 - a_t**2 / a_s**2)
    gamma = a_s - a_t * math.sqrt(b_s**2 - sigma2) / b_t
    ratio = b_t**2 / a_t**2
    tt = torch.full((4,), 30)
    g = head.head(base.features(x, tt), base.time_embedding(tt))
    sbar2 = (ratio * (g - base(x, torch.full((4,), 30)) ** 2)).clamp(0, min(ratio, 1.0))
    torch.testing.assert_close(got, sigma2 + gamma**2 * sbar2, rtol=1e-5, atol=1e-7)
    assert (sbar2 == 0).any() and (sbar2 > 0).any()  # the clip is exercised both ways
    second = fn(x, 10, 1, eps_theta)
    assert float(second.max()) <= SECOND_TO_LAST_CAP + 1e-9
    assert float(fn(x, 1, 0, eps_theta)) == 0.0  # last jump: the mean only
    with pytest.raises(ValueError, match="trajectory"):
        fn(x, 30, 1, eps_theta)
    npr = VarianceHead(base, S, "npr")
    npr.head.load_state_dict(head.head.state_dict())
    want_npr = (ratio * g).clamp(0, min(ratio, 1.0))
    torch.testing.assert_close(npr.sbar2(x, 30), want_npr, rtol=1e-5, atol=1e-7)


def test_sampler_runs_the_body_once_per_step(base):
    head = VarianceHead(base, S, "npr")
    calls = []
    features = base.features
    base.features = lambda x, t: (calls.append(1), features(x, t))[1]
    try:
        out = sample(head, S, (3, 1, 8, 8), steps=7, eta=1.0,
                     variance=head.reverse_variance(7, eta=1.0),
                     generator=torch.Generator().manual_seed(0), progress=False)  # fmt: skip
    finally:
        del base.features
    assert len(calls) == 7 and torch.isfinite(out).all()


def test_variance_built_for_another_eta_or_trajectory_is_refused(base):
    """The README trap: sample's default is eta = 1 (DDPM), reverse_variance's eta = 0."""
    head = VarianceHead(base, S, "sn")
    with pytest.raises(ValueError, match="eta"):
        sample(head, S, (1, 1, 8, 8), steps=5, variance=head.reverse_variance(5), progress=False)
    with pytest.raises(ValueError, match="trajectory"):
        sample(head, S, (1, 1, 8, 8), steps=6, eta=0.0, variance=head.reverse_variance(5),
               progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="schedule"):
        VarianceHead(base.__class__(base.config, schedule=NoiseSchedule.cosine(50)), S, "sn")


def test_training_learns_the_conditional_mean(base, digits):
    """NPR: after training, the head's mean output at step t matches the Monte Carlo mean of its
    target (eps - eps_theta)^2 at t, which varies with t; the loss falls below the constant."""
    head = train_variance_head(base, "npr", schedule=S, data=digits, steps=400, batch_size=32,
                               lr=1e-2, seed=1, progress=False)  # fmt: skip
    gen = torch.Generator().manual_seed(9)
    means, targets = [], []
    for t in (2, 10, 25, 45):
        x0 = digits[torch.randint(0, len(digits), (512,), generator=gen)]
        eps = torch.randn(x0.shape, generator=gen)
        x_t = S.abar.float()[t] * x0 + S.bbar.float()[t] * eps
        tt = torch.full((512,), t)
        with torch.no_grad():
            means.append(float(head.g(x_t, tt).mean()))
            targets.append(float(((eps - head(x_t, tt)) ** 2).mean()))
    assert max(targets) - min(targets) > 0.2, targets  # a constant would not do
    for m, tgt in zip(means, targets, strict=True):
        assert abs(m - tgt) < 0.1 + 0.1 * tgt, (means, targets)
    first, last = head.history[:30], head.history[-30:]
    assert sum(last) / 30 < sum(first) / 30


def test_save_load_and_refuse_another_base(tmp_path, base, digits):
    head = train_variance_head(base, "sn", schedule=S, data=digits, steps=5, batch_size=8,
                               progress=False, out=tmp_path / "h")  # fmt: skip
    loaded = VarianceHead.from_pretrained(tmp_path / "h", base=base)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 40])
    torch.testing.assert_close(loaded.g(x, t), head.g(x, t))
    assert loaded.kind == "sn"
    saved = head.head.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.head.state_dict().items())
    assert not (tmp_path / "h" / "model.safetensors").exists()  # only the head is saved
    other = UNet(channels=8, channel_mults=(1, 2), blocks=1, T=S.T)
    with pytest.raises(ValueError, match="another mean model"):
        VarianceHead.from_pretrained(tmp_path / "h", base=other)
    with pytest.raises(ValueError, match="base="):
        VarianceHead.from_pretrained(tmp_path / "h")  # trained on an in-memory model
    data = bytearray((tmp_path / "h" / "head.safetensors").read_bytes())
    data[-5] ^= 0x01
    (tmp_path / "h" / "head.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        VarianceHead.from_pretrained(tmp_path / "h", base=base)
    with pytest.raises(ValueError, match="kind"):
        train_variance_head(base, "diag", schedule=S, data=digits, steps=1, progress=False)
    with pytest.raises(ValueError, match="schedule is required"):
        train_variance_head(base, "sn", data=digits, steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        train_variance_head(base, "sn", schedule=S, data=digits, steps=0, progress=False)


def test_cli_train_variance_and_nll_on_a_tiny_run(tmp_path: Path, capsys):
    def cli(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exc:
            main(["diffusion", *args])
        out = capsys.readouterr()
        return exc.value.code, out.out, out.err

    run = tmp_path / "run"
    code, _, err = cli("train", "--data", "digits8x8", "--out", str(run), "--steps", "20",
                       "--channels", "8", "--channel-mults", "1,2", "--blocks", "1",
                       "--batch-size", "16", "--sample-every", "0", "--timesteps", "100",
                       "--no-progress")  # fmt: skip
    assert code == 0, err
    code, out, err = cli("train-variance", "--ckpt", str(run), "--kind", "npr", "--data",
                         "digits8x8", "--steps", "10", "--batch-size", "8", "--out",
                         str(tmp_path / "head"), "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "NPR variance head" in out and (tmp_path / "head" / "head.safetensors").exists()
    assert VarianceHead.from_pretrained(tmp_path / "head").kind == "npr"  # finds its base
    moments = tmp_path / "moments"
    code, out, err = cli("nll", "--ckpt", str(run), "--data", "digits8x8", "--steps", "5", "--n",
                         "8", "--variance", "analytic", "--trajectory", "optimal", "--moments",
                         str(moments), "--moment-images", "4", "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "bits/dim" in out and (moments / "config.json").exists()
    value = float(out.split("NLL bound ")[1].split()[0])
    assert 0 < value < 100
    code, out, err = cli("nll", "--ckpt", str(run), "--data", "digits8x8", "--steps", "5", "--n",
                         "8", "--variance", "large", "--no-progress")  # fmt: skip
    assert code == 0 and "variance large" in out, err
    code, _, err = cli("nll", "--ckpt", str(run), "--data", "digits8x8", "--variance", "medium")
    assert code == 2 and "--variance" in err
    code, _, err = cli("nll", "--ckpt", str(run), "--data", "digits8x8", "--steps", "101")
    assert code == 2 and "--steps" in err
