"""``LSTConfig``: the options of a Ladder Side-Tuning network, validated, with a JSON form.

Notation of ``../shared/reference/ladder-side-tuning.md``: backbone width ``d``, side width
``d / r`` (``r = reduction_factor``), gates ``mu_i = sigmoid(alpha_i / T)`` with
``T = gate_temperature``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

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
        gate_temperature: ``T`` of the ladder gates ``mu_i = sigmoid(alpha_i / T)``.
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
        _check_int(self.reduction_factor, "reduction_factor", low=1)
        if self.side_layers is not None:
            if isinstance(self.side_layers, str | bytes) or not hasattr(
                self.side_layers, "__iter__"
            ):
                raise TypeError(
                    f"side_layers must be None or a list of layer indices, got {self.side_layers!r}"
                )
            layers = list(self.side_layers)
            for i in layers:
                _check_int(i, "side_layers entries", low=0)
            if not layers:
                raise ValueError("side_layers must not be empty (use None for every layer)")
            if layers != sorted(set(layers)):
                raise ValueError(
                    f"side_layers must be strictly increasing layer indices, got {layers}"
                )
            self.side_layers = layers
        _check_real(self.gate_temperature, "gate_temperature")
        if not self.gate_temperature > 0:
            raise ValueError(f"gate_temperature must be > 0, got {self.gate_temperature!r}")
        _check_choice(self.init, "init", INITS)
        _check_int(self.fisher_samples, "fisher_samples", low=1)
        if not isinstance(self.merge_backbone_output, bool):
            raise TypeError(
                f"merge_backbone_output must be a bool, got {self.merge_backbone_output!r}"
            )
        _check_choice(self.task, "task", TASKS)
        _check_int(self.num_labels, "num_labels", low=1)
        _check_choice(self.pooling, "pooling", POOLINGS)
        _check_real(self.dropout, "dropout")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LSTConfig:
        """Build from a dict; unknown keys raise ``ValueError`` naming them."""
        if not isinstance(data, dict):
            raise TypeError(f"data must be a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LSTConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LSTConfig:
        return cls.from_dict(json.loads(text))

    def to_json_file(self, path: str | Path) -> None:
        from kexue.io import atomic_write

        text = self.to_json() + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def from_json_file(cls, path: str | Path) -> LSTConfig:
        return cls.from_json(Path(path).read_text())


def _check_int(value: object, name: str, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_real(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
