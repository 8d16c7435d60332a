"""Work split across processes (``accelerate launch`` / ``torch.distributed``), with results
that do not depend on the number of processes.

A computation over many independent items (an image and a step, a batch) is split by
:func:`shard`: process ``r`` of ``W`` takes items ``r, r + W, r + 2W, ...``. Each item draws
its randomness from :func:`keyed_generator` (a generator seeded by the seed and the item's own
keys, never by the process), so the draws are the same whoever computes the item. Partial sums
are reduced in float64 with :func:`all_reduce_sum`; 1 and N processes then agree to float64
rounding. Without an initialised process group every function is the one-process identity.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_cat",
    "all_reduce_sum",
    "assemble",
    "barrier",
    "derive_seed",
    "is_distributed",
    "is_main_process",
    "keyed_generator",
    "rank",
    "shard",
    "shared_seed",
    "world_size",
]

_MASK64 = 0xFFFFFFFFFFFFFFFF


def is_distributed() -> bool:
    """True inside an initialised ``torch.distributed`` group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): where progress bars and files belong."""
    return rank() == 0


_Sharded = TypeVar("_Sharded", Tensor, range, Sequence[int])


def shard(items: _Sharded) -> _Sharded:
    """This process's share of ``items``: every ``world_size()``-th one from ``rank()``."""
    return items[rank() :: world_size()]


def derive_seed(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 steps): independent streams per key tuple."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & _MASK64
    return x & 0x7FFFFFFFFFFFFFFF


def keyed_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded by ``(seed, *keys)``: the same draws for the same keys in
    any process, whatever the split of the work."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *keys))


def _backend_device(tensor: Tensor) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo CPU tensors.
    return tensor.device if dist.get_backend() != "gloo" else torch.device("cpu")


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over processes (a new tensor; the input itself without a group)."""
    if not is_distributed():
        return tensor
    work = tensor.detach().to(_backend_device(tensor)).clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenate every process's ``tensor`` (equal shapes) along dim 0, in rank order."""
    if not is_distributed():
        return tensor
    work = tensor.detach().to(_backend_device(tensor)).contiguous()
    parts = [torch.empty_like(work) for _ in range(world_size())]
    dist.all_gather(parts, work)
    return torch.cat(parts).to(tensor.device)


def barrier() -> None:
    """Wait for every process (no-op without a group)."""
    if is_distributed():
        dist.barrier()


def shared_seed(generator: torch.Generator | None = None) -> int:
    """A 62-bit seed drawn from ``generator`` (the global generator when None) on rank 0 and
    sent to every process: the root of the keyed draws of one distributed computation."""
    seed = torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64)
    if is_distributed():
        work = seed if rank() == 0 else torch.zeros_like(seed)
        seed = all_reduce_sum(work)  # one non-zero term: exact
    return int(seed.item())


def assemble(values: Tensor, index: Sequence[int] | Tensor, total: int) -> Tensor:
    """Rows ``values[j]`` computed here for items ``index[j]``, combined with the other
    processes' into one tensor of ``total`` rows (each item computed by exactly one process,
    the others contribute zeros: the sum is exact). Without a group: the rows in place."""
    out = torch.zeros((total, *values.shape[1:]), dtype=values.dtype, device=values.device)
    out[torch.as_tensor(index, dtype=torch.long, device=values.device)] = values
    return all_reduce_sum(out)


def free_port() -> int:
    """A TCP port of this machine that is free now (for a process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
