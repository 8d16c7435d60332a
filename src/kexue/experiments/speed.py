"""Side-by-side timings of kexue's kernels and their torch peers (tour and benchmarks)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from kexue.experiments.multilabel import sentinel_zlpr
from kexue.experiments.timing import median_ms
from kexue.losses import zlpr_loss
from kexue.native import native_kernels
from kexue.ops import logsumexp

LOSS_HEADERS = [
    "scores",
    "BCE ms",
    "ZLPR ms (float t)",
    "ZLPR ms (bool t)",
    "sentinel port ms",
    "ZLPR/BCE",
    "ZLPR(bool)/BCE",
    "port/ZLPR",
    "|ZLPR - port|",
    "ZLPR eager ms (float t)",
    "ZLPR eager/BCE",
]
LSE_HEADERS = ["input", "torch.logsumexp ms", "kexue ms", "kexue/torch"]


# fn(leaf): Callable[..., Tensor] as the callers' lambdas bind loop variables as defaults
def _backward_ms(fn: Callable[..., Tensor], leaf: Tensor, min_run_time: float) -> float:
    def step() -> None:
        leaf.grad = None
        fn(leaf).sum().backward()

    return median_ms(step, min_run_time=min_run_time)


def loss_speed_rows(sizes: tuple[int, ...] = (1000, 10000), min_run_time: float = 1.0) -> list:
    """Forward+backward ms of BCEWithLogitsLoss, zlpr_loss (float and bool targets) and the
    sentinel port, batch 256, 5 positives per row on average; plus |zlpr - port|, and
    zlpr_loss on its eager path (kexue.native switched off)."""
    gen = torch.Generator().manual_seed(0)
    bce = torch.nn.BCEWithLogitsLoss()
    rows = []
    for n in sizes:
        s = torch.randn(256, n, generator=gen).mul_(3).requires_grad_()
        t = (torch.rand(256, n, generator=gen) < 5 / n).float()
        tb = t.bool()
        ms = [
            _backward_ms(lambda v, t=t: bce(v, t), s, min_run_time),
            _backward_ms(lambda v, t=t: zlpr_loss(v, t), s, min_run_time),
            _backward_ms(lambda v, tb=tb: zlpr_loss(v, tb), s, min_run_time),
            _backward_ms(lambda v, t=t: sentinel_zlpr(v, t), s, min_run_time),
        ]
        with native_kernels(False):
            eager = _backward_ms(lambda v, t=t: zlpr_loss(v, t), s, min_run_time)
        with torch.no_grad():
            diff = float((zlpr_loss(s, t) - sentinel_zlpr(s, t)).abs())
        rows.append([f"256 x {n}", *ms, ms[1] / ms[0], ms[2] / ms[0], ms[3] / ms[1], diff,
                     eager, eager / ms[0]])  # fmt: skip
    return rows


def lse_speed_rows(sizes: tuple[int, ...] = (1000, 10000), min_run_time: float = 1.0) -> list:
    """Forward+backward ms of kexue.ops.logsumexp and torch.logsumexp (masked via
    ``masked_fill(-inf)``; plain on N(0, 1) scores; plain on widely spread N(0, 30^2))."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in sizes:
        x = torch.randn(256, n, generator=gen).requires_grad_()
        wide = torch.randn(256, n, generator=gen).mul_(30).requires_grad_()
        mask = torch.rand(256, n, generator=gen) > 0.3
        cases: list[tuple[str, Callable[..., Tensor], Callable[..., Tensor], Tensor]] = [
            (
                "masked, 30% dropped",
                lambda v, m=mask: torch.logsumexp(v.masked_fill(~m, -math.inf), -1),
                lambda v, m=mask: logsumexp(v, mask=m),
                x,
            ),
            ("plain, N(0,1)", lambda v: torch.logsumexp(v, -1), logsumexp, x),
            ("plain, N(0,30^2)", lambda v: torch.logsumexp(v, -1), logsumexp, wide),
        ]
        for label, ref_fn, ours_fn, leaf in cases:
            ref = _backward_ms(ref_fn, leaf, min_run_time)
            ours = _backward_ms(ours_fn, leaf, min_run_time)
            rows.append([f"256 x {n}, {label}", ref, ours, ours / ref])
    return rows
