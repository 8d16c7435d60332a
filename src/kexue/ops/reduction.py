"""The ``reduction=`` argument shared by kexue's losses (as in ``torch.nn`` losses)."""

from __future__ import annotations

from torch import Tensor

from kexue.validation import check_choice

__all__ = ["REDUCTIONS", "check_reduction", "reduce_loss"]

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: object) -> str:
    """``reduction`` if it is ``"mean"``, ``"sum"`` or ``"none"``, else ``ValueError``."""
    return check_choice(reduction, "reduction", REDUCTIONS)


def reduce_loss(loss: Tensor, reduction: str, weight: Tensor | None = None) -> Tensor:
    """``loss * weight`` (if given), then its mean, sum, or itself (``"none"``)."""
    if weight is not None:
        loss = loss * weight
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
