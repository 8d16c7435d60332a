"""Hub-prior sampling experiments shared by the tour's hubness section and
``benchmarks/hubness.py``: latent priors, their comparison on any generator, the figures.

The generator is a plain callable from latents to images and the scorer any callable returning
``frechet``, ``confidence``, ``label_entropy``, ``precision`` and ``recall`` (e.g.
``kexue.diffusion.evaluate.DigitEvaluator``); see ``docs/guides/hubness.md``, "Hub-prior
sampling".
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import Tensor

from kexue.extras import require
from kexue.hubness import HubPriorSampler, truncated_normal_latents

__all__ = [
    "SAMPLING_HEADERS",
    "LatentPrior",
    "compare_latent_priors",
    "draw_latents",
    "families_figure",
    "hub_prior_claims",
    "interpolate_curve",
    "paired_differences",
    "prior_study",
    "quality_diversity_figure",
    "sampling_table_rows",
    "summarize_study",
]


class _Quality(Protocol):
    """What ``evaluate(images)`` returns (e.g. ``kexue.diffusion.SampleQuality``)."""

    @property
    def frechet(self) -> float: ...
    @property
    def confidence(self) -> float: ...
    @property
    def label_entropy(self) -> float: ...
    @property
    def precision(self) -> float: ...
    @property
    def recall(self) -> float: ...


@dataclass(frozen=True)
class LatentPrior:
    """How a row's latents are drawn: ``random`` N(0, I); ``hub`` (``N_k >= value`` within
    pools of candidates); ``matched`` (random directions scaled to the norms of the ``hub``
    latents with the same ``value``, ``k`` and seed: the norm-matched control); ``truncate``
    (each coordinate conditioned on ``|z_i| <= value``) or ``scale`` (``value * N(0, I)``)."""

    kind: str
    value: float | None = None
    seed_offset: int = 0
    k: int = 5

    @property
    def label(self) -> str:
        if self.kind == "random":
            return "random N(0, I)" + (f" (seed +{self.seed_offset})" if self.seed_offset else "")
        if self.kind == "hub":
            return f"hub prior, N_{self.k} >= {self.value:g}"
        if self.kind == "matched":
            return f"norm-matched to N_{self.k} >= {self.value:g}"
        if self.kind == "truncate":
            return f"truncated, psi = {self.value:g}"
        return f"scaled, psi = {self.value:.3g}"

    @property
    def family(self) -> str:
        """The row's family in the comparison: random, hub, matched or truncation."""
        return {"truncate": "truncation", "scale": "truncation"}.get(self.kind, self.kind)


def draw_latents(
    prior: LatentPrior,
    n: int,
    shape: Sequence[int],
    seed: int,
    pool_size: int = 10_000,
    progress: bool = False,
) -> tuple[Tensor, dict]:
    """``n`` latents of ``shape`` for ``prior``, from a generator seeded with ``seed``.

    The info dict of hub (and norm-matched) rows holds the search's cost: ``rounds``,
    ``acceptance``, ``candidates`` (drawn) and ``latent_seconds``.
    """
    gen = torch.Generator().manual_seed(seed + prior.seed_offset)
    info: dict = {}
    if prior.kind == "random":
        z = torch.randn((n, *shape), generator=gen)
    elif prior.kind in ("hub", "matched"):
        sampler = HubPriorSampler(
            tuple(shape),
            k=prior.k,
            threshold=int(cast(float, prior.value)),  # hub rows carry their threshold
            pool_size=pool_size,
            generator=gen,
            progress=progress,
        )
        t0 = time.perf_counter()
        z = sampler.sample(n)
        info = {
            "rounds": sampler.rounds_,
            "acceptance": sampler.acceptance_rate_,
            "candidates": sampler.candidates_seen_,
            "latent_seconds": time.perf_counter() - t0,
        }
        if prior.kind == "matched":  # other directions, the hub latents' norms
            directions = torch.randn(z.shape, generator=torch.Generator().manual_seed(~seed))
            flat = directions.flatten(1)
            norms = z.flatten(1).norm(dim=1, keepdim=True)
            z = (flat / flat.norm(dim=1, keepdim=True) * norms).view(z.shape)
    else:
        z = truncated_normal_latents(
            n,
            float(cast(float, prior.value)),
            latent_dim=tuple(shape),
            method=prior.kind,
            generator=gen,
        )
    return z, info


