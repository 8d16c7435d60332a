"""Crash-safe training checkpoints of diffusion runs: :mod:`kexue.checkpoint` (shared by every
capability), with safetensors reported as part of the ``diffusion`` extra.

Layout of a run folder ``OUT``::

    OUT/checkpoints/step-00001000/{model,ema,optimizer}.safetensors, state.json
    OUT/checkpoints/latest.json      -> {"step": 1000, "dir": "step-00001000"}

Checkpoints hold what a run needs to resume (model, EMA, optimizer); the model to sample from
is written beside them with ``save_pretrained`` (``OUT/model``, see :mod:`.train`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from kexue import checkpoint as _shared
from kexue.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
)

__all__ = [
    "CheckpointError",
    "latest_checkpoint",
    "load_checkpoint",
    "optimizer_from_flat",
    "optimizer_to_flat",
    "save_checkpoint",
]


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, dict[str, Tensor]],
    state: dict[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Write ``tensors`` (file name -> {key: tensor}) and ``state`` as checkpoint ``step``."""
    return _shared.save_checkpoint(run_dir, step, tensors, state, keep=keep, extra="diffusion")


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Load and verify a checkpoint folder (or a run folder: its latest checkpoint).

    Returns ``(tensors, state)``; raises :class:`CheckpointError` naming the problem when a
    file is missing, truncated or does not match its recorded checksum.
    """
    return _shared.load_checkpoint(path, extra="diffusion")
