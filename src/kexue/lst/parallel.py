"""Data-parallel LST training across processes (``accelerate launch``, ``torchrun``, or any
initialised ``torch.distributed`` group); ``docs/guides/lst.md``, "Many processes".

Every process holds the whole model: the frozen backbone is a plain replica (no gradients,
never wrapped in DDP) and what trains is kept equal on every process. A global batch ``B`` of
``n`` examples is the same whatever the number of processes ``W``; process ``r`` computes the
loss of its rows ``B[r::W]`` (``n_r`` of them) scaled by ``n_r / n``, and the gradients are
summed over processes, so every process steps with

    grad = sum_r (n_r / n) grad(mean loss over B[r::W]) = grad(mean loss over B)

the gradient one process computes on ``B`` (up to float rounding), also when ``W`` does not
divide ``n``. Parameters that received no gradient anywhere keep ``grad = None`` (AdamW then
skips them, as in one process).

Without a process group every function here is the one-process identity.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from kexue.distributed import all_reduce_sum, is_distributed, rank
from kexue.extras import require
from kexue.validation import check_choice

__all__ = [
    "DEVICES",
    "MIXED_PRECISION",
    "autocast_dtype",
    "check_device",
    "setup_processes",
    "sum_gradients",
    "sync_parameters",
]

MIXED_PRECISION = ("no", "bf16", "fp16")
DEVICES = "'auto', 'cpu', 'cuda' or 'cuda:<index>'"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "y", "on")


def check_device(device: object) -> str:
    """``device`` as a string accepted by :func:`setup_processes`; ``ValueError`` naming it."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a string ({DEVICES}), got {type(device).__name__}")
    if device == "auto":
        return device
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be {DEVICES}, got {device!r}")
    return device


def setup_processes(device: str = "auto") -> torch.device:
    """Join the process group a launcher prepared, and return this process's device.

    Under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE > 1`` in the environment) without
    an initialised ``torch.distributed`` group, ``accelerate.PartialState`` initialises it
    (gloo for CPU processes, NCCL for GPUs). ``device="auto"`` picks ``cuda:<LOCAL_RANK>``
    when CUDA is available (and ``ACCELERATE_USE_CPU`` is not set), else the CPU; ``"cpu"``
    forces CPU processes.
    """
    device = check_device(device)
    want_cpu = device == "cpu" or _env_flag("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and not (dist.is_available() and dist.is_initialized()):
        require("accelerate", "lst", "data-parallel kexue.lst").PartialState(cpu=want_cpu)
    if device != "auto":
        chosen = torch.device(device)
        if chosen.type == "cuda" and chosen.index is None and is_distributed():
            chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank())))
    elif want_cpu:
        chosen = torch.device("cpu")
    else:
        chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available on this machine")
        torch.cuda.set_device(chosen)
    return chosen


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype of the backbone's autocast for ``mixed_precision`` on ``device`` (None for
    ``"no"``): bf16 on CPU (opt-in) or CUDA, fp16 on CUDA only."""
    mixed_precision = check_choice(mixed_precision, "mixed_precision", MIXED_PRECISION)
    if mixed_precision == "no":
        return None
    if mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError(
            "mixed_precision='fp16' needs a CUDA device (float16 autocast on a CPU is slow and "
            "loses range); use 'bf16' on a CPU"
        )
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"mixed_precision='bf16': {device} does not support bfloat16; use 'fp16'")
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


def sync_parameters(params: Sequence[Tensor]) -> None:
    """Overwrite ``params`` on every process with those of process 0 (one reduction: the
    sum of process 0's values and zeros elsewhere, exact), as DDP does when it wraps a model."""
    if not is_distributed() or not params:
        return
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        if rank() != 0:
            flat.zero_()
        flat = all_reduce_sum(flat)
        offset = 0
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def sum_gradients(params: Sequence[Tensor], loss: Tensor) -> Tensor:
    """Sum the gradients of ``params`` and the (already weighted) ``loss`` over processes,
    in one reduction; returns the summed loss. ``p.grad`` stays ``None`` where no process
    produced a gradient."""
    if not is_distributed():
        return loss.detach()
    dtype = next((p.grad.dtype for p in params if p.grad is not None), torch.float32)
    device = loss.device
    parts = [
        p.grad.reshape(-1).to(dtype)
        if p.grad is not None
        else torch.zeros(p.numel(), dtype=dtype, device=device)
        for p in params
    ]
    present = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=device)
    flat = all_reduce_sum(torch.cat([*parts, present, loss.detach().reshape(1).to(dtype)]))
    offset = 0
    for k, p in enumerate(params):
        chunk = flat[offset : offset + p.numel()]
        offset += p.numel()
        if flat[-1 - len(params) + k] > 0:
            p.grad = chunk.view_as(p).to(p.dtype).clone()
        else:
            p.grad = None
    return flat[-1]
