"""kexue.distributed: work split, keyed randomness and float64 reductions across processes."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kexue import distributed


def test_single_process_is_the_identity() -> None:
    x = torch.arange(6.0)
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.is_main_process()
    assert list(distributed.shard(range(5))) == [0, 1, 2, 3, 4]
    assert distributed.all_reduce_sum(x) is x
    assert distributed.all_gather_cat(x) is x
    assert torch.equal(distributed.assemble(x[:2], [3, 1], 4), torch.tensor([0.0, 1, 0, 0]))
    gen = torch.Generator().manual_seed(4)
    want = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(4)))
    assert distributed.shared_seed(gen) == want


def test_keyed_generator_depends_on_keys_only() -> None:
    a = torch.randn(4, generator=distributed.keyed_generator(7, 3, 11))
    b = torch.randn(4, generator=distributed.keyed_generator(7, 3, 11))
    c = torch.randn(4, generator=distributed.keyed_generator(7, 11, 3))
    d = torch.randn(4, generator=distributed.keyed_generator(8, 3, 11))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    seeds = {distributed.derive_seed(0, i, j) for i in range(50) for j in range(50)}
    assert len(seeds) == 2500 and all(0 <= s < 2**63 for s in seeds)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        items = distributed.shard(torch.arange(10))
        # each item's draw depends on its key only; partial sums in float64
        part = torch.zeros(3, dtype=torch.float64)
        for i in items.tolist():
            part += torch.randn(3, generator=distributed.keyed_generator(5, i), dtype=torch.float64)
        total = distributed.all_reduce_sum(part)
        gathered = distributed.all_gather_cat(torch.tensor([rank, 10 * rank]))
        rows = distributed.assemble(items.double()[:, None] * 2, items, 10)
        seed = distributed.shared_seed(torch.Generator().manual_seed(100 + rank))
        result = (items.tolist(), total, gathered, distributed.is_main_process(), rows, seed)
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
        distributed.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_agree_with_one(tmp_path) -> None:
    mp.start_processes(
        _worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = sum(
        torch.randn(3, generator=distributed.keyed_generator(5, i), dtype=torch.float64)
        for i in range(10)
    )
    (items0, total0, gathered0, main0, rows0, seed0) = results[0]
    (items1, total1, gathered1, main1, rows1, seed1) = results[1]
    # every item's row in place on every rank; the seed of rank 0's generator everywhere
    assert torch.equal(rows0, torch.arange(10.0, dtype=torch.float64)[:, None] * 2)
    assert torch.equal(rows0, rows1)
    expected = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(100)))
    assert seed0 == seed1 == expected
    assert (items0, items1) == ([0, 2, 4, 6, 8], [1, 3, 5, 7, 9])
    torch.testing.assert_close(total0, single, rtol=0, atol=1e-12)
    assert torch.equal(total0, total1)
    assert gathered0.tolist() == gathered1.tolist() == [0, 0, 1, 10]
    assert (main0, main1) == (True, False)
