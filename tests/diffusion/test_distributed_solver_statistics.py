"""estimate_solver_statistics under ``accelerate launch``: 2 CPU processes against 1.

The (image, grid step) pairs are split over the processes; each pair's noise comes from
``pair_generator(seed, image, step)`` with rank 0's seed and image subset, and the float64 sums
are reduced, so every rank returns one process's statistics to float64 rounding. The same
worker reruns the moments / NLL checks of ``test_distributed_diffusion.py`` on a model whose eps
is not identically 0 (the untrained U-Net's output layers are zero-initialised).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kexue.testing.diffusion import (
    DISTRIBUTED_SOLVER_WORKER,
    distributed_problem,
    distributed_solver_results,
    launch_worker,
)

pytest.importorskip("accelerate")


def launch(tmp_path: Path, processes: int) -> list[dict[str, torch.Tensor]]:
    try:
        return launch_worker(DISTRIBUTED_SOLVER_WORKER, tmp_path, processes)
    except FileNotFoundError as err:  # no accelerate command
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(one process's results, each of 2 processes' results): one launch for the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want_all = distributed_solver_results(distributed_problem(), 11)
    finally:
        torch.set_num_threads(before)
    ranks = launch(tmp_path_factory.mktemp("launch"), 2)
    assert [int(r.pop("world_size")) for r in ranks] == [2, 2]
    return want_all, ranks


# nll_bpd splits whole batches over processes, so the U-Net's float32 outputs (which change
# with the batch) match one process's and the bound agrees to float64 rounding
NLL = "perturbed.nll."


def check_agree(want: torch.Tensor, ranks: list, key: str, rtol: float) -> None:
    for r, got in enumerate(ranks):
        assert got[key].dtype == want.dtype, key
        if want.dtype == torch.float64:  # sums over pairs in another order
            torch.testing.assert_close(got[key], want, rtol=rtol, atol=rtol * 1e-2,
                                       msg=f"{key} on rank {r}")  # fmt: skip
        else:  # steps, seeds, counts: exact
            assert torch.equal(got[key], want), f"{key} on rank {r}"
    assert torch.equal(ranks[0][key], ranks[1][key]), key  # the same on every rank


def test_two_processes_agree_with_one(runs) -> None:
    want_all, ranks = runs
    assert set(ranks[0]) == set(want_all)
    for key, want in want_all.items():
        check_agree(want, ranks, key, 1e-10)
    assert float(want_all["jvp.s"].abs().max()) > 0
    assert float(want_all["perturbed.moments.Gamma"].min()) > 0  # eps_theta is not 0 here


def test_nll_agrees_to_float64_rounding_with_a_nonzero_model(runs) -> None:
    want_all, ranks = runs
    for key in [k for k in want_all if k.startswith(NLL)]:
        check_agree(want_all[key], ranks, key, 1e-10)
