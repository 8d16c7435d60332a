"""Training text classifiers three ways on one frozen-or-not backbone: LST, full, LoRA.

Shared by ``kexue lst train``, ``benchmarks/lst.py`` and the tour, so the three methods see the
same data, batches, pooling, head, optimiser (AdamW) and schedule (linear warm-up then linear
decay). Only what trains differs:

- ``"full"``: every backbone weight and the head.
- ``"lora"``: LoRA matrices (peft) on the attention query and value, and the head.
- ``"lst"``: the side network (``kexue.lst.get_lst_model``); the backbone runs under no_grad.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import SequenceClassifierOutput

from kexue.io import atomic_write, write_json_atomic
from kexue.lst.config import LSTConfig
from kexue.lst.data import Encoded
from kexue.lst.model import BackboneCache, LSTModel, get_lst_model
from kexue.lst.side import pool

METHODS = ("lst", "full", "lora")
DEFAULT_LR = {"lst": 3e-3, "full": 1e-4, "lora": 5e-4}


def load_backbone(path: str | Path):
    """``(model, tokenizer)`` from a local folder: safetensors only (no pickle), no download."""
    from transformers import AutoModel, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{path} has no .safetensors weights (pickled weights are not loaded)")
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


class PooledClassifier(nn.Module):
    """Backbone (trainable or with LoRA) + the same pooling and linear head as LST uses."""

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str = "mean") -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.drop = nn.Dropout(0.1)
        width = backbone.config.hidden_size
        self.head = nn.Linear(width, num_labels)
        std = getattr(backbone.config, "initializer_range", None) or 0.02
        nn.init.normal_(self.head.weight, 0.0, std)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, labels=None, **_):
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.head(self.drop(pool(h, attention_mask, self.pooling)))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


LORA_SETTINGS = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.1,
    "target_modules": ["query", "value"],
}


def build_model(
    method: str,
    backbone: nn.Module,
    num_labels: int,
    *,
    lst_config: LSTConfig | None = None,
    init_data=None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """The classifier of ``method`` around ``backbone`` (which LST and LoRA freeze)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "lst":
        config = lst_config or LSTConfig(num_labels=num_labels)
        return get_lst_model(backbone, config, init_data=init_data, generator=generator)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        backbone = get_peft_model(backbone, LoraConfig(**LORA_SETTINGS))
    model = PooledClassifier(backbone, num_labels)
    if generator is not None:
        with torch.no_grad():
            model.head.weight.normal_(0.0, 0.02, generator=generator)
    return model


@dataclass
class TrainSettings:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of the steps
    seed: int = 0
    cache_backbone: bool = False
    cache_dtype: str = "float32"


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


def train_classifier(
    model: nn.Module,
    data: Encoded,
    settings: TrainSettings,
    *,
    pad_id: int = 0,
    on_step: Callable[[int, float], object] | None = None,
    on_epoch: Callable[[int], object] | None = None,
) -> TrainStats:
    """AdamW with linear warm-up/decay over ``settings.epochs`` of shuffled batches of
    similar lengths (``Encoded.grouped_batches``).

    With ``settings.cache_backbone`` (LST only), the backbone states of ``data`` are computed
    once (``BackboneCache``) and every step runs only the side network.
    """
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
            data.batches(2 * settings.batch_size, pad_id=pad_id),
            dtype=getattr(torch, settings.cache_dtype),
        )
        stats.cache_seconds = time.perf_counter() - t0
        stats.cache_cpu_seconds = time.process_time() - c0
        stats.cache_bytes = cache.nbytes()
    model.train()
    for epoch in range(settings.epochs):
        t_epoch, c_epoch = time.perf_counter(), time.process_time()
        for idx in data.grouped_batches(settings.batch_size, gen):
            t0, c0 = time.perf_counter(), time.process_time()
            if cache is not None:
                states, mask = cache.batch(idx)
                out = model(attention_mask=mask, backbone_states=states, labels=data.labels[idx])
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
            if on_step is not None:
                on_step(stats.steps, stats.losses[-1])
        stats.epoch_seconds.append(time.perf_counter() - t_epoch)
        stats.epoch_cpu_seconds.append(time.process_time() - c_epoch)
        if on_epoch is not None:
            on_epoch(epoch)
    model.eval()
    return stats


@torch.no_grad()
def predict(model: nn.Module, data: Encoded, batch_size: int = 64, pad_id: int = 0) -> Tensor:
    """Logits of every example, in order (model in eval mode; batched by length)."""
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    out = torch.cat(
        [
            model(**data.batch(order[k : k + batch_size], pad_id)).logits
            for k in range(0, len(order), batch_size)
        ]
    )
    logits = torch.empty_like(out)
    logits[torch.tensor(order)] = out
    return logits


def accuracy(model: nn.Module, data: Encoded, batch_size: int = 64, pad_id: int = 0) -> float:
    logits = predict(model, data, batch_size, pad_id)
    return float((logits.argmax(-1) == data.labels).float().mean())


def save_classifier(model: nn.Module, method: str, folder: str | Path, meta: dict) -> list[Path]:
    """Write the trained parts with safetensors + JSON, each file atomically.

    LST: ``LSTModel.save_pretrained`` (side network only). Full: every weight. LoRA: the LoRA
    matrices and the head. ``classifier.json`` records the method and ``meta``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if isinstance(model, LSTModel):
        model.save_pretrained(folder)
        written += [folder / "lst_model.safetensors", folder / "lst_config.json"]
    else:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {
            k: v.detach().contiguous()
            for k, v in model.state_dict().items()
            if method == "full" or k in trainable
        }
        path = folder / "classifier.safetensors"
        atomic_write(path, lambda p: save_file(state, p, {"format": "pt"}))
        written.append(path)
    info = {"method": method, **meta}
    if method == "lora":
        info["lora"] = LORA_SETTINGS
    path = folder / "classifier.json"
    write_json_atomic(path, info)
    written.append(path)
    return written


def load_classifier(folder: str | Path, backbone: nn.Module) -> nn.Module:
    """Rebuild what ``save_classifier`` wrote (JSON + safetensors only; no pickle)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    info = json.loads((folder / "classifier.json").read_text())
    method = info["method"]
    if method == "lst":
        return LSTModel.from_pretrained(backbone, folder)
    model = build_model(method, backbone, int(info["num_labels"]))
    state = load_file(str(folder / "classifier.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or (method == "full" and missing):
        raise ValueError(f"{folder}: checkpoint does not match (missing {missing[:3]}...)")
    return model.eval()
