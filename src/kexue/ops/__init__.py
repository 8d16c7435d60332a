"""logsumexp numerics with proven bounds, and the ``reduction=`` of kexue's losses.

Theory and examples: ``docs/guides/ops.md``.
"""

from kexue.ops.logsumexp import (
    LSEBounds,
    compute_dtype,
    exp_flush_,
    logsumexp,
    logsumexp_bounds,
    logsumexp_lower_bound,
    renyi_entropy,
    smooth_max,
)
from kexue.ops.reduction import REDUCTIONS, check_reduction, reduce_loss

__all__ = [
    "REDUCTIONS",
    "LSEBounds",
    "check_reduction",
    "compute_dtype",
    "exp_flush_",
    "logsumexp",
    "logsumexp_bounds",
    "logsumexp_lower_bound",
    "reduce_loss",
    "renyi_entropy",
    "smooth_max",
]
