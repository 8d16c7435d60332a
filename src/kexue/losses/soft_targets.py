"""Soft multi-label targets for the soft ZLPR loss: label smoothing and mixup.

Both produce targets in ``[0, 1]`` that the soft loss fits as ``t = sigmoid(2 s)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _as_float_targets(targets: Tensor, name: str = "targets") -> Tensor:
    if not isinstance(targets, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype == torch.bool:
        return targets.float()
    if not targets.is_floating_point():
        raise TypeError(f"{name} must be bool or floating in [0, 1], got dtype {targets.dtype}")
    if targets.numel() and (torch.isnan(targets).any() or targets.min() < 0 or targets.max() > 1):
        raise ValueError(f"{name} must lie in [0, 1] with no NaN")
    return targets


def label_smoothing(targets: Tensor, alpha: float) -> Tensor:
    """Binary label smoothing per class: ``t' = (1 - alpha) t + alpha / 2``.

    Each class is its own two-way decision, so the smoothed mass is split between "present"
    and "absent": a positive becomes ``1 - alpha / 2`` and a negative ``alpha / 2``.
    """
    t = _as_float_targets(targets)
    if not (isinstance(alpha, int | float) and 0 <= alpha <= 1):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return t * (1.0 - alpha) + alpha / 2.0


def _standard_gamma(concentration: float, size: int, generator: torch.Generator | None) -> Tensor:
    """Gamma(concentration, 1) samples from ``generator`` (Marsaglia & Tsang, 2000)."""
    boost = None
    a = concentration
    if a < 1:  # Gamma(a) = Gamma(a + 1) * U^(1/a)
        boost = torch.rand(size, generator=generator, dtype=torch.float64).pow(1.0 / a)
        a += 1.0
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(size, dtype=torch.float64)
    todo = torch.arange(size)
    while todo.numel():
        x = torch.randn(todo.numel(), generator=generator, dtype=torch.float64)
        u = torch.rand(todo.numel(), generator=generator, dtype=torch.float64)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (u.log() < 0.5 * x**2 + d - d * v + d * v.clamp_min(1e-300).log())
        out[todo[ok]] = d * v[ok]
        todo = todo[~ok]
    return out * boost if boost is not None else out


def sample_beta(
    a: float, b: float, size: int = 1, *, generator: torch.Generator | None = None
) -> Tensor:
    """``size`` draws of Beta(a, b) in float64, reproducible through ``generator``."""
    if not (a > 0 and b > 0):
        raise ValueError(f"Beta parameters must be positive, got a={a!r}, b={b!r}")
    x = _standard_gamma(a, size, generator)
    y = _standard_gamma(b, size, generator)
    return x / (x + y)


def mixup(
    x: Tensor,
    targets: Tensor,
    alpha: float,
    *,
    generator: torch.Generator | None = None,
    per_sample: bool = False,
) -> tuple[Tensor, Tensor]:
    """Mixup (Zhang et al., 2018): ``x' = lam x + (1 - lam) x[perm]``, same mix of targets.

    ``lam ~ Beta(alpha, alpha)`` (one per batch, or one per sample with ``per_sample``) and
    ``perm`` a random permutation of the batch (dim 0), both drawn from ``generator``.
    Mixed targets stay in ``[0, 1]``: they are soft labels for :func:`zlpr_loss`.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor with the batch in dim 0")
    t = _as_float_targets(targets)
    if x.ndim < 1 or t.ndim < 1 or x.shape[0] != t.shape[0]:
        raise ValueError(
            f"x and targets must share the batch size in dim 0, got {tuple(x.shape)} "
            f"and {tuple(t.shape)}"
        )
    if not (isinstance(alpha, int | float) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    batch = x.shape[0]
    lam = sample_beta(alpha, alpha, batch if per_sample else 1, generator=generator)
    perm = torch.randperm(batch, generator=generator).to(x.device)
    lam_x = lam.to(x.dtype).to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
    lam_t = lam.to(t.dtype).to(t.device).reshape(-1, *([1] * (t.ndim - 1)))
    return lam_x * x + (1 - lam_x) * x[perm], lam_t * t + (1 - lam_t) * t[perm]
