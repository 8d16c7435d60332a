"""Training: the loss, bit-exact resume after kill -9, crash-safe checkpoints, accelerate."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kexue.diffusion import DiffusionTrainConfig, NoiseSchedule, Trainer, UNet, diffusion_loss
from kexue.diffusion.checkpoint import load_checkpoint
from kexue.diffusion.train import ema_from_checkpoint
from kexue.exceptions import CheckpointError
from kexue.io import sha256_bytes

TINY = ["--data", "digits8x8", "--channels", "8", "--channel-mults", "1,2", "--blocks", "1",
        "--batch-size", "16", "--sample-every", "0", "--no-progress"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kexue.cli", "diffusion", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, **kwargs)


def latest_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoints" / "latest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def final_tensors(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    tensors, _ = load_checkpoint(out)
    return tensors


def test_loss_is_summed_over_dimensions():
    s = NoiseSchedule.su_linear(10)
    x0 = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    model = lambda x, t: 0.5 * x  # noqa: E731
    loss = diffusion_loss(model, s, x0, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    t = torch.randint(1, 11, (4,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = s.abar.float()[t].view(-1, 1, 1, 1)
    b = s.bbar.float()[t].view(-1, 1, 1, 1)
    per_image = ((0.5 * (a * x0 + b * eps) - eps) ** 2).sum(dim=(1, 2, 3))
    assert float(loss) == pytest.approx(float(per_image.mean()), rel=1e-6)


def test_resume_after_kill_is_bit_exact(tmp_path: Path):
    steps = "400"
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = [*TINY, "--steps", steps, "--ckpt-every", "25"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kexue.cli", "diffusion", "train", "--out", str(run), *args],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 120
    while latest_step(run) < 50 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest_step(run)
    assert 50 <= killed_at < 400
    resumed = cli("train", "--out", str(run), "--resume", "--steps", steps)
    assert resumed.returncode == 0, resumed.stderr
    full = cli("train", "--out", str(ref), *args)
    assert full.returncode == 0, full.stderr
    a, b = final_tensors(run), final_tensors(ref)
    for group in ("model", "ema", "optimizer"):
        assert a[group].keys() == b[group].keys()
        for key in a[group]:
            assert torch.equal(a[group][key], b[group][key]), (group, key)


def test_corrupted_or_missing_checkpoint_gives_clear_error(tmp_path: Path):
    out = tmp_path / "run"
    done = cli("train", "--out", str(out), *TINY, "--steps", "20", "--ckpt-every", "10")
    assert done.returncode == 0, done.stderr
    latest = out / "checkpoints" / "step-00000020"
    before = {p.name: p.read_bytes() for p in latest.iterdir()}
    model_file = latest / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-100])  # truncated
    result = cli("train", "--out", str(out), "--resume", "--steps", "30")
    assert result.returncode == 2
    assert "SHA-256" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # nothing was written over the checkpoints
    assert latest_step(out) == 20
    assert {p.name for p in latest.iterdir()} == set(before)
    assert (latest / "ema.safetensors").read_bytes() == before["ema.safetensors"]
    model_file.write_bytes(before["model.safetensors"])
    (latest / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing ema\.safetensors"):
        load_checkpoint(out)
    # an interrupted write leaves a temp folder that is never pointed to
    shutil.rmtree(latest)
    with pytest.raises(CheckpointError):
        load_checkpoint(out)
    assert cli("train", "--out", str(tmp_path / "none"), "--resume").returncode == 2


def test_refuses_to_start_over_an_existing_run(tmp_path: Path):
    out = tmp_path / "run"
    assert (
        cli("train", "--out", str(out), *TINY, "--steps", "5", "--ckpt-every", "5").returncode == 0
    )
    again = cli("train", "--out", str(out), *TINY, "--steps", "5")
    assert again.returncode == 2 and "--resume" in again.stderr


def test_sample_command_and_load_model(tmp_path: Path):
    out = tmp_path / "run"
    assert (
        cli("train", "--out", str(out), *TINY, "--steps", "10", "--ckpt-every", "10").returncode
        == 0
    )
    grid = tmp_path / "grid.png"
    result = cli(
        "sample", "--ckpt", str(out), "--steps", "5", "--eta", "0", "--n", "4", "--out", str(grid)
    )
    assert result.returncode == 0, result.stderr
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = UNet.from_pretrained(out)  # a run folder: its model/, the latest EMA weights
    schedule = model.schedule
    ema = load_file(str(out / "checkpoints" / "step-00000010" / "ema.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())
    assert schedule.T == 1000
    assert model.info["step"] == 10 and model.info["image_shape"] == [1, 8, 8]
    again = ema_from_checkpoint(out)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ema.items())
    assert again.schedule.same_as(schedule)
    exported = cli("export", "--run", str(out), "--to", str(tmp_path / "exported"))
    assert exported.returncode == 0, exported.stderr
    loaded = UNet.from_pretrained(tmp_path / "exported")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.items())
    bad = cli("sample", "--ckpt", str(out), "--steps", "1")
    assert bad.returncode == 2 and "--steps" in bad.stderr


def test_accelerate_launch_one_cpu_process(tmp_path: Path):
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate CLI not installed")
    out = tmp_path / "run"
    cmd = [str(accelerate), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kexue.cli", "diffusion",
           "train", "--out", str(out), *TINY, "--steps", "10", "--ckpt-every", "5"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    assert latest_step(out) == 10


def test_config_validation():
    with pytest.raises(ValueError, match="steps"):
        DiffusionTrainConfig(steps=0)
    with pytest.raises(ValueError, match="ema_decay"):
        DiffusionTrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(DiffusionTrainConfig(data="digits8x8", batch_size=5000), "/nonexistent")
    with pytest.raises(TypeError, match="DiffusionTrainConfig"):
        Trainer({"steps": 5}, "/nonexistent")


def test_checkpoint_hashes_are_those_of_the_bytes_written(tmp_path: Path):
    from kexue.diffusion.checkpoint import save_checkpoint

    tensors = {"model": {"w": torch.arange(6.0).view(2, 3)}, "ema": {"w": torch.ones(2)}}
    path = save_checkpoint(tmp_path, 3, tensors, {"note": "x"})
    state = json.loads((path / "state.json").read_text())
    for name, digest in state["files"].items():
        assert sha256_bytes((path / name).read_bytes()) == digest
    loaded, _ = load_checkpoint(tmp_path)
    assert torch.equal(loaded["model"]["w"], tensors["model"]["w"])
