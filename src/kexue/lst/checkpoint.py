"""Crash-safe checkpoints of LST (and baseline) training, for bit-exact resume.

A checkpoint (:mod:`kexue.checkpoint`: safetensors + a JSON manifest with SHA-256, written to a
temporary folder and renamed, then ``latest.json`` moved to it) holds what the next step
depends on: the trainable weights, AdamW's state, the number of steps done and the loss
history, plus the run's identity (the ``RunSpec``), checked on resume. Nothing random needs to
be saved: the data order of epoch ``e`` and the dropout of step ``k`` come from generators
keyed by ``(seed, e)`` and ``(seed, k, process)`` (:mod:`kexue.lst.train`), so a resumed run
takes exactly the steps the uninterrupted run would have (``docs/guides/lst.md``,
"Checkpoints and resume").

Layout: ``FOLDER/checkpoints/step-XXXXXXXX/{trainable,optimizer}.safetensors, state.json`` and
``FOLDER/checkpoints/latest.json``. Only the main process writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kexue.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)
from kexue.distributed import barrier, is_main_process
from kexue.exceptions import CheckpointError
from kexue.validation import check_bool, check_int, describe

__all__ = ["Checkpointing", "ResumeState"]


@dataclass
class ResumeState:
    """What a checkpoint restores besides the weights and the optimiser: the steps done and
    the loss history up to them."""

    step: int
    losses: list[float]


@dataclass
class Checkpointing:
    """Where and how often training writes checkpoints, and whether it resumes.

    Args:
        folder: the run folder; checkpoints go to ``folder/checkpoints``.
        every: write a checkpoint every ``every`` optimiser steps and after the last one
            (0: write none).
        resume: continue from the latest checkpoint in ``folder`` when there is one (start
            from step 0 otherwise). Without ``resume``, a folder that already holds
            checkpoints is refused, so a run is never silently overwritten.
        keep: how many of the newest checkpoints to keep.
        identity: JSON-able description of the run (``run`` stores its ``RunSpec``); a
            checkpoint of another run is refused on resume, naming the fields that differ.
    """

    folder: str | os.PathLike
    every: int = 0
    resume: bool = False
    keep: int = 2
    identity: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.folder, str | os.PathLike):
            raise TypeError(f"folder must be a path, got {describe(self.folder)}")
        self.folder = Path(self.folder)
        self.every = check_int(self.every, "every", low=0)
        self.resume = check_bool(self.resume, "resume")
        self.keep = check_int(self.keep, "keep", low=1)
        if not isinstance(self.identity, dict):
            raise TypeError(f"identity must be a dict, got {describe(self.identity)}")

    def latest(self) -> Path | None:
        """The checkpoint a resume would start from (``None``: there is none)."""
        return latest_checkpoint(self.folder)

    def check_start(self) -> Path | None:
        """The checkpoint to resume from; ``ValueError`` if the folder holds checkpoints and
        ``resume`` is off."""
        found = self.latest()
        if found is not None and not self.resume:
            raise ValueError(
                f"{self.folder} already holds training checkpoints (latest: {found.name}); "
                "resume it (resume=True, --resume) or choose another folder"
            )
        return found if self.resume else None

    def due(self, step: int, total: int) -> bool:
        """Whether a checkpoint is written after ``step`` of ``total`` steps."""
        return self.every > 0 and (step % self.every == 0 or step == total)

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        losses: list[float],
    ) -> Path | None:
        """Write the checkpoint of ``step`` (main process; the others wait for it)."""
        path = None
        if is_main_process():
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            opt_tensors, opt_meta = optimizer_to_flat(optimizer.state_dict())
            path = save_checkpoint(
                self.folder,
                step,
                {"trainable": trainable, "optimizer": opt_tensors},
                {"optimizer": opt_meta, "identity": self.identity, "losses": list(losses)},
                keep=self.keep,
                extra="lst",
            )
        barrier()
        return path

    def restore(
        self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> ResumeState:
        """Load checkpoint ``path`` into ``model`` (its trainable weights) and ``optimizer``.

        Raises:
            CheckpointError: a file is missing or altered, the checkpoint belongs to another
                run (fields of its identity differ) or to another model (weights differ).
        """
        tensors, state = load_checkpoint(path, extra="lst")
        for group in ("trainable", "optimizer"):
            if group not in tensors:
                raise CheckpointError(f"checkpoint {path} lacks {group}.safetensors")
        saved = state.get("identity", {})
        differ = sorted(k for k in set(saved) | set(self.identity)
                        if saved.get(k) != self.identity.get(k))  # fmt: skip
        if differ:
            shown = ", ".join(
                f"{k}: {saved.get(k)!r} there, {self.identity.get(k)!r} here" for k in differ[:4]
            )
            raise CheckpointError(
                f"checkpoint {path} belongs to another run ({shown}); resume with the same "
                "options or choose another folder"
            )
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        weights = tensors["trainable"]
        if set(weights) != set(trainable):
            extra = sorted(set(weights) ^ set(trainable))[:3]
            raise CheckpointError(
                f"checkpoint {path}: its weights do not match this model (e.g. {extra})"
            )
        with torch.no_grad():
            for name, p in trainable.items():
                if weights[name].shape != p.shape:
                    raise CheckpointError(
                        f"checkpoint {path}: {name} has shape {tuple(weights[name].shape)}, "
                        f"the model {tuple(p.shape)}"
                    )
                p.copy_(weights[name])
        # load_state_dict moves the moments to each parameter's device (and keeps AdamW's
        # step counters where torch wants them)
        optimizer.load_state_dict(optimizer_from_flat(tensors["optimizer"], state["optimizer"]))
        return ResumeState(step=int(state["step"]), losses=[float(x) for x in state["losses"]])
