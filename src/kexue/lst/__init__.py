"""Ladder Side-Tuning of frozen Hugging Face transformers (``docs/guides/lst.md``).

A small side network beside a frozen backbone, fed by gated ladders from its layers, is all
that trains; the backbone runs without autograd. PEFT-style API: ``get_lst_model(backbone,
LSTConfig(...))``, ``model.save_pretrained(folder)``, ``LSTModel.from_pretrained(backbone,
folder)``. :func:`run` trains and evaluates one :class:`RunSpec` end to end (what
``kexue lst train`` does), in one process or data-parallel under ``accelerate launch``, with
crash-safe checkpoints and bit-exact resume.
"""

from kexue.extras import require

require("transformers", "lst")

from kexue.lst.backbones import BackboneStates, backbone_adapter, load_backbone  # noqa: E402
from kexue.lst.checkpoint import Checkpointing  # noqa: E402
from kexue.lst.classifier import (  # noqa: E402
    PooledClassifier,
    build_text_classifier,
    load_text_classifier,
)
from kexue.lst.config import LSTConfig  # noqa: E402
from kexue.lst.data import Encoded, encode, read_tsv, right_pad  # noqa: E402
from kexue.lst.model import BackboneCache, LSTModel, get_lst_model  # noqa: E402
from kexue.lst.pruning import PruningPlan  # noqa: E402
from kexue.lst.run import RunInputs, RunResult, RunSpec, load_inputs, run  # noqa: E402
from kexue.lst.train import (  # noqa: E402
    TrainSettings,
    TrainStats,
    accuracy,
    epoch_batches,
    predict,
    train_text_classifier,
)

__all__ = [
    "BackboneCache",
    "BackboneStates",
    "Checkpointing",
    "Encoded",
    "LSTConfig",
    "LSTModel",
    "PooledClassifier",
    "PruningPlan",
    "RunInputs",
    "RunResult",
    "RunSpec",
    "TrainSettings",
    "TrainStats",
    "accuracy",
    "backbone_adapter",
    "build_text_classifier",
    "encode",
    "epoch_batches",
    "get_lst_model",
    "load_backbone",
    "load_inputs",
    "load_text_classifier",
    "predict",
    "read_tsv",
    "right_pad",
    "run",
    "train_text_classifier",
]
