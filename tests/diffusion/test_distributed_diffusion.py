"""estimate_moments, nll_bpd and the sample-quality features under ``accelerate launch``.

Two CPU processes (the real launcher, gloo) must return, on every rank, what one process
returns: the noise of each (image, step) pair is keyed by the seed, the image and the step,
and partial sums are reduced in float64, so only float64 rounding may differ.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kexue.testing.diffusion import (
    DISTRIBUTED_WORKER,
    distributed_problem,
    distributed_results,
    launch_worker,
)

pytest.importorskip("accelerate")


def launch(tmp_path: Path, processes: int) -> list[dict[str, torch.Tensor]]:
    try:
        return launch_worker(DISTRIBUTED_WORKER, tmp_path, processes)
    except FileNotFoundError as err:  # no accelerate command
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def one_process() -> dict[str, torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return distributed_results(distributed_problem())
    finally:
        torch.set_num_threads(before)


def test_two_processes_agree_with_one(tmp_path: Path, one_process) -> None:
    ranks = launch(tmp_path, 2)
    assert [int(r.pop("world_size")) for r in ranks] == [2, 2]
    for key, want in one_process.items():
        for r, got in enumerate(ranks):
            assert got[key].dtype == want.dtype, key
            if want.dtype == torch.float64:
                # the same terms summed in another order: float64 rounding only
                torch.testing.assert_close(got[key], want, rtol=1e-12, atol=1e-12,
                                           msg=f"{key} on rank {r}")  # fmt: skip
            else:  # per-item values computed once and copied: exact
                assert torch.equal(got[key], want), f"{key} on rank {r}"
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # the same on every rank
    # the per-image values are each computed by one process, never summed: exact
    assert torch.equal(ranks[0]["per_image.gamma"], one_process["per_image.gamma"])
    assert torch.equal(ranks[0]["nll.large.per_image"], one_process["nll.large.per_image"])


def test_results_do_not_depend_on_the_batch_size(one_process) -> None:
    """The keyed noise also makes the batch size irrelevant (same draws per pair)."""
    from kexue.diffusion import estimate_moments, nll_bpd

    problem = distributed_problem()
    model, schedule = problem["model"], problem["schedule"]
    gen = torch.Generator().manual_seed(2)
    moments = estimate_moments(model, schedule, problem["train"], num_images=10, batch_size=64,
                               generator=gen, progress=False)  # fmt: skip
    torch.testing.assert_close(moments.Gamma, one_process["moments.Gamma"], rtol=1e-12, atol=0)
    nll = nll_bpd(model, schedule, problem["heldout"], steps=4, variance="large", batch_size=7,
                  generator=torch.Generator().manual_seed(3), progress=False)  # fmt: skip
    torch.testing.assert_close(nll.bpd_per_image, one_process["nll.large.per_image"],
                               rtol=1e-12, atol=0)  # fmt: skip


@pytest.mark.slow
def test_benchmark_smoke_plan(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "distributed.py"), "--plan",
                           "smoke", "--out", str(tmp_path)], capture_output=True, text=True,
                          env=env, cwd=root, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    runs = json.loads((tmp_path / "distributed.json").read_text())["runs"]
    assert [r["processes"] for r in runs] == [1, 2]
    assert runs[1]["gamma_max_abs_diff"] < 1e-12 and runs[1]["bpd_abs_diff"] < 1e-12
    assert "Not run: GPUs" in (tmp_path / "distributed.md").read_text()
