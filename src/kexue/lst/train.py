"""Training and evaluating a text classifier of any method (LST, full, LoRA) the same way.

Shared by ``kexue lst train``, the benchmark and the tour through :func:`kexue.lst.run`, so the
three methods see the same batches, optimiser (AdamW) and schedule (linear warm-up then linear
decay); only what trains differs (``docs/guides/lst.md``, "Training").
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.progress import TextColumn
from torch import Tensor, nn

from kexue.distributed import all_reduce_sum, derive_seed, keyed_generator, rank, world_size
from kexue.lst.checkpoint import Checkpointing
from kexue.lst.data import Encoded
from kexue.lst.model import BackboneCache, LSTModel
from kexue.lst.parallel import sum_gradients, sync_parameters
from kexue.progress import progress_bar
from kexue.validation import check_bool, check_choice, check_int, check_real, describe

DEFAULT_LR = {"lst": 3e-3, "full": 1e-4, "lora": 5e-4}
CACHE_DTYPES = ("float32", "float16", "bfloat16")
# keys of the random streams (with the seed): data order per epoch, dropout per step
DATA_KEY, DROPOUT_KEY = 0x0DA7A, 0xD50F


@dataclass
class TrainSettings:
    """Optimiser and schedule of :func:`train_text_classifier` (validated)."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of the steps
    seed: int = 0
    cache_backbone: bool = False
    cache_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.epochs = check_int(self.epochs, "epochs", low=1)
        self.batch_size = check_int(self.batch_size, "batch_size", low=1)
        self.lr = check_real(self.lr, "lr", low=0.0, low_open=True)
        self.weight_decay = check_real(self.weight_decay, "weight_decay", low=0.0)
        self.warmup = check_real(self.warmup, "warmup", low=0.0, high=1.0)
        self.seed = check_int(self.seed, "seed")
        self.cache_backbone = check_bool(self.cache_backbone, "cache_backbone")
        self.cache_dtype = check_choice(self.cache_dtype, "cache_dtype", CACHE_DTYPES)


