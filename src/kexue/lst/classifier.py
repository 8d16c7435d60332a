"""Text classifiers of the three methods compared with LST, built, saved and loaded one way.

- ``"lst"``: the side network (``kexue.lst.get_lst_model``); the backbone runs under no_grad.
- ``"full"``: every backbone weight and the head train (:class:`PooledClassifier`).
- ``"lora"``: LoRA matrices (peft) on the attention query and value, and the head.

All three pool the tokens the same way and end in the same linear head, so a comparison
changes only what trains (``docs/guides/lst.md``, "Baselines").
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import SequenceClassifierOutput

from kexue.exceptions import CheckpointError
from kexue.extras import require
from kexue.lst.backbones import backbone_fingerprint, check_fingerprint
from kexue.lst.config import POOLINGS, LSTConfig
from kexue.lst.model import LST_KIND, LSTModel, existing_folder, get_lst_model
from kexue.lst.side import pool
from kexue.pretrained import load_folder, read_config, save_folder
from kexue.validation import check_choice, check_class_labels, check_int, check_real, describe

METHODS = ("lst", "full", "lora")
BASELINE_METHODS = ("full", "lora")
CLASSIFIER_KIND = "kexue.lst.PooledClassifier"
FORMAT_VERSION = 1
WEIGHTS_STEM = "classifier"  # classifier.safetensors beside config.json
LORA_SETTINGS = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.1,
    "target_modules": ["query", "value"],
}


class PooledClassifier(nn.Module):
    """A backbone that trains (``method="full"``) or carries LoRA matrices (``"lora"``),
    followed by the pooling and linear head LST uses.

    With ``"lora"`` the backbone is wrapped in place by ``peft.get_peft_model`` with
    ``lora`` (default :data:`LORA_SETTINGS`); only the LoRA matrices and the head train.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_labels: int,
        pooling: str = "mean",
        *,
        method: str = "full",
        dropout: float = 0.1,
        lora: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module) or getattr(backbone, "config", None) is None:
            raise TypeError(f"backbone must be a transformers model, got {describe(backbone)}")
        self.num_labels = check_int(num_labels, "num_labels", low=1)
        self.pooling = check_choice(pooling, "pooling", POOLINGS)
        self.method = check_choice(method, "method", BASELINE_METHODS)
        self.dropout = check_real(dropout, "dropout", low=0.0, high=1.0, high_open=True)
        self.lora = dict(lora or LORA_SETTINGS) if method == "lora" else None
        if self.lora is not None:
            peft = require("peft", "lst")
            backbone = peft.get_peft_model(backbone, peft.LoraConfig(**self.lora))
        self.backbone = backbone
        self.drop = nn.Dropout(self.dropout)
        config: Any = backbone.config  # a transformers PretrainedConfig
        width = config.hidden_size
        self.head = nn.Linear(width, num_labels)
        std = getattr(backbone.config, "initializer_range", None) or 0.02
        nn.init.normal_(self.head.weight, 0.0, std)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, labels=None, **_):
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.head(self.drop(pool(h, attention_mask, self.pooling)))
        loss = None
        if labels is not None:
            check_class_labels(labels, self.num_labels, count_name="num_labels")
            loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def base_model(self) -> nn.Module:
        """The transformers model inside (with LoRA layers injected for ``"lora"``)."""
        if self.lora is not None:  # a peft PeftModel
            return cast(Any, self.backbone).get_base_model()
        return self.backbone

    def _saved_keys(self) -> set[str]:
        if self.method == "full":
            return set(self.state_dict())
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write what trained (``classifier.safetensors``) and ``config.json``: every weight
        for ``"full"``, the LoRA matrices and the head for ``"lora"``."""
        keys = self._saved_keys()
        state = {k: v for k, v in self.state_dict().items() if k in keys}
        config = {
            "method": self.method,
            "num_labels": self.num_labels,
            "pooling": self.pooling,
            "dropout": self.dropout,
            "lora": self.lora,
            "backbone": backbone_fingerprint(self.base_model(), exclude="lora_"),
        }
        return save_folder(
            save_directory,
            kind=CLASSIFIER_KIND,
            version=FORMAT_VERSION,
            config=config,
            tensors={WEIGHTS_STEM: state},
            extra="lst",
        )

    @classmethod
    def from_pretrained(
        cls, backbone: nn.Module, pretrained_directory: str | os.PathLike
    ) -> PooledClassifier:
        """Rebuild a classifier saved by ``save_pretrained`` around ``backbone`` (the
        pretrained model it started from); bit-identical to the saved one, in eval mode.

        ``"full"`` copies the fine-tuned weights into ``backbone`` (in place); ``"lora"``
        wraps it with the saved LoRA matrices. ``ValueError`` if the architecture differs,
        :class:`~kexue.exceptions.CheckpointError` for a folder that cannot be trusted.
        """
        config, tensors = load_folder(
            existing_folder(pretrained_directory),
            kind=CLASSIFIER_KIND,
            version=FORMAT_VERSION,
            extra="lst",
        )
        lora = config["method"] == "lora"  # full fine-tuning replaces the weights anyway
        check_fingerprint(
            config["backbone"], backbone_fingerprint(backbone), pretrained_directory, weights=lora
        )
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten below
            model = cls(
                backbone,
                config["num_labels"],
                config["pooling"],
                method=config["method"],
                dropout=config["dropout"],
                lora=config["lora"],
            )
        state = tensors[WEIGHTS_STEM]
        if set(state) != model._saved_keys():
            raise CheckpointError(
                f"{pretrained_directory}: the saved weights do not match a {config['method']} "
                f"classifier (keys differ, e.g. {sorted(set(state) ^ model._saved_keys())[:3]})"
            )
        model.load_state_dict(state, strict=False)
        return model.eval()


def build_text_classifier(
    method: str,
    backbone: nn.Module,
    num_labels: int,
    *,
    lst_config: LSTConfig | None = None,
    pooling: str = "mean",
    dropout: float = 0.1,
    init_data: Iterable[dict[str, Tensor]] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> nn.Module:
    """The classifier of ``method`` around ``backbone`` (which LST and LoRA freeze).

    ``"lst"``: ``get_lst_model(backbone, lst_config, init_data=..., generator=...)``
    (``lst_config`` defaults to ``LSTConfig(num_labels=num_labels)``); ``"full"``/``"lora"``:
    a :class:`PooledClassifier` whose head weights are drawn from ``generator`` when given.
    """
    check_choice(method, "method", METHODS)
    if method == "lst":
        config = lst_config or LSTConfig(num_labels=num_labels)
        if config.num_labels != num_labels:
            raise ValueError(
                f"lst_config.num_labels={config.num_labels} differs from num_labels={num_labels}"
            )
        return get_lst_model(
            backbone, config, init_data=init_data, generator=generator, progress=progress
        )
    model = PooledClassifier(backbone, num_labels, pooling, method=method, dropout=dropout)
    if generator is not None:
        with torch.no_grad():
            model.head.weight.normal_(0.0, 0.02, generator=generator)
    return model


def load_text_classifier(
    pretrained_directory: str | os.PathLike, backbone: nn.Module
) -> LSTModel | PooledClassifier:
    """Load what ``kexue lst train`` (or ``save_pretrained`` of either class) wrote in
    ``pretrained_directory``, around ``backbone``: an :class:`LSTModel` or a
    :class:`PooledClassifier`, in eval mode, bit-identical to the saved model."""
    folder = existing_folder(pretrained_directory)
    kind = read_config(folder).get("_kexue_class")
    if kind == LST_KIND:
        return LSTModel.from_pretrained(backbone, folder).eval()
    if kind == CLASSIFIER_KIND:
        return PooledClassifier.from_pretrained(backbone, folder)
    raise CheckpointError(
        f"{folder} holds {kind or 'no kexue object'}, not a text classifier of kexue.lst "
        f"({LST_KIND} or {CLASSIFIER_KIND})"
    )
