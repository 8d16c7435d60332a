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

import torch
from rich.progress import TextColumn
from torch import Tensor, nn

from kexue.lst.data import Encoded
from kexue.lst.model import BackboneCache, LSTModel
from kexue.progress import progress_bar
from kexue.validation import check_bool, check_choice, check_int, check_real, describe

DEFAULT_LR = {"lst": 3e-3, "full": 1e-4, "lora": 5e-4}
CACHE_DTYPES = ("float32", "float16", "bfloat16")


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


def train_text_classifier(
    model: nn.Module,
    data: Encoded,
    settings: TrainSettings,
    *,
    pad_id: int = 0,
    progress: bool = True,
) -> TrainStats:
    """Train ``model`` (LST, full or LoRA) on ``data``; returns timings and losses.

    AdamW (weight decay on matrices only) with linear warm-up over ``settings.warmup`` of the
    steps, then linear decay to 0, over ``settings.epochs`` of shuffled batches of similar
    lengths (``Encoded.grouped_batches``, drawn from a generator seeded with
    ``settings.seed``). With ``settings.cache_backbone`` (LST only), the backbone states of
    ``data`` are computed once (``BackboneCache``) and every step runs only the side network.
    ``progress`` shows the steps with the current loss. The model is left in eval mode.
    """
    _check_data(model, data)
    if not isinstance(settings, TrainSettings):
        raise TypeError(f"settings must be a TrainSettings, got {describe(settings)}")
    stats = TrainStats()
    gen = torch.Generator().manual_seed(settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay}],
        lr=settings.lr,
        weight_decay=0.0,
    )
    per_epoch = math.ceil(len(data) / settings.batch_size)
    total = per_epoch * settings.epochs
    warmup = max(1, int(settings.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, warmup))
    cache = None
    if settings.cache_backbone:
        if not isinstance(model, LSTModel):
            raise ValueError("cache_backbone needs an LSTModel (method 'lst')")
        t0, c0 = time.perf_counter(), time.process_time()
        cache = BackboneCache(
            model,
            list(data.batches(2 * settings.batch_size, pad_id=pad_id)),
            dtype=getattr(torch, settings.cache_dtype),
            progress=progress,
        )
        stats.cache_seconds = time.perf_counter() - t0
        stats.cache_cpu_seconds = time.process_time() - c0
        stats.cache_bytes = cache.nbytes()
    model.train()
    loss_column = TextColumn("loss {task.fields[loss]:.4f}")
    with progress_bar(loss_column, disable=not progress) as bar:
        task = bar.add_task("training", total=total, loss=math.nan)
        for epoch in range(settings.epochs):
            bar.update(task, description=f"training: epoch {epoch + 1}/{settings.epochs}")
            t_epoch, c_epoch = time.perf_counter(), time.process_time()
            for idx in data.grouped_batches(settings.batch_size, gen):
                t0, c0 = time.perf_counter(), time.process_time()
                if cache is not None:
                    states, mask = cache.batch(idx)
                    labels = data.labels[idx]
                    out = model(attention_mask=mask, backbone_states=states, labels=labels)
                else:
                    out = model(**data.batch(idx, pad_id))
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
                sched.step()
                stats.step_seconds.append(time.perf_counter() - t0)
                stats.step_cpu_seconds.append(time.process_time() - c0)
                stats.losses.append(out.loss.item())
                stats.steps += 1
                bar.update(task, advance=1, loss=stats.losses[-1])
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
    """Logits of every example, in order (model in eval mode; batched by length)."""
    _check_data(model, data)
    batch_size = check_int(batch_size, "batch_size", low=1)
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    parts = []
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("evaluating", total=len(order))
        for k in range(0, len(order), batch_size):
            parts.append(model(**data.batch(order[k : k + batch_size], pad_id)).logits)
            bar.advance(task, len(parts[-1]))
    out = torch.cat(parts)
    logits = torch.empty_like(out)
    logits[torch.tensor(order)] = out
    return logits


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
