"""DDPM training with EMA, gradient clipping, crash-safe checkpoints and bit-exact resume.

Loss (``docs/guides/diffusion.md``, "Training loss"):
``|| eps - eps_theta(abar_t x_0 + bbar_t eps, t) ||^2`` **summed over dimensions**, averaged
over the batch, with ``t ~ Uniform{1..T}``.

A run folder ``OUT`` holds ``config.json`` (the run), ``checkpoints/`` (what resuming needs,
:mod:`.checkpoint`) and ``model/``: the EMA weights of the latest checkpoint with their schedule,
written with ``save_pretrained``, so ``UNet.from_pretrained("OUT/model")`` samples from a run
(the CLI's ``--ckpt OUT`` does the same).

Every random draw of step ``k`` (the batch's ``t`` and ``eps``) comes from a generator
seeded by ``(seed, k, process)``, and the data order of epoch ``e`` from one seeded by
``(seed, e)``. Nothing random is carried between steps, so a run resumed from the checkpoint
of step ``k`` continues exactly as the uninterrupted run would have. Multi-GPU / multi-node
runs go through ``accelerate`` (each process takes its share of the global batch).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import TextColumn
from torch import Tensor

from kexue.diffusion.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)
from kexue.diffusion.data import ImageData, load_images
from kexue.diffusion.images import save_image_grid
from kexue.diffusion.sampler import sample
from kexue.diffusion.schedule import NoiseSchedule
from kexue.diffusion.unet import RUN_MODEL_DIR, UNet, UNetConfig, load_state_dict_strict
from kexue.exceptions import CheckpointError
from kexue.extras import require
from kexue.io import write_json_atomic
from kexue.progress import progress_bar


@dataclass
class DiffusionTrainConfig:
    """Everything that defines a diffusion training run (saved as ``OUT/config.json``)."""

    data: str = "mnist5k"
    steps: int = 20_000
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 500
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 500
    sample_every: int = 2_000
    keep_checkpoints: int = 2
    schedule: dict[str, Any] = field(default_factory=lambda: {"kind": "su_linear", "T": 1000})
    unet: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "ckpt_every")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.warmup < 0 or self.sample_every < 0 or self.grad_clip < 0:
            raise ValueError("warmup, sample_every and grad_clip must be >= 0")


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 steps): independent streams per step/process."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


def diffusion_loss(
    eps_model: Callable[[Tensor, Tensor], Tensor],
    schedule: NoiseSchedule,
    x0: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Monte Carlo DDPM loss of a batch: ``||eps - eps_theta(x_t, t)||^2`` summed over
    dimensions, mean over the batch, on one draw of :meth:`NoiseSchedule.noise_batch`."""
    t, eps, x_t = schedule.noise_batch(x0, generator=generator)
    pred = eps_model(x_t, t)
    return (pred - eps).pow(2).flatten(1).sum(1).mean()


