"""Multi-label "softmax + cross-entropy" (ZLPR) loss, dense and sparse, with soft targets.

Theory and examples: ``docs/guides/losses.md``.
"""

from kexue.losses.soft_targets import label_smoothing, mixup, sample_beta
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
    "sample_beta",
    "sparse_zlpr_loss",
    "zlpr_loss",
    "zlpr_predict",
    "zlpr_probabilities",
]
