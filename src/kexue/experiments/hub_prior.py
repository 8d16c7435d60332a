"""Hub-prior sampling experiments shared by the tour's hubness section and
``benchmarks/hubness.py``: latent priors, their comparison on any generator, the figures.

The generator is a plain callable from latents to images and the scorer any callable returning
``frechet``, ``confidence``, ``label_entropy``, ``precision`` and ``recall`` (e.g.
``kexue.diffusion.evaluate.DigitEvaluator``); see ``docs/guides/hubness.md``, "Hub-prior
sampling".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kexue.extras import require
from kexue.hubness import HubPriorSampler, truncated_normal_latents

__all__ = [
    "SAMPLING_HEADERS",
    "LatentPrior",
    "compare_latent_priors",
    "draw_latents",
    "quality_diversity_figure",
    "sampling_table_rows",
]


@dataclass(frozen=True)
class LatentPrior:
    """How a row's latents are drawn: ``random`` N(0, I), ``hub`` (threshold ``value``),
    ``truncate`` (per-coordinate truncation at ``value``) or ``scale`` (``value * N(0, I)``)."""

    kind: str
    value: float | None = None
    seed_offset: int = 0

    @property
    def label(self) -> str:
        if self.kind == "random":
            return "random N(0, I)" + (f" (seed +{self.seed_offset})" if self.seed_offset else "")
        if self.kind == "hub":
            return f"hub prior, N_5 >= {self.value:g}"
        if self.kind == "truncate":
            return f"truncated, psi = {self.value:g}"
        return f"scaled, psi = {self.value:.3g}"


def draw_latents(
    prior: LatentPrior,
    n: int,
    shape: Sequence[int],
    seed: int,
    pool_size: int = 10_000,
    progress: bool = False,
) -> tuple[Tensor, dict]:
    """``n`` latents of ``shape`` for ``prior``, from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed + prior.seed_offset)
    info: dict = {}
    if prior.kind == "random":
        z = torch.randn((n, *shape), generator=gen)
    elif prior.kind == "hub":
        sampler = HubPriorSampler(
            tuple(shape),
            k=5,
            threshold=int(prior.value),
            pool_size=pool_size,
            generator=gen,
            progress=progress,
        )
        t0 = time.perf_counter()
        z = sampler.sample(n)
        info = {
            "rounds": sampler.rounds_,
            "acceptance": sampler.acceptance_rate_,
            "latent_seconds": time.perf_counter() - t0,
        }
    else:
        z = truncated_normal_latents(
            n, float(prior.value), latent_dim=tuple(shape), method=prior.kind, generator=gen
        )
    return z, info


def compare_latent_priors(
    generate: Callable[[Tensor], Tensor],
    evaluate: Callable[[Tensor], object],
    priors: Sequence[LatentPrior],
    n: int,
    shape: Sequence[int],
    *,
    seed: int = 0,
    batch_size: int = 250,
    pool_size: int = 10_000,
    on_row: Callable[[str], None] | None = None,
    progress: bool = False,
    keep_images: int = 0,
) -> list[dict]:
    """Equal numbers ``n`` of images from every latent prior, scored by ``evaluate``.

    ``generate`` maps a batch of latents to images (a deterministic generator such as DDIM
    with ``eta = 0``); ``evaluate(images)`` returns an object with ``frechet``,
    ``confidence``, ``label_entropy``, ``precision`` and ``recall``. One dict per prior;
    with ``keep_images`` its first images are kept under ``"images"``.
    """
    rows = []
    for prior in priors:
        if on_row is not None:
            on_row(prior.label)
        z, info = draw_latents(prior, n, shape, seed, pool_size, progress)
        t0 = time.perf_counter()
        images = torch.cat([generate(chunk) for chunk in z.split(batch_size)])
        gen_seconds = time.perf_counter() - t0
        q = evaluate(images)
        rows.append(
            {
                "prior": prior.label,
                "kind": prior.kind,
                "value": prior.value,
                "n": n,
                "latent_norm": float(z.flatten(1).norm(dim=1).mean()),
                "frechet": q.frechet,
                "confidence": q.confidence,
                "label_entropy": q.label_entropy,
                "precision": q.precision,
                "recall": q.recall,
                "generate_seconds": gen_seconds,
                **info,
            }
        )
        if keep_images:
            rows[-1]["images"] = images[:keep_images]
    return rows


SAMPLING_HEADERS = [
    "latents",
    "mean |z|",
    "Fréchet (lower = better)",
    "confidence",
    "label entropy",
    "precision",
    "recall",
]


def sampling_table_rows(rows: list[dict]) -> list[list]:
    """The table rows of :data:`SAMPLING_HEADERS` for the result dicts of
    :func:`compare_latent_priors`."""
    return [
        [
            r["prior"],
            r["latent_norm"],
            r["frechet"],
            r["confidence"],
            r["label_entropy"],
            r["precision"],
            r["recall"],
        ]
        for r in rows
    ]


_STYLES = {
    "random": ("k", "o", "random N(0, I)"),
    "hub": ("#d62728", "s", "hub prior (threshold)"),
    "truncate": ("#1f77b4", "^", "truncated normal (psi)"),
    "scale": ("#2ca02c", "v", "scaled (psi)"),
}


def quality_diversity_figure(rows: list[dict], title: str) -> Any:
    """Precision (quality) against recall (diversity), and Fréchet distance against |z|
    (a matplotlib figure)."""
    plt = require("matplotlib.pyplot", "tour", "the hub-prior figures")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, (color, marker, name) in _STYLES.items():
        part = [r for r in rows if r["kind"] == kind]
        if not part:
            continue
        part = sorted(part, key=lambda r: r["recall"])
        for ax, (xkey, ykey) in zip(
            axes, (("recall", "precision"), ("latent_norm", "frechet")), strict=True
        ):
            xs, ys = [r[xkey] for r in part], [r[ykey] for r in part]
            line = "-" if kind != "random" else ""
            ax.plot(xs, ys, marker=marker, color=color, ls=line, label=name)
            for r, x, y in zip(part, xs, ys, strict=True):
                if r["value"] is not None:
                    ax.annotate(
                        f"{r['value']:.3g}",
                        (x, y),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
    axes[0].set_xlabel("recall (diversity; higher = more of the real digits covered)")
    axes[0].set_ylabel("precision (quality; share of samples on the real manifold)")
    axes[0].set_title("Quality against diversity")
    axes[1].set_xlabel("mean latent norm |z| (random: about sqrt(784) = 28)")
    axes[1].set_ylabel("Fréchet distance to held-out digits")
    axes[1].set_title("Fréchet distance against latent norm")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