def compare_latent_priors(
    generate: Callable[[Tensor], Tensor],
    evaluate: Callable[[Tensor], _Quality],
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
    "matched": ("#ff7f0e", "D", "norm-matched control (threshold)"),
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


METRICS = ("frechet", "precision", "recall", "confidence", "label_entropy")


def _scores(evaluator: Any, images: Tensor, *, bootstrap: int, seed: int) -> dict[str, Any]:
    """The evaluator's scores of ``images`` and the bootstrap standard deviation of the
    Fréchet distance (generated features resampled with replacement ``bootstrap`` times)."""
    from kexue.diffusion import classify, frechet_distance

    q = evaluator(images)
    features, _ = classify(evaluator.classifier, images)
    gen = torch.Generator().manual_seed(seed)
    draws = [
        frechet_distance(features[torch.randint(len(features), (len(features),), generator=gen)],
                         evaluator.reference_features)
        for _ in range(bootstrap)
    ]  # fmt: skip
    spread = torch.tensor(draws, dtype=torch.float64)
    return {
        "frechet": q.frechet,
        "frechet_bootstrap_sd": float(spread.std()) if bootstrap > 1 else float("nan"),
        "confidence": q.confidence,
        "label_entropy": q.label_entropy,
        "precision": q.precision,
        "recall": q.recall,
        "histogram": list(q.histogram),
    }


def prior_study(
    generate: Callable[[Tensor], Tensor],
    evaluator: Any,
    priors: Sequence[LatentPrior],
    n: int,
    shape: Sequence[int],
    seeds: Sequence[int],
    *,
    batch_size: int = 500,
    pool_size: int = 10_000,
    bootstrap: int = 200,
    on_row: Callable[[str], None] | None = None,
    keep_images: int = 0,
) -> list[dict]:
    """Every prior with every seed: ``n`` images each, scored by ``evaluator`` (a
    ``kexue.diffusion.DigitEvaluator``), with the bootstrap spread of the Fréchet distance,
    the latents' norms and the cost of drawing them (time per latent; for hub rows also the
    candidates searched per kept latent). One dict per (prior, seed)."""
    rows = []
    for prior in priors:
        for seed in seeds:
            if on_row is not None:
                on_row(f"{prior.label}, seed {seed}")
            t0 = time.perf_counter()
            z, info = draw_latents(prior, n, shape, seed, pool_size)
            latent_seconds = info.pop("latent_seconds", time.perf_counter() - t0)
            t0 = time.perf_counter()
            with torch.no_grad():
                images = torch.cat([generate(chunk) for chunk in z.split(batch_size)])
            generate_seconds = time.perf_counter() - t0
            norms = z.flatten(1).norm(dim=1)
            row = {
                "prior": prior.label,
                "family": prior.family,
                "kind": prior.kind,
                "value": prior.value,
                "k": prior.k,
                "seed": seed,
                "n": n,
                "latent_norm": float(norms.mean()),
                "latent_norm_sd": float(norms.std()),
                "latent_seconds": latent_seconds,
                "seconds_per_latent": latent_seconds / n,
                "generate_seconds": generate_seconds,
                **info,
                **_scores(evaluator, images, bootstrap=bootstrap, seed=1000 + seed),
            }
            if "candidates" in info:
                row["candidates_per_latent"] = info["candidates"] / n
            if keep_images:
                row["images"] = images[:keep_images]
            rows.append(row)
    return rows


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(t) > 1 else float("nan")


def summarize_study(rows: Sequence[dict]) -> list[dict]:
    """One dict per prior (in the order of ``rows``): each metric's mean and standard
    deviation over the seeds, the mean bootstrap spread of the Fréchet distance, and the cost
    (mean time per latent, candidates per kept latent)."""
    out: dict[str, dict] = {}
    for row in rows:
        out.setdefault(row["prior"], {"rows": []})["rows"].append(row)
    summary = []
    for entry in out.values():
        part = entry["rows"]
        first = part[0]
        item = {key: first[key] for key in ("prior", "family", "kind", "value", "k", "n")}
        item["seeds"] = [r["seed"] for r in part]
        for key in (*METRICS, "latent_norm", "seconds_per_latent"):
            item[key], item[f"{key}_sd"] = _mean_sd([r[key] for r in part])
        item["frechet_bootstrap_sd"] = _mean_sd([r["frechet_bootstrap_sd"] for r in part])[0]
        if "candidates_per_latent" in first:
            item["candidates_per_latent"] = _mean_sd([r["candidates_per_latent"] for r in part])[0]
        summary.append(item)
    return summary


def paired_differences(rows: Sequence[dict], label: str, baseline: str) -> dict[str, Any]:
    """Per metric, ``label``'s value minus ``baseline``'s for the same seed: the differences,
    their mean, standard deviation and standard error over the seeds."""
    by = {(r["prior"], r["seed"]): r for r in rows}
    seeds = [r["seed"] for r in rows if r["prior"] == label and (baseline, r["seed"]) in by]
    if not seeds:
        raise ValueError(f"no seed has rows for both {label!r} and {baseline!r}")
    out: dict[str, Any] = {"prior": label, "baseline": baseline, "seeds": seeds}
    for key in METRICS:
        diffs = [by[(label, s)][key] - by[(baseline, s)][key] for s in seeds]
        mean, sd = _mean_sd(diffs)
        out[key] = {"diffs": diffs, "mean": mean, "sd": sd, "se": sd / len(diffs) ** 0.5}
    return out


_FAMILY_STYLES = {
    "random": ("k", "o", "random N(0, I)"),
    "hub": ("#d62728", "s", "hub prior"),
    "matched": ("#ff7f0e", "D", "norm-matched control"),
    "truncation": ("#1f77b4", "^", "truncation (psi)"),
}


def families_figure(summary: Sequence[dict], title: str) -> Any:
    """Quality against diversity per family (mean over seeds, bars: seed sd): precision and
    Fréchet distance against recall (a matplotlib figure)."""
    plt = require("matplotlib.pyplot", "tour", "the hub-prior figures")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for family, (color, marker, name) in _FAMILY_STYLES.items():
        part = sorted((s for s in summary if s["family"] == family), key=lambda s: s["recall"])
        if not part:
            continue
        for ax, key in zip(axes, ("precision", "frechet"), strict=True):
            ax.errorbar(
                [s["recall"] for s in part],
                [s[key] for s in part],
                xerr=[s["recall_sd"] for s in part],
                yerr=[s[f"{key}_sd"] for s in part],
                fmt=marker + ("-" if family == "truncation" else ""),
                color=color,
                label=name,
                capsize=2,
                ms=5,
            )
            for s in part:
                if s["value"] is not None:
                    text = (
                        f"{s['value']:g}" if family == "truncation" else f"k{s['k']}:{s['value']:g}"
                    )
                    ax.annotate(
                        text, (s["recall"], s[key]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points",
                    )  # fmt: skip
    axes[0].set_ylabel("precision (quality: share of samples on the real manifold)")
    axes[1].set_ylabel("Fréchet distance to held-out digits (lower = better)")
    for ax in axes:
        ax.set_xlabel("recall (diversity: share of real digits covered)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def interpolate_curve(
    curve: Sequence[Mapping[str, Any]], key: str, value: float, target: str
) -> float | None:
    """``target`` along ``curve`` (e.g. the truncation rows in order of psi) where ``key``
    equals ``value``, linear between neighbouring points; None outside the measured range."""
    for a, b in itertools.pairwise(curve):
        lo, hi = sorted((a[key], b[key]))
        if lo <= value <= hi and a[key] != b[key]:
            w = (value - a[key]) / (b[key] - a[key])
            return a[target] + w * (b[target] - a[target])
    return None


def _status(gains: Sequence[float], noise: Sequence[float]) -> str:
    """``holds`` when every gain exceeds its noise, ``does not hold`` when none does and one
    is a loss beyond its noise (or all are within it), else ``partly``."""
    above = [g > n for g, n in zip(gains, noise, strict=True)]
    below = [g < -n for g, n in zip(gains, noise, strict=True)]
    if all(above):
        return "holds"
    if any(above) and not any(below):
        return "partly"
    return "does not hold"


def hub_prior_claims(
    hub: Mapping[str, Any],
    random: Mapping[str, Any],
    truncation: Sequence[Mapping[str, Any]],
    noise: Mapping[str, float],
    matched: Mapping[str, Any] | None = None,
) -> list[tuple[str, str, str]]:
    """The hub prior's claim, judged from one hub row against random latents, the truncation
    curve (rows in order of psi) and, if given, the norm-matched control.

    ``noise`` holds the size of a difference that does not count for ``frechet``,
    ``precision`` and ``recall`` (e.g. the gap between two random seeds, or twice a standard
    error). Returns ``(text, status, key number)`` triples, status in holds / partly /
    does not hold / measured (``docs/guides/hubness.md``, "Hub-prior sampling"):

    1. better samples than random latents: Fréchet distance lower and precision higher;
    2. less diversity lost than truncation: recall above the truncation curve's recall at the
       hub row's precision (the random row closes the curve as psi = infinity; ``measured``
       when the curve does not reach that precision);
    3. (with ``matched``) more than short latents: hub row better than the norm-matched one.
    """
    name = hub["prior"]
    d_fd = random["frechet"] - hub["frechet"]
    d_p = hub["precision"] - random["precision"]
    claims = [
        (
            f"{name}: better samples than N(0, I) latents (lower Fréchet, higher precision)",
            _status([d_fd, d_p], [noise["frechet"], noise["precision"]]),
            f"Fréchet {hub['frechet']:.1f} vs {random['frechet']:.1f}, precision "
            f"{hub['precision']:.3f} vs {random['precision']:.3f} (noise: Fréchet "
            f"{noise['frechet']:.1f}, precision {noise['precision']:.3f})",
        )
    ]
    text = f"{name}: more diversity (recall) than truncation at the same precision"
    curve = [*truncation, random]  # N(0, I) is truncation at psi = infinity
    at = interpolate_curve(curve, "precision", hub["precision"], "recall")
    if at is None:
        claims.append(
            (
                text,
                "measured",
                f"the truncation curve does not reach precision {hub['precision']:.3f}; recall "
                f"{hub['recall']:.3f}",
            )
        )
    else:
        claims.append(
            (
                text,
                _status([hub["recall"] - at], [noise["recall"]]),
                f"recall {hub['recall']:.3f} vs {at:.3f} for truncation at precision "
                f"{hub['precision']:.3f} (noise {noise['recall']:.3f})",
            )
        )
    if matched is not None:
        claims.append(
            (
                f"{name}: better than random latents of the same norms (norm-matched control)",
                _status(
                    [matched["frechet"] - hub["frechet"], hub["precision"] - matched["precision"]],
                    [noise["frechet"], noise["precision"]],
                ),
                f"Fréchet {hub['frechet']:.1f} vs {matched['frechet']:.1f}, precision "
                f"{hub['precision']:.3f} vs {matched['precision']:.3f}",
            )
        )
    return claims
