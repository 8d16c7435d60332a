"""One LST run, end to end: read -> encode -> build -> train -> evaluate, from one spec.

:class:`RunSpec` holds every option of a run (the backbone and data, the method, the side
network's options, the optimiser, the subset and the seeds); :func:`run` executes it and
returns a :class:`RunResult`. ``kexue lst train`` only parses arguments into a ``RunSpec`` and
shows progress; the memory probe (:mod:`kexue.lst.measure`) only measures around :func:`run`;
the tour and the benchmark build specs. So every caller reads, subsets, pads, seeds and trains
the same way (``docs/guides/lst.md``, "Training from the command line").

Randomness, for a given ``seed``: the training subset is drawn from ``subset_seed`` alone (the
same examples whatever the seed); the side network's or head's random weights and the order of
the Fisher pass come from a ``torch.Generator`` seeded with ``seed``; LoRA's initialisation
uses torch's global generator, which :func:`run` seeds with ``seed`` inside
``torch.random.fork_rng`` (the caller's global state is restored); the batches of epoch ``e``
and the dropout of step ``k`` come from generators keyed by ``(seed, e)`` and
``(seed, k, process)`` (:func:`kexue.lst.train_text_classifier`).

Many processes: under ``accelerate launch`` or ``torchrun`` every process calls :func:`run`
with the same spec; each trains on its share of every global batch, evaluates its share of
the evaluation batches, and returns the same :class:`RunResult` (``docs/guides/lst.md``,
"Many processes").
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import torch
from torch import nn

from kexue.lst.backbones import load_backbone
from kexue.lst.checkpoint import Checkpointing
from kexue.lst.classifier import METHODS, build_text_classifier
from kexue.lst.config import LSTConfig, dataclass_from_dict
from kexue.lst.data import Encoded, encode, read_tsv
from kexue.lst.model import LSTModel, trainable_parameters
from kexue.lst.parallel import MIXED_PRECISION, autocast_dtype, check_device, setup_processes
from kexue.lst.train import DEFAULT_LR, TrainSettings, TrainStats, accuracy, train_text_classifier
from kexue.validation import check_bool, check_choice, check_int, check_real, describe


@dataclass
class RunSpec:
    """Every option of one training run (JSON-able; ``RunSpec.from_dict(spec.to_dict())``).

    Data: ``backbone`` (a local Hugging Face folder with safetensors weights), ``train`` and
    ``eval`` (TSV files of ``label<TAB>text``), ``max_length`` (tokens per text),
    ``train_size`` (train on a subset of that many examples, drawn with ``subset_seed``;
    ``None`` = all), ``eval_batch_size``.

    Method: ``"lst"``, ``"full"`` or ``"lora"``. Side network (``"lst"``; see
    :class:`~kexue.lst.LSTConfig`): ``reduction_factor``, ``side_layers``,
    ``gate_temperature``, ``init``, ``fisher_samples``, ``merge_backbone_output``; ``pooling``
    and ``dropout`` apply to every method's head. ``cache_backbone`` / ``cache_dtype``: compute
    the backbone states once (``"lst"`` only).

    Optimiser: ``epochs``, ``batch_size``, ``lr`` (``None``: 3e-3 for lst, 1e-4 for full,
    5e-4 for lora), ``weight_decay``, ``warmup``; ``seed`` (weights, batch order, dropout).
    ``batch_size`` is the global batch: with ``W`` processes each computes about
    ``batch_size / W`` of its rows.

    Where: ``device`` (``"auto"``: this process's GPU under a launcher, else the first GPU,
    else the CPU; or ``"cpu"``, ``"cuda"``, ``"cuda:1"``); ``mixed_precision`` (``"no"``,
    ``"bf16"``, ``"fp16"``): the dtype of the backbone's forward under autocast, ``"lst"``
    only (fp16 on CUDA only; the side network stays float32).
    """

    backbone: str
    train: str
    eval: str
    method: str = "lst"
    # side network (LSTConfig fields; num_labels and task come from the data)
    reduction_factor: int = 8
    side_layers: list[int] | None = None
    gate_temperature: float = 0.1
    init: str = "fisher"
    fisher_samples: int = 1024
    merge_backbone_output: bool = False
    pooling: str = "mean"
    dropout: float = 0.1
    # optimiser
    epochs: int = 3
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float = 0.01
    warmup: float = 0.1
    seed: int = 0
    # data
    max_length: int = 128
    train_size: int | None = None
    subset_seed: int = 0
    eval_batch_size: int = 64
    cache_backbone: bool = False
    cache_dtype: str = "float32"
    # where
    device: str = "auto"
    mixed_precision: str = "no"

    def __post_init__(self) -> None:
        for name in ("backbone", "train", "eval"):
            value = getattr(self, name)
            if not isinstance(value, str | os.PathLike):
                raise TypeError(f"{name} must be a path, got {describe(value)}")
            setattr(self, name, os.fspath(value))
        self.method = check_choice(self.method, "method", METHODS)
        # LSTConfig checks the side network's fields, naming them
        self.side_layers = self.lst_config(num_labels=2).side_layers
        if self.lr is not None:
            self.lr = check_real(self.lr, "lr", low=0.0, low_open=True)
        self.train_settings()  # checks the optimiser's fields
        self.max_length = check_int(self.max_length, "max_length", low=2)
        if self.train_size is not None:
            self.train_size = check_int(self.train_size, "train_size", low=1)
        self.subset_seed = check_int(self.subset_seed, "subset_seed")
        self.eval_batch_size = check_int(self.eval_batch_size, "eval_batch_size", low=1)
        if self.cache_backbone and self.method != "lst":
            raise ValueError(f"cache_backbone needs method='lst', got method={self.method!r}")
        self.device = check_device(self.device)
        self.mixed_precision = check_choice(
            self.mixed_precision, "mixed_precision", MIXED_PRECISION
        )
        if self.mixed_precision != "no" and self.method != "lst":
            raise ValueError(
                f"mixed_precision={self.mixed_precision!r} applies to the frozen backbone of "
                f"method='lst', got method={self.method!r}"
            )

    def lst_config(self, num_labels: int) -> LSTConfig:
        """The side network's ``LSTConfig`` for a task of ``num_labels`` classes."""
        return LSTConfig(
            reduction_factor=self.reduction_factor,
            side_layers=self.side_layers,
            gate_temperature=self.gate_temperature,
            init=self.init,
            fisher_samples=self.fisher_samples,
            merge_backbone_output=self.merge_backbone_output,
            num_labels=num_labels,
            pooling=self.pooling,
            dropout=self.dropout,
        )

    def train_settings(self) -> TrainSettings:
        """The optimiser settings, with the method's default learning rate if ``lr`` is None."""
        return TrainSettings(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=DEFAULT_LR[self.method] if self.lr is None else self.lr,
            weight_decay=self.weight_decay,
            warmup=self.warmup,
            seed=self.seed,
            cache_backbone=self.cache_backbone,
            cache_dtype=self.cache_dtype,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        """Build from a mapping; unknown keys raise ``ValueError`` naming them."""
        return dataclass_from_dict(cls, data)


@dataclass
class RunInputs:
    """What a run reads before it builds anything: the backbone, its tokenizer, the encoded
    training subset and evaluation set, the number of classes and the padding id."""

    backbone: nn.Module
    tokenizer: Any
    train_set: Encoded
    eval_set: Encoded
    num_labels: int
    pad_id: int


def load_inputs(spec: RunSpec) -> RunInputs:
    """Load the backbone and tokenizer, read both TSV files, draw the training subset
    (``subset_seed``) and tokenise. ``ValueError`` naming the file for unusable data
    (fewer than two classes, evaluation labels the training file never uses)."""
    if not isinstance(spec, RunSpec):
        raise TypeError(f"spec must be a RunSpec, got {describe(spec)}")
    backbone, tokenizer = load_backbone(spec.backbone)
    texts, labels = read_tsv(spec.train)
    num_labels = max(labels) + 1
    if num_labels < 2:
        raise ValueError(f"{spec.train}: needs at least two classes (labels 0 and 1)")
    if spec.train_size is not None and spec.train_size < len(texts):
        pick = torch.Generator().manual_seed(spec.subset_seed)
        keep = torch.randperm(len(texts), generator=pick)[: spec.train_size].tolist()
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    eval_texts, eval_labels = read_tsv(spec.eval)
    if max(eval_labels) >= num_labels:
        raise ValueError(
            f"{spec.eval}: label {max(eval_labels)} never occurs in {spec.train} "
            f"(labels 0..{num_labels - 1})"
        )
    return RunInputs(
        backbone=backbone,
        tokenizer=tokenizer,
        train_set=encode(tokenizer, texts, labels, spec.max_length),
        eval_set=encode(tokenizer, eval_texts, eval_labels, spec.max_length),
        num_labels=num_labels,
        pad_id=tokenizer.pad_token_id or 0,
    )


@dataclass
class RunResult:
    """What :func:`run` returns: the trained model, its accuracy, sizes, timings, gates."""

    spec: RunSpec
    accuracy: float
    num_labels: int
    train_examples: int
    eval_examples: int
    mean_train_tokens: float
    trainable_parameters: int
    all_parameters: int
    lr: float
    build_seconds: float
    build_cpu_seconds: float
    eval_seconds: float
    seconds: float
    stats: TrainStats
    device: str = "cpu"
    lst_config: LSTConfig | None = None
    gates: dict[str, list[float]] | None = None
    measurements: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able numbers (``metrics.json`` of ``kexue lst train``); not the model."""
        out = {
            "method": self.spec.method,
            "eval_accuracy": self.accuracy,
            "num_labels": self.num_labels,
            "train_examples": self.train_examples,
            "eval_examples": self.eval_examples,
            "mean_train_tokens": self.mean_train_tokens,
            "trainable_parameters": self.trainable_parameters,
            "all_parameters": self.all_parameters,
            "lr": self.lr,
            "build_seconds": self.build_seconds,
            "build_cpu_seconds": self.build_cpu_seconds,
            "eval_seconds": self.eval_seconds,
            "seconds": self.seconds,
            "device": self.device,
            **self.stats.summary(),
            **self.measurements,
            "spec": self.spec.to_dict(),
        }
        if self.lst_config is not None:
            out["lst_config"] = self.lst_config.to_dict()
        if self.gates is not None:
            out["gates"] = self.gates
        return out


def run(
    spec: RunSpec,
    *,
    inputs: RunInputs | None = None,
    progress: bool = True,
    after_training: Callable[[], Mapping[str, Any]] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    keep_checkpoints: int = 2,
) -> RunResult:
    """Train and evaluate as ``spec`` says.

    Args:
        spec: the run.
        inputs: what :func:`load_inputs` returned for ``spec`` (loaded by ``run`` when
            ``None``). A run changes its backbone (full fine-tuning trains it, LoRA wraps it,
            LST freezes it): load fresh inputs for each run.
        progress: show progress bars (Fisher pass, caching, training, evaluation; on the main
            process only).
        after_training: called once between the last training step and the evaluation;
            what it returns is stored in ``RunResult.measurements`` (the memory probe reads
            the peak resident memory of training there).
        checkpoint_dir: folder of the training checkpoints (``checkpoint_dir/checkpoints``,
            :class:`~kexue.lst.Checkpointing`); required by ``checkpoint_every`` and
            ``resume``.
        checkpoint_every: write a checkpoint every that many steps and after the last (0:
            none).
        resume: continue from the latest checkpoint in ``checkpoint_dir`` (if any; the
            Fisher pass is then skipped, the weights come from the checkpoint). The result
            is bit-identical to the uninterrupted run. Without ``resume`` a folder that
            already holds checkpoints is refused.
        keep_checkpoints: how many of the newest checkpoints to keep.

    Returns:
        The :class:`RunResult`, with the trained model in ``.model`` (eval mode, on the run's
        device).
    """
    if not isinstance(spec, RunSpec):
        raise TypeError(f"spec must be a RunSpec, got {describe(spec)}")
    checkpoint_every = check_int(checkpoint_every, "checkpoint_every", low=0)
    resume = check_bool(resume, "resume")
    checkpointing = None
    if checkpoint_dir is not None:
        checkpointing = Checkpointing(
            checkpoint_dir,
            every=checkpoint_every,
            resume=resume,
            keep=keep_checkpoints,
            identity=spec.to_dict(),
        )
    elif checkpoint_every or resume:
        raise ValueError("checkpoint_every and resume need a checkpoint_dir")
    t_start = time.perf_counter()
    device = setup_processes(spec.device)
    amp = autocast_dtype(spec.mixed_precision, device)
    resume_from = checkpointing.check_start() if checkpointing is not None else None
    inputs = load_inputs(spec) if inputs is None else inputs
    settings = spec.train_settings()
    config = spec.lst_config(inputs.num_labels) if spec.method == "lst" else None
    # resuming: the checkpoint overwrites every trained weight, so skip the Fisher pass
    build_config = config
    if resume_from is not None and config is not None and config.init != "random":
        build_config = replace(config, init="random")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        gen = torch.Generator().manual_seed(spec.seed)
        t0, c0 = time.perf_counter(), time.process_time()
        model = build_text_classifier(
            spec.method,
            inputs.backbone,
            inputs.num_labels,
            lst_config=build_config,
            pooling=spec.pooling,
            dropout=spec.dropout,
            init_data=inputs.train_set.batches(
                spec.batch_size, generator=gen, pad_id=inputs.pad_id
            ),
            generator=gen,
            progress=progress,
        )
        if isinstance(model, LSTModel):
            # the run's config (its init), also after a resume; set for method="lst"
            model.config = cast(LSTConfig, config)
            model.backbone_autocast = amp
        model.to(device)
        build_seconds, build_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        stats = train_text_classifier(
            model,
            inputs.train_set,
            settings,
            pad_id=inputs.pad_id,
            progress=progress,
            checkpointing=checkpointing,
        )
        measurements = dict(after_training()) if after_training is not None else {}
        t1 = time.perf_counter()
        acc = accuracy(
            model, inputs.eval_set, spec.eval_batch_size, inputs.pad_id, progress=progress
        )
        eval_seconds = time.perf_counter() - t1
    trainable, total = trainable_parameters(model)
    gates = getattr(model, "gate_values", None)
    return RunResult(
        spec=spec,
        accuracy=acc,
        num_labels=inputs.num_labels,
        train_examples=len(inputs.train_set),
        eval_examples=len(inputs.eval_set),
        mean_train_tokens=sum(len(x) for x in inputs.train_set.ids) / len(inputs.train_set),
        trainable_parameters=trainable,
        all_parameters=total,
        lr=settings.lr,
        build_seconds=build_seconds,
        build_cpu_seconds=build_cpu_seconds,
        eval_seconds=eval_seconds,
        seconds=time.perf_counter() - t_start,
        stats=stats,
        device=str(device),
        lst_config=config,
        gates={k: v.tolist() for k, v in gates().items()} if gates is not None else None,
        measurements=measurements,
        model=model,
    )
