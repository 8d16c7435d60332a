"""Data-parallel LST: 2 CPU processes under ``accelerate launch`` against 1 process.

The independent reference is the one-process run of the same spec: with the same global
batches, the summed, ``n_r / n``-weighted gradients of two processes are the one-process
gradient up to float32 rounding, so the trained weights, the loss of every step and the
evaluation logits must agree to float32 precision (dropout off: each process draws its own
masks). The batch size 7 does not split evenly over two processes and the last batch of an
epoch (40 = 5 x 7 + 5) is smaller: plain averaging of per-process mean losses would fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kexue.cli import main
from kexue.lst import RunSpec, load_inputs, predict, run
from kexue.lst.measure import free_port

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dp_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}


def accelerate_launch(processes: int, *args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``processes`` CPU processes on this machine (torchrun under the
    hood: accelerate's ``--cpu`` alone starts one process unless MPI is set up)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate CLI not installed")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)


def tiny_spec(text_task, **kwargs) -> RunSpec:
    root, model = text_task
    options = {
        "backbone": str(model),
        "train": str(root / "train.tsv"),
        "eval": str(root / "dev.tsv"),
        "epochs": 2,
        "batch_size": 7,
        "fisher_samples": 16,
        "reduction_factor": 4,
        "dropout": 0.0,
        "eval_batch_size": 3,
        "device": "cpu",
    }
    return RunSpec(**{**options, **kwargs})


def test_two_processes_agree_with_one(text_task, tmp_path):
    spec = tiny_spec(text_task)
    done = accelerate_launch(2, str(WORKER), json.dumps(spec.to_dict()), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "result.json").read_text())
    tensors = load_file(tmp_path / "result.safetensors")
    assert two["processes"] == 2

    inputs = load_inputs(spec)
    one = run(spec, inputs=inputs, progress=False)
    weights = {n: p.detach() for n, p in one.model.named_parameters() if p.requires_grad}
    assert {f"weights.{n}" for n in weights} == set(tensors) - {"logits"}
    for name, value in weights.items():
        torch.testing.assert_close(tensors[f"weights.{name}"], value, rtol=1e-5, atol=1e-6)
    assert len(two["losses"]) == len(one.stats.losses) == 12  # 2 epochs of ceil(40 / 7)
    torch.testing.assert_close(
        torch.tensor(two["losses"]), torch.tensor(one.stats.losses), rtol=1e-5, atol=1e-6
    )
    logits = predict(one.model, inputs.eval_set, spec.eval_batch_size, inputs.pad_id,
                     progress=False)  # fmt: skip
    torch.testing.assert_close(tensors["logits"], logits, rtol=1e-5, atol=1e-6)
    assert two["accuracy"] == one.accuracy
    # the weights moved: agreement is not that of two untrained copies
    fresh = run(tiny_spec(text_task, epochs=1, lr=1e-9), progress=False).model
    moved = dict(fresh.named_parameters())
    assert any(not torch.allclose(moved[n], v, atol=1e-4) for n, v in weights.items())


@pytest.mark.slow
def test_cli_under_accelerate_launch_writes_from_the_main_process_only(text_task, tmp_path, capsys):
    """``kexue lst train`` under 2 processes: one summary line, the files once, the same side
    network as one process; its checkpoint resumes in one process to the same end."""
    root, model = text_task
    base = ["lst", "train", "--backbone", str(model), "--data", str(root / "train.tsv"),
            "--eval", str(root / "dev.tsv"), "--epochs", "2", "--batch-size", "7",
            "--dropout", "0", "--fisher-samples", "16", "--reduction-factor", "4",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    done = accelerate_launch(2, "-m", "kexue.cli", *base, "--out", str(two),
                             "--checkpoint-every", "5")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "processes=2" in lines[0], done.stdout
    assert sorted(p.name for p in two.iterdir()) == [
        "checkpoints", "config.json", "metrics.json", "side_network.safetensors"
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main([*base, "--out", str(one)])
    assert exc.value.code == 0, capsys.readouterr().err
    a = load_file(two / "side_network.safetensors")
    b = load_file(one / "side_network.safetensors")
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # resume the 2-process run's step-10 checkpoint in one process
    ckpt = two / "checkpoints"
    (ckpt / "latest.json").write_text(json.dumps({"step": 10, "dir": "step-00000010"}))
    with pytest.raises(SystemExit) as exc:
        main([*base, "--out", str(two), "--checkpoint-every", "5", "--resume"])
    assert exc.value.code == 0, capsys.readouterr().err
    assert "resumed_from_step=10" in capsys.readouterr().out
    c = load_file(two / "side_network.safetensors")
    for key in b:
        torch.testing.assert_close(c[key], b[key], rtol=1e-5, atol=1e-6)
