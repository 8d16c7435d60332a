"""Ladder Side-Tuning of frozen Hugging Face transformers (reference: ladder-side-tuning.md)."""

from kexue.lst.backbones import BackboneStates, backbone_adapter
from kexue.lst.config import LSTConfig
from kexue.lst.model import BackboneCache, LSTModel, get_lst_model
from kexue.lst.pruning import PruningPlan

__all__ = [
    "BackboneCache",
    "BackboneStates",
    "LSTConfig",
    "LSTModel",
    "PruningPlan",
    "backbone_adapter",
    "get_lst_model",
]
