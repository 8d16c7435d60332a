"""Crash-safe LST training: checkpoints, bit-exact resume after kill -9, refusals.

The reference of a resumed run is the uninterrupted run of the same spec: every weight, every
AdamW moment and the loss of every step must be equal bit for bit (dropout on, Fisher init).
"""

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

from kexue.checkpoint import load_checkpoint
from kexue.cli import main
from kexue.exceptions import CheckpointError
from kexue.lst import RunSpec, TrainSettings, encode, epoch_batches, run

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def options(text_task, **kwargs) -> dict:
    root, model = text_task
    return {
        "backbone": str(model),
        "train": str(root / "train.tsv"),
        "eval": str(root / "dev.tsv"),
        "epochs": 6,
        "batch_size": 4,
        "fisher_samples": 16,
        "reduction_factor": 4,
        **kwargs,
    }


def cli_args(opts: dict, out: Path) -> list[str]:
    return ["lst", "train", "--backbone", opts["backbone"], "--data", opts["train"],
            "--eval", opts["eval"], "--epochs", str(opts["epochs"]),
            "--batch-size", str(opts["batch_size"]), "--fisher-samples",
            str(opts["fisher_samples"]), "--reduction-factor", str(opts["reduction_factor"]),
            "--out", str(out), "--no-progress"]  # fmt: skip


def latest_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoints" / "latest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def assert_same_checkpoint(a: Path, b: Path) -> None:
    (ta, sa), (tb, sb) = load_checkpoint(a, extra="lst"), load_checkpoint(b, extra="lst")
    assert sa["step"] == sb["step"] and sa["losses"] == sb["losses"]
    for group in ("trainable", "optimizer"):
        assert ta[group].keys() == tb[group].keys()
        for key in ta[group]:
            assert torch.equal(ta[group][key], tb[group][key]), (group, key)


def test_resume_after_kill_is_bit_exact(text_task, tmp_path, capsys):
    opts = options(text_task)  # 40 examples / 4 = 10 steps per epoch, 60 in all
    run_dir, ref = tmp_path / "run", tmp_path / "ref"
    argv = [*cli_args(opts, run_dir), "--checkpoint-every", "5"]
    proc = subprocess.Popen([sys.executable, "-m", "kexue.cli", *argv], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while latest_step(run_dir) < 15 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest_step(run_dir)
    assert 15 <= killed_at < 60
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--resume"])
    assert exc.value.code == 0, capsys.readouterr().err
    assert f"resumed_from_step={killed_at}" in capsys.readouterr().out

    spec = RunSpec(**opts)  # what the CLI built
    assert json.loads((run_dir / "metrics.json").read_text())["spec"] == spec.to_dict()
    full = run(spec, progress=False, checkpoint_dir=ref, checkpoint_every=5)
    assert_same_checkpoint(run_dir, ref)
    side = load_file(run_dir / "side_network.safetensors")
    mine = full.model.side.state_dict()
    assert side.keys() == mine.keys()
    assert all(torch.equal(side[k], mine[k]) for k in side)
    assert json.loads((run_dir / "metrics.json").read_text())["eval_accuracy"] == full.accuracy


def test_resume_from_an_earlier_checkpoint_is_bit_exact(text_task, tmp_path):
    """In one process: point ``latest.json`` back to the checkpoint of step 15 (mid-epoch 2)
    and resume; the end is the uninterrupted run's. Dropout and a baseline method are on, so
    the per-step dropout keys and the AdamW state of every weight are exercised."""
    resume_at = 15
    spec = RunSpec(**options(text_task, epochs=3, method="full", dropout=0.2))
    ref, out = tmp_path / "ref", tmp_path / "out"
    full = run(spec, progress=False, checkpoint_dir=ref, checkpoint_every=5)
    run(spec, progress=False, checkpoint_dir=out, checkpoint_every=5, keep_checkpoints=100)
    ckpt = out / "checkpoints"
    for later in ckpt.glob("step-*"):
        if int(later.name.split("-")[1]) > resume_at:
            shutil.rmtree(later)
    (ckpt / "latest.json").write_text(
        json.dumps({"step": resume_at, "dir": f"step-{resume_at:08d}"})
    )
    resumed = run(spec, progress=False, checkpoint_dir=out, checkpoint_every=5, resume=True)
    assert resumed.stats.resumed_from_step == resume_at
    assert resumed.stats.losses == full.stats.losses
    assert_same_checkpoint(out, ref)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_refusals(text_task, tmp_path, capsys):
    spec = RunSpec(**options(text_task, epochs=1, init="random"))
    out = tmp_path / "run"
    fresh = run(spec, progress=False, checkpoint_dir=out, resume=True)  # nothing to resume
    assert fresh.stats.resumed_from_step is None and latest_step(out) == -1
    run(spec, progress=False, checkpoint_dir=out, checkpoint_every=4)
    assert latest_step(out) == 10
    with pytest.raises(ValueError, match="already holds training checkpoints"):
        run(spec, progress=False, checkpoint_dir=out, checkpoint_every=4)
    other = RunSpec(**options(text_task, epochs=1, init="random", lr=1e-3))
    with pytest.raises(CheckpointError, match=r"another run \(lr: None there, 0\.001 here\)"):
        run(other, progress=False, checkpoint_dir=out, resume=True)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        run(spec, progress=False, checkpoint_every=3)
    with pytest.raises(ValueError, match="checkpoint_every"):
        run(spec, progress=False, checkpoint_dir=out, checkpoint_every=-1)
    # a truncated tensor file is refused, naming SHA-256; the CLI says it on one line
    weights = out / "checkpoints" / "step-00000010" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match="SHA-256"):
        run(spec, progress=False, checkpoint_dir=out, resume=True)
    argv = [*cli_args(options(text_task, epochs=1), out), "--init", "random", "--resume"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "SHA-256" in err[0], err
    with pytest.raises(SystemExit) as exc:
        main([*cli_args(options(text_task, epochs=1), out), "--checkpoint-every", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and "--resume" in err[0] and len(err) == 1


def test_epoch_batches_depend_on_seed_and_epoch_only(text_task):
    ids = [[1] * (1 + i % 5) for i in range(23)]
    data = encode(lambda texts, **_: {"input_ids": ids}, ["x"] * 23, [0] * 23, 8)
    settings = TrainSettings(batch_size=4, seed=3)
    first = epoch_batches(data, settings, 2)
    assert epoch_batches(data, settings, 2) == first  # no state carried
    assert epoch_batches(data, settings, 1) != first
    assert epoch_batches(data, TrainSettings(batch_size=4, seed=4), 2) != first
    assert sorted(i for b in first for i in b) == list(range(23))
    assert len(first) == 6 and all(len(b) <= 4 for b in first)


def test_dropout_masks_change_from_step_to_step(text_task):
    """One batch per epoch and a learning rate too small to move the weights: the loss of every
    step would be the same (up to the order of the rows) but for dropout, so the masks must
    differ between steps (a per-step key that ignored the step would pass the resume tests)
    and be reproducible."""
    spec = RunSpec(**options(text_task, epochs=4, batch_size=64, lr=1e-30, dropout=0.5))
    losses = torch.tensor(run(spec, progress=False).stats.losses)
    assert len(losses) == 4 and torch.pdist(losses[:, None]).min() > 1e-4
    assert torch.equal(torch.tensor(run(spec, progress=False).stats.losses), losses)
    still = run(RunSpec(**{**spec.to_dict(), "dropout": 0.0}), progress=False).stats.losses
    assert max(still) - min(still) < 1e-5
