"""``kexue diffusion ...``: the group's summary, option names and ``sample --variance analytic``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kexue.cli import main
from kexue.diffusion import DiffusionMoments, NoiseSchedule, UNet
from kexue.diffusion.cli import app


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(["diffusion", *args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """A tiny untrained U-Net saved with its schedule and image size (sampling only)."""
    torch.manual_seed(0)
    model = UNet(channels=8, channel_mults=(1, 2), blocks=1, T=20,
                 schedule=NoiseSchedule.su_linear(20), info={"image_shape": [1, 8, 8]})  # fmt: skip
    return model.save_pretrained(tmp_path / "model")


def test_group_summary_lists_every_command(capsys) -> None:
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"train", "sample", "export", "train-variance", "nll"} <= set(names)
    summary = app.info.help
    for name in names:
        assert name in summary, name
    code, out, _ = _cli(capsys, "--help")
    assert code == 0 and "train-variance" in out and "nll" in out


def test_no_option_is_spelled_with_a_capital(capsys) -> None:
    code, out, _ = _cli(capsys, "train", "--help")
    assert code == 0 and "--timesteps" in out and "--T " not in out
    code, _, err = _cli(capsys, "train", "--out", "x", "--T", "100")
    assert code == 2 and "--T" in err  # the old spelling is gone, not silently ignored


def test_sample_with_analytic_variance_and_a_moments_folder(
    tmp_path: Path, model_folder: Path, capsys
) -> None:
    moments = tmp_path / "moments"
    common = ["sample", "--ckpt", str(model_folder), "--steps", "5", "--n", "4", "--data",
              "digits8x8", "--moment-images", "4"]  # fmt: skip
    code, out, err = _cli(capsys, *common, "--variance", "analytic", "--moments", str(moments),
                          "--out", str(tmp_path / "a.png"))  # fmt: skip
    assert code == 0, err
    assert "wrote 4 samples" in out and (tmp_path / "a.png").stat().st_size > 0
    stats = DiffusionMoments.from_pretrained(moments)  # estimated once at every step, saved
    assert stats.estimated_steps == list(range(1, 21)) and stats.num_images == 4
    # the second call reuses the folder (same image as the first: the moments are not redrawn)
    code, _, err = _cli(capsys, *common, "--variance", "analytic", "--moments", str(moments),
                        "--out", str(tmp_path / "b.png"))  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    # DDIM with the per-dimension optimal variance, moments estimated at the kept steps only
    code, _, err = _cli(capsys, *common, "--variance", "analytic-diag", "--eta", "0",
                        "--out", str(tmp_path / "c.png"))  # fmt: skip
    assert code == 0, err
    # the fixed variance gives another picture
    code, _, err = _cli(capsys, *common, "--variance", "large", "--out", str(tmp_path / "d.png"))
    assert code == 0, err
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "d.png").read_bytes()


def test_sample_refuses_bad_variance_and_foreign_moments(
    tmp_path: Path, model_folder: Path, capsys
) -> None:
    base = ["sample", "--ckpt", str(model_folder), "--steps", "5", "--n", "2", "--out",
            str(tmp_path / "x.png")]  # fmt: skip
    code, _, err = _cli(capsys, *base, "--variance", "optimal")
    assert code == 2 and "--variance" in err
    code, _, err = _cli(capsys, *base, "--variance", "analytic", "--moment-images", "1")
    assert code == 2 and "--moment-images" in err
    # moments of another schedule (T = 10) are refused, naming --moments
    other = UNet(channels=8, channel_mults=(1, 2), blocks=1, T=10,
                 schedule=NoiseSchedule.su_linear(10))  # fmt: skip
    from kexue.diffusion import estimate_moments, load_images

    folder = tmp_path / "foreign"
    estimate_moments(other, other.schedule, load_images("digits8x8").train, num_images=2,
                     progress=False).save_pretrained(folder)  # fmt: skip
    code, _, err = _cli(capsys, *base, "--variance", "analytic", "--data", "digits8x8",
                        "--moments", str(folder))  # fmt: skip
    assert code == 2 and "--moments" in err
