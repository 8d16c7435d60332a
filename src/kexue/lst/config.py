"""``LSTConfig``: the options of a Ladder Side-Tuning network, validated, with a JSON form.

Notation of ``docs/guides/lst.md``: backbone width ``d``, side width ``w = d / r``
(``r = reduction_factor``), gates ``mu_j = sigmoid(alpha_j / T)`` with ``T = gate_temperature``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

from kexue.validation import check_bool, check_choice, check_int, check_real, describe

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

INITS = ("fisher", "magnitude", "random")
TASKS = ("sequence-classification", "token-classification", "seq2seq-lm")
POOLINGS = ("mean", "first")


@dataclass
class LSTConfig:
    """Options of the side network (PEFT-style: a plain dataclass that round-trips JSON).

    Args:
        reduction_factor: ``r``; the side network is ``d / r`` wide (the FFN ``d_ff / r``,
            each attention head ``d_head / r``: the head count is kept).
        side_layers: backbone layer indices that get a side block (layer dropping), in
            increasing order; ``None`` = every layer.
        gate_temperature: ``T`` of the ladder gates ``mu_j = sigmoid(alpha_j / T)``.
        init: ``"fisher"`` (structural pruning by diagonal Fisher information; needs
            ``init_data``), ``"magnitude"`` (by ``|w|``) or ``"random"``.
        fisher_samples: number of training examples of the Fisher pass.
        merge_backbone_output: add the backbone's last hidden state to the up-projected side
            output before the task head (the paper's variant).
        task: ``"sequence-classification"``, ``"token-classification"`` or ``"seq2seq-lm"``
            (T5 only: the side decoder cross-attends to the side encoder and feeds the frozen
            LM head).
        num_labels: classes of the task head; 1 means regression (mean squared error), as in
            transformers. Ignored for ``"seq2seq-lm"``.
        pooling: how ``"sequence-classification"`` pools tokens: ``"mean"`` over the attention
            mask or the ``"first"`` token.
        dropout: dropout probability inside the side network and before the head.

    Raises:
        ValueError: naming the field, for any value outside its domain.
        TypeError: naming the field, for a value of the wrong type.

    See ``docs/guides/lst.md`` for what each option changes.
    """

    reduction_factor: int = 8
    side_layers: list[int] | None = None
    gate_temperature: float = 0.1
    init: str = "fisher"
    fisher_samples: int = 1024
    merge_backbone_output: bool = False
    task: str = "sequence-classification"
    num_labels: int = 2
    pooling: str = "mean"
    dropout: float = 0.1

    def __post_init__(self) -> None:
        self.reduction_factor = check_int(self.reduction_factor, "reduction_factor", low=1)
        self.side_layers = check_side_layers(self.side_layers)
        self.gate_temperature = check_real(
            self.gate_temperature, "gate_temperature", low=0.0, low_open=True
        )
        self.init = check_choice(self.init, "init", INITS)
        self.fisher_samples = check_int(self.fisher_samples, "fisher_samples", low=1)
        self.merge_backbone_output = check_bool(self.merge_backbone_output, "merge_backbone_output")
        self.task = check_choice(self.task, "task", TASKS)
        self.num_labels = check_int(self.num_labels, "num_labels", low=1)
        self.pooling = check_choice(self.pooling, "pooling", POOLINGS)
        self.dropout = check_real(self.dropout, "dropout", low=0.0, high=1.0, high_open=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LSTConfig:
        """Build from a dict; unknown keys raise ``ValueError`` naming them."""
        return dataclass_from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LSTConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_pretrained(cls, pretrained_directory: str | os.PathLike) -> LSTConfig:
        """The config of a side network saved by ``LSTModel.save_pretrained`` (as PEFT's
        ``PeftConfig.from_pretrained``): read from its ``config.json``, no tensors loaded."""
        from kexue.lst.model import load_lst_folder  # the model module imports this one

        return cls.from_dict(load_lst_folder(pretrained_directory)[0]["lst_config"])


D = TypeVar("D", bound="DataclassInstance")


def dataclass_from_dict(cls: type[D], data: object) -> D:
    """``cls(**data)`` for a dataclass ``cls``: ``TypeError`` unless ``data`` is a mapping,
    ``ValueError`` naming the keys that are not fields of ``cls``."""
    if not isinstance(data, Mapping):
        raise TypeError(f"data must be a mapping, got {describe(data)}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return cls(**data)


def check_side_layers(side_layers: object) -> list[int] | None:
    """``None`` or a non-empty, strictly increasing list of layer indices >= 0."""
    if side_layers is None:
        return None
    if isinstance(side_layers, str | bytes) or not hasattr(side_layers, "__iter__"):
        raise TypeError(
            f"side_layers must be None or a list of layer indices, got {describe(side_layers)}"
        )
    layers = [check_int(i, "side_layers entries", low=0) for i in side_layers]
    if not layers:
        raise ValueError("side_layers must not be empty (use None for every layer)")
    if layers != sorted(set(layers)):
        raise ValueError(f"side_layers must be strictly increasing layer indices, got {layers}")
    return layers
