"""Soft multi-label targets for the soft ZLPR loss: label smoothing and mixup.

Both produce targets in ``[0, 1]`` that the soft loss fits as ``t = sigmoid(2 s)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kexue.validation import (
    check_generator,
    check_int,
    check_real,
    check_same_device,
    check_tensor,
    renamed_arguments,
)


def _as_float_target(target: object, name: str = "target") -> Tensor:
    target = check_tensor(target, name)
    if target.dtype == torch.bool:
        return target.float()
    if not target.is_floating_point():
        raise TypeError(f"{name} must be bool or floating in [0, 1], got dtype {target.dtype}")
    if target.numel() and (torch.isnan(target).any() or target.min() < 0 or target.max() > 1):
        raise ValueError(f"{name} must lie in [0, 1] with no NaN")
    return target


@renamed_arguments(targets="target")
def label_smoothing(target: Tensor, alpha: float) -> Tensor:
    """Binary label smoothing per class: ``t' = (1 - alpha) t + alpha / 2``.

    Each class is its own two-way decision, so the smoothed mass is split between "present"
    and "absent": a positive becomes ``1 - alpha / 2`` and a negative ``alpha / 2``
    (``docs/guides/losses.md``, "Soft labels"). ``target``: bool or floating in ``[0, 1]``
    (formerly ``targets``).
    """
    t = _as_float_target(target)
    alpha = check_real(alpha, "alpha", low=0.0, high=1.0)
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
    """``size`` draws of Beta(a, b) in float64, reproducible through ``generator``:
    ``X / (X + Y)`` with ``X ~ Gamma(a)``, ``Y ~ Gamma(b)``."""
    if not (isinstance(a, int | float) and isinstance(b, int | float) and a > 0 and b > 0):
        raise ValueError(f"Beta parameters must be positive, got a={a!r}, b={b!r}")
    size = check_int(size, "size", low=0)
    check_generator(generator)
    x = _standard_gamma(a, size, generator)
    y = _standard_gamma(b, size, generator)
    return x / (x + y)


@renamed_arguments(targets="target")
def mixup(
    x: Tensor,
    target: Tensor,
    alpha: float,
    *,
    generator: torch.Generator | None = None,
    per_sample: bool = False,
) -> tuple[Tensor, Tensor]:
    """Mixup (Zhang et al., 2018): ``x' = lam x + (1 - lam) x[perm]``, same mix of ``target``.

    ``lam ~ Beta(alpha, alpha)`` (one per batch, or one per sample with ``per_sample``) and
    ``perm`` a random permutation of the batch (dim 0), both drawn from ``generator``.
    Mixed targets stay in ``[0, 1]``: they are soft labels for :func:`zlpr_loss`
    (``docs/guides/losses.md``, "Soft labels"). ``target`` was formerly ``targets``.
    """
    x = check_tensor(x, "x")
    if not x.is_floating_point():
        raise TypeError(
            f"x must be a floating-point tensor with the batch in dim 0, got dtype {x.dtype}"
        )
    check_same_device(("x", x), ("target", check_tensor(target, "target")))
    t = _as_float_target(target)
    if x.ndim < 1 or t.ndim < 1 or x.shape[0] != t.shape[0]:
        raise ValueError(
            f"x and target must share the batch size in dim 0, got {tuple(x.shape)} "
            f"and {tuple(t.shape)}"
        )
    alpha = check_real(alpha, "alpha", low=0.0, low_open=True)
    check_generator(generator)
    batch = x.shape[0]
    lam = sample_beta(alpha, alpha, batch if per_sample else 1, generator=generator)
    perm = torch.randperm(batch, generator=generator).to(x.device)
    lam_x = lam.to(x.dtype).to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
    lam_t = lam.to(t.dtype).to(t.device).reshape(-1, *([1] * (t.ndim - 1)))
    return lam_x * x + (1 - lam_x) * x[perm], lam_t * t + (1 - lam_t) * t[perm]
