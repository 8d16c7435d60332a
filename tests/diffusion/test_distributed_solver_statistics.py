"""estimate_solver_statistics under ``accelerate launch``: 2 CPU processes against 1.

The (image, grid step) pairs are split over the processes; each pair's noise comes from
``pair_generator(seed, image, step)`` with rank 0's seed and image subset, and the float64 sums
are reduced, so every rank returns one process's statistics to float64 rounding.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kexue.testing.diffusion import (
    DISTRIBUTED_SOLVER_WORKER,
    distributed_problem,
    distributed_solver_results,
)

pytest.importorskip("accelerate")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(tmp_path: Path, processes: int) -> list[dict[str, torch.Tensor]]:
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate CLI not installed")
    script = tmp_path / "worker.py"
    script.write_text(DISTRIBUTED_SOLVER_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    # torchrun (--multi_gpu) with ACCELERATE_USE_CPU starts CPU processes joined by gloo
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script), str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(processes)]


def test_two_processes_agree_with_one(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want_all = distributed_solver_results(distributed_problem(), 11)
    finally:
        torch.set_num_threads(before)
    ranks = launch(tmp_path, 2)
    assert [int(r.pop("world_size")) for r in ranks] == [2, 2]
    assert set(ranks[0]) == set(want_all)
    for key, want in want_all.items():
        for r, got in enumerate(ranks):
            assert got[key].dtype == want.dtype, key
            if want.dtype == torch.float64:  # sums over pairs in another order
                torch.testing.assert_close(got[key], want, rtol=1e-10, atol=1e-12,
                                           msg=f"{key} on rank {r}")  # fmt: skip
            else:  # steps, seeds, counts: exact
                assert torch.equal(got[key], want), f"{key} on rank {r}"
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # the same on every rank
    assert float(want_all["jvp.s"].abs().max()) > 0
