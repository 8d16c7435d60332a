"""logsumexp numerics with proven bounds (reference: logsumexp.md)."""

from kexue.ops.logsumexp import (
    LSEBounds,
    logsumexp,
    logsumexp_bounds,
    logsumexp_lower_bound,
    renyi_entropy,
    smooth_max,
)

__all__ = [
    "LSEBounds",
    "logsumexp",
    "logsumexp_bounds",
    "logsumexp_lower_bound",
    "renyi_entropy",
    "smooth_max",
]