class Trainer:
    """Trains a :class:`UNet` on images in [-1, 1]; writes checkpoints and sample grids.

    Use :meth:`create` for a new run (writes ``OUT/config.json``) or :meth:`resume` to
    continue ``OUT`` from its latest checkpoint; then :meth:`train`.
    """

    def __init__(
        self, config: DiffusionTrainConfig, out_dir: str | Path, *, data: ImageData | None = None
    ):
        Accelerator = require("accelerate", "diffusion").Accelerator
        if not isinstance(config, DiffusionTrainConfig):
            raise TypeError(f"config must be a DiffusionTrainConfig, got {type(config).__name__}")
        self.config = config
        self.out = Path(out_dir)
        self.data = data or load_images(config.data)
        self.schedule = NoiseSchedule.from_config(config.schedule)
        unet_cfg = UNetConfig(**({"in_channels": self.data.image_shape[0]} | config.unet))
        if unet_cfg.in_channels != self.data.image_shape[0]:
            raise ValueError(
                f"unet in_channels={unet_cfg.in_channels} but the data has "
                f"{self.data.image_shape[0]} channels"
            )
        self.accelerator = Accelerator()
        world = self.accelerator.num_processes
        if config.batch_size % world:
            raise ValueError(f"batch_size={config.batch_size} must divide among {world} processes")
        if config.batch_size > len(self.data.train):
            raise ValueError(
                f"batch_size={config.batch_size} exceeds the {len(self.data.train)} training images"
            )
        with torch.random.fork_rng(devices=[]):  # the init depends on the seed only
            torch.manual_seed(_mix(config.seed, 0x1417))
            model = UNet(unet_cfg, schedule=self.schedule)
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.ema.to(self.accelerator.device)
        self.step = 0

    # ------------------------------------------------------------------ run folders
    @classmethod
    def create(cls, config: DiffusionTrainConfig, out_dir: str | Path) -> Trainer:
        out = Path(out_dir)
        if latest_checkpoint(out) is not None:
            raise ValueError(
                f"{out} already holds a run; resume it with --resume or pick a new --out"
            )
        trainer = cls(config, out)
        if trainer.accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / "config.json", trainer.run_config())
        return trainer

    @classmethod
    def resume(cls, out_dir: str | Path, *, steps: int | None = None) -> Trainer:
        """Reopen ``out_dir`` at its latest checkpoint (``steps`` may extend the run)."""
        out = Path(out_dir)
        config_file = out / "config.json"
        if not config_file.exists():
            raise CheckpointError(f"{out} has no config.json: not a kexue training run")
        saved = json.loads(config_file.read_text())["train"]
        if steps is not None:
            saved["steps"] = steps
        trainer = cls(DiffusionTrainConfig(**saved), out)
        if latest_checkpoint(out) is not None:
            trainer.load(out)
        if steps is not None and trainer.accelerator.is_main_process:
            write_json_atomic(config_file, trainer.run_config())
        return trainer

    def run_config(self) -> dict[str, Any]:
        return {
            "train": asdict(self.config),
            "unet": self.unwrapped.config.to_dict(),
            "schedule": self.schedule.config,
            "image_shape": list(self.data.image_shape),
        }

    @property
    def unwrapped(self) -> UNet:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------ state
    def save(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        opt_tensors, opt_meta = optimizer_to_flat(self.optimizer.state_dict())
        tensors = {
            "model": self.unwrapped.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": opt_tensors,
        }
        state = {"optimizer": opt_meta, "config": self.run_config()}
        path = save_checkpoint(
            self.out, self.step, tensors, state, keep=self.config.keep_checkpoints
        )
        self.ema_model().save_pretrained(self.out / RUN_MODEL_DIR)
        return path

    def ema_model(self) -> UNet:
        """The EMA weights as a :class:`UNet` with its schedule and ``info`` (the run's image
        shape, step and training config): what ``OUT/model`` holds."""
        model = copy.deepcopy(self.ema).cpu().eval()
        model.info = {
            "image_shape": list(self.data.image_shape),
            "step": self.step,
            "train": asdict(self.config),
        }
        return model

    def load(self, path: str | Path) -> None:
        tensors, state = load_checkpoint(path)
        for name in ("model", "ema", "optimizer"):
            if name not in tensors:
                raise CheckpointError(f"checkpoint {path} lacks {name}.safetensors")
        load_state_dict_strict(self.unwrapped, tensors["model"], "the checkpoint's model")
        load_state_dict_strict(self.ema, tensors["ema"], "the checkpoint's EMA weights")
        device = self.accelerator.device
        opt = optimizer_from_flat(
            {k: v.to(device) for k, v in tensors["optimizer"].items()}, state["optimizer"]
        )
        self.optimizer.load_state_dict(opt)
        self.step = int(state["step"])

    # ------------------------------------------------------------------ training
    def lr_at(self, step: int) -> float:
        warm = self.config.warmup
        return self.config.lr * min(1.0, (step + 1) / warm) if warm else self.config.lr

    def batch(self, step: int) -> Tensor:
        """This process's share of the global batch of ``step`` (epoch-wise permutations)."""
        n, size = len(self.data.train), self.config.batch_size
        per_epoch = n // size
        epoch, within = divmod(step, per_epoch)
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(_mix(self.config.seed, epoch))
        )
        idx = order[within * size : (within + 1) * size]
        idx = idx[self.accelerator.process_index :: self.accelerator.num_processes]
        return self.data.train[idx].to(self.accelerator.device)

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        for e, p in zip(self.ema.parameters(), self.unwrapped.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - decay)

    def train(self, *, progress: bool = True) -> dict[str, float]:
        """Run until ``config.steps``; returns the final smoothed loss and throughput."""
        cfg = self.config
        if self.step >= cfg.steps:
            return {"step": self.step, "loss": float("nan"), "images_per_s": 0.0}
        status = TextColumn("{task.fields[status]}")
        show = progress and self.accelerator.is_main_process
        smoothed = math.nan
        start, start_step = time.perf_counter(), self.step
        with progress_bar(status, disable=not show) as bar:
            task = bar.add_task("training", total=cfg.steps, completed=self.step, status="")
            self.model.train()
            while self.step < cfg.steps:
                gen = torch.Generator().manual_seed(
                    _mix(cfg.seed, self.step, self.accelerator.process_index, 1)
                )
                loss = diffusion_loss(self.model, self.schedule, self.batch(self.step), gen)
                self.optimizer.zero_grad(set_to_none=True)
                self.accelerator.backward(loss)
                if cfg.grad_clip > 0:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr_at(self.step)
                self.optimizer.step()
                self._update_ema()
                self.step += 1
                value = float(loss.detach())
                smoothed = value if math.isnan(smoothed) else 0.98 * smoothed + 0.02 * value
                rate = (self.step - start_step) / max(time.perf_counter() - start, 1e-9)
                bar.update(task, advance=1, status=f"loss {smoothed:8.2f} · {rate:5.2f} it/s")
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self.save()
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.sample_grid()
        elapsed = time.perf_counter() - start
        images = (self.step - start_step) * cfg.batch_size
        return {"step": self.step, "loss": smoothed, "images_per_s": images / max(elapsed, 1e-9)}

    def sample_grid(self, n: int = 16, steps: int = 50) -> Path | None:
        """A DDIM (eta = 0) grid from the EMA weights: ``OUT/samples/step-XXXXXXXX.png``."""
        if not self.accelerator.is_main_process:
            return None
        images = sample(
            self.ema,
            self.schedule,
            (n, *self.data.image_shape),
            steps=min(steps, self.schedule.T),
            eta=0.0,
            generator=torch.Generator().manual_seed(self.config.seed),
            progress=False,
            device=self.accelerator.device,
        )
        assert isinstance(images, Tensor)  # no trajectory asked for
        return save_image_grid(images, self.out / "samples" / f"step-{self.step:08d}.png")


def ema_from_checkpoint(path: str | Path) -> UNet:
    """The EMA model of a training checkpoint (or of a run folder's latest checkpoint) as a
    :class:`UNet` with its schedule, e.g. to export a run written before ``OUT/model``
    existed: ``ema_from_checkpoint("runs/old").save_pretrained("models/old")``."""
    tensors, state = load_checkpoint(path)
    if "ema" not in tensors:
        raise CheckpointError(f"checkpoint {path} lacks ema.safetensors")
    config = state["config"]
    info = {"image_shape": config.get("image_shape"), "step": state["step"],
            "train": config.get("train")}  # fmt: skip
    model = UNet(
        UNetConfig(**config["unet"]),
        schedule=NoiseSchedule.from_config(config["schedule"]),
        info=info,
    )
    load_state_dict_strict(model, tensors["ema"], f"EMA weights in {path}")
    return model.eval().requires_grad_(False)
