"""Multi-label "softmax + cross-entropy" (ZLPR) loss (reference: multilabel-loss.md)."""

from kexue.losses.soft_targets import label_smoothing, mixup
from kexue.losses.zlpr import (
    SparseZLPRLoss,
    ZLPRLoss,
    sparse_zlpr_loss,
    zlpr_loss,
    zlpr_predict,
    zlpr_probabilities,
)

__all__ = [
    "SparseZLPRLoss",
    "ZLPRLoss",
    "label_smoothing",
    "mixup",
    "sparse_zlpr_loss",
    "zlpr_loss",
    "zlpr_predict",
    "zlpr_probabilities",
]