@dataclass
class TrainStats:
    """Timings and losses of one training run (seconds unless named otherwise)."""

    steps: int = 0
    processes: int = 1
    resumed_from_step: int | None = None
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_cpu_seconds: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    step_cpu_seconds: list[float] = field(default_factory=list)  # process CPU time, all threads
    cache_seconds: float = 0.0
    cache_cpu_seconds: float = 0.0
    cache_bytes: int = 0
    losses: list[float] = field(default_factory=list)

    @property
    def median_step_ms(self) -> float:
        return 1e3 * statistics.median(self.step_seconds) if self.step_seconds else math.nan

    @property
    def median_step_cpu_ms(self) -> float:
        return 1e3 * statistics.median(self.step_cpu_seconds) if self.step_cpu_seconds else math.nan

    @property
    def total_seconds(self) -> float:
        return self.cache_seconds + sum(self.epoch_seconds)

    def summary(self) -> dict:
        """Everything but the per-step times, plus medians, totals and the final loss (the
        mean of the last 20 steps)."""
        d = asdict(self)
        d.pop("step_seconds")
        d.pop("step_cpu_seconds")
        d["median_step_ms"] = self.median_step_ms
        d["median_step_cpu_ms"] = self.median_step_cpu_ms
        d["total_seconds"] = self.total_seconds
        d["final_loss"] = statistics.fmean(self.losses[-20:]) if self.losses else math.nan
        return d


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _check_data(model: object, data: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {describe(model)}")
    if not isinstance(data, Encoded):
        raise TypeError(f"data must be a kexue.lst.Encoded, got {describe(data)}")
    if len(data) == 0:
        raise ValueError("data must hold at least one example")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _rng_devices(device: torch.device) -> list[int]:
    # the generators torch.random.fork_rng saves and restores besides the CPU's
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def epoch_batches(data: Encoded, settings: TrainSettings, epoch: int) -> list[list[int]]:
    """The global batches of ``epoch`` (indices into ``data``), in training order: drawn from
    a generator keyed by ``(settings.seed, epoch)``, so they depend on neither the number of
    processes nor on what ran before (``docs/guides/lst.md``, "Training")."""
    gen = keyed_generator(settings.seed, DATA_KEY, epoch)
    return data.grouped_batches(settings.batch_size, gen)


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _shard_loss(
    model: nn.Module,
    data: Encoded,
    rows: list[int],
    pad_id: int,
    cache: BackboneCache | None,
    device: torch.device,
) -> Tensor:
    """The model's mean loss over ``rows`` (one process's share of a global batch)."""
    if cache is not None:
        states, mask = cache.batch(rows)
        labels = data.labels[rows].to(device)
        return model(attention_mask=mask, backbone_states=states, labels=labels).loss
    return model(**_to(data.batch(rows, pad_id), device)).loss


def train_text_classifier(
    model: nn.Module,
    data: Encoded,
    settings: TrainSettings,
    *,
    pad_id: int = 0,
    progress: bool = True,
    checkpointing: Checkpointing | None = None,
) -> TrainStats:
    """Train ``model`` (LST, full or LoRA) on ``data``; returns timings and losses.

    AdamW (weight decay on matrices only) with linear warm-up over ``settings.warmup`` of the
    steps, then linear decay to 0, over ``settings.epochs`` of shuffled batches of similar
    lengths (:func:`epoch_batches`). With ``settings.cache_backbone`` (LST only), the backbone
    states of ``data`` are computed once (``BackboneCache``) and every step runs only the side
    network. ``progress`` shows the steps with the current loss. The model is left in eval
    mode, on its device.

    Randomness: the batches of epoch ``e`` come from a generator keyed by ``(seed, e)``, the
    dropout of step ``k`` from torch's generator seeded by ``(seed, k, process)`` (the
    caller's generator state is restored after each step); nothing random is carried from one
    step to the next, so ``checkpointing`` can resume bit for bit.

    Many processes (``accelerate launch``, ``torchrun``; :mod:`kexue.lst.parallel`): each
    process takes its rows ``B[r::W]`` of every global batch ``B`` and the gradients are
    summed with weights ``n_r / n``, so the run equals the one-process run on the same global
    batches up to float rounding (dropout masks aside: each process draws its own). What
    trains is first copied from process 0 to all.
    """
    _check_data(model, data)
    if not isinstance(settings, TrainSettings):
        raise TypeError(f"settings must be a TrainSettings, got {describe(settings)}")
    if checkpointing is not None and not isinstance(checkpointing, Checkpointing):
        raise TypeError(f"checkpointing must be a Checkpointing, got {describe(checkpointing)}")
    device, world, me = _device(model), world_size(), rank()
    stats = TrainStats(processes=world)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay},
    ]
    opt = torch.optim.AdamW(
        groups,
        lr=settings.lr,
        weight_decay=0.0,
    )
    per_epoch = math.ceil(len(data) / settings.batch_size)
    total = per_epoch * settings.epochs
    warmup = max(1, int(settings.warmup * total))
    start = 0
    resume_from = checkpointing.check_start() if checkpointing is not None else None
    if resume_from is not None:
        assert checkpointing is not None  # resume_from comes from it
        resumed = checkpointing.restore(resume_from, model, opt)
        start, stats.losses, stats.resumed_from_step = resumed.step, resumed.losses, resumed.step
    sync_parameters(params)
    cache = None
    if settings.cache_backbone:
        if not isinstance(model, LSTModel):
            raise ValueError("cache_backbone needs an LSTModel (method 'lst')")
        t0, c0 = time.perf_counter(), time.process_time()
        cache = BackboneCache(
            model,
            [_to(b, device) for b in data.batches(2 * settings.batch_size, pad_id=pad_id)],
            dtype=getattr(torch, settings.cache_dtype),
            progress=progress,
        )
        stats.cache_seconds = time.perf_counter() - t0
        stats.cache_cpu_seconds = time.process_time() - c0
        stats.cache_bytes = cache.nbytes()
    stats.steps = start
    model.train()
    loss_column = TextColumn("loss {task.fields[loss]:.4f}")
    with progress_bar(loss_column, disable=not progress) as bar:
        task = bar.add_task("training", total=total, completed=start, loss=math.nan)
        for epoch in range(start // per_epoch, settings.epochs):
            bar.update(task, description=f"training: epoch {epoch + 1}/{settings.epochs}")
            t_epoch, c_epoch = time.perf_counter(), time.process_time()
            batches = epoch_batches(data, settings, epoch)
            first = start - epoch * per_epoch if epoch == start // per_epoch else 0
            for within in range(first, per_epoch):
                step = epoch * per_epoch + within
                t0, c0 = time.perf_counter(), time.process_time()
                idx = batches[within]
                rows = idx[me::world]
                for group in opt.param_groups:
                    group["lr"] = settings.lr * _schedule(step, total, warmup)
                opt.zero_grad(set_to_none=True)
                with torch.random.fork_rng(devices=_rng_devices(device)):
                    torch.manual_seed(derive_seed(settings.seed, DROPOUT_KEY, step, me))
                    if rows:
                        loss = _shard_loss(model, data, rows, pad_id, cache, device)
                        if world > 1:
                            loss = loss * (len(rows) / len(idx))
                        loss.backward()
                    else:  # more processes than rows: nothing to add
                        loss = torch.zeros((), device=device)
                loss = sum_gradients(params, loss)
                opt.step()
                # .item() waits for the device's queue (opt.step included): the clock reads
                # the step's real time on a GPU too
                stats.losses.append(loss.item())
                stats.step_seconds.append(time.perf_counter() - t0)
                stats.step_cpu_seconds.append(time.process_time() - c0)
                stats.steps = step + 1
                bar.update(task, advance=1, loss=stats.losses[-1])
                if checkpointing is not None and checkpointing.due(step + 1, total):
                    checkpointing.save(step + 1, model, opt, stats.losses)
            stats.epoch_seconds.append(time.perf_counter() - t_epoch)
            stats.epoch_cpu_seconds.append(time.process_time() - c_epoch)
    model.eval()
    return stats


@torch.no_grad()
def predict(
    model: nn.Module,
    data: Encoded,
    batch_size: int = 64,
    pad_id: int = 0,
    *,
    progress: bool = True,
) -> Tensor:
    """Logits of every example, in order (model in eval mode; batched by length).

    With many processes, the batches are dealt out to the processes and the logits gathered,
    so every process returns the logits one process computes, bit for bit (the same batches).
    """
    _check_data(model, data)
    batch_size = check_int(batch_size, "batch_size", low=1)
    model.eval()
    device, world = _device(model), world_size()
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    mine = batches[rank() :: world]
    parts = []
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("evaluating", total=sum(len(b) for b in mine))
        for rows in mine:
            parts.append(model(**_to(data.batch(rows, pad_id), device)).logits)
            bar.advance(task, len(rows))
    if world == 1:
        out = torch.cat(parts)
        logits = torch.empty_like(out)
        logits[torch.tensor(order, device=device)] = out
        return logits
    # each process fills its rows of a zero tensor; the sum over processes is exact
    width = _num_outputs(model)
    logits = torch.zeros(len(data), width, device=device)
    for rows, part in zip(mine, parts, strict=True):
        logits[torch.tensor(rows, device=device)] = part.float()
    return all_reduce_sum(logits)


def _num_outputs(model: nn.Module) -> int:
    if isinstance(model, LSTModel):
        return model.config.num_labels
    count = getattr(model, "num_labels", None)
    if not isinstance(count, int):
        raise TypeError(f"cannot tell the number of logits of {describe(model)} (no num_labels)")
    return count


def accuracy(
    model: nn.Module,
    data: Encoded,
    batch_size: int = 64,
    pad_id: int = 0,
    *,
    progress: bool = True,
) -> float:
    """Fraction of ``data`` whose arg-max logit is its label."""
    logits = predict(model, data, batch_size, pad_id, progress=progress)
    return float((logits.argmax(-1) == data.labels).float().mean())
