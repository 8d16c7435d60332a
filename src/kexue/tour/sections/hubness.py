"""Tour section ``hubness``: hubs of Gaussian points, and hub-prior latents for the shipped
digit GAN (``DigitGenerator.from_pretrained("mnist-gan")``), the setting the hub prior was
proposed for (the benchmark also runs the diffusion model as a DDIM generator).

The latent-prior comparison lives in :mod:`kexue.experiments.hub_prior`, shared with
``benchmarks/hubness.py`` (which runs it with more samples).
"""

from __future__ import annotations

import numpy as np
import torch

from kexue.experiments.hub_prior import (
    SAMPLING_HEADERS,
    LatentPrior,
    compare_latent_priors,
    hub_prior_claims,
    quality_diversity_figure,
    sampling_table_rows,
)
from kexue.extras import require
from kexue.hubness import Hubness, k_occurrence
from kexue.tour.report import Claim, Figure, Section, Table
from kexue.tour.runner import SectionContext

TITLE = "Hubness and hub-prior latent sampling (kexue.hubness)"

N_POINTS = 3000  # Gaussian points per set
REPEATS = 3  # sets per dimension
DIMS = (1, 2, 3, 5, 10, 20, 50, 100, 200, 512, 1000)
N_SAMPLES = 500  # images per latent prior in the section (the benchmark: 1,000 x 3 seeds)
SECTION_PRIORS = (
    LatentPrior("random"),
    LatentPrior("random", seed_offset=1),  # the noise floor: two draws of the same prior
    LatentPrior("hub", 20),
    LatentPrior("hub", 50),
    LatentPrior("matched", 50),
    *(LatentPrior("truncate", psi) for psi in (1.0, 1.5, 2.0, 2.5)),
)
CLAIMED = "hub prior, N_5 >= 50"  # the paper's setting (k = 5, threshold 10 k)


def _skewness_figure(ctx: SectionContext, gen: torch.Generator) -> tuple[Figure, dict]:
    plt = require("matplotlib.pyplot", "tour", "the tour's figures")
    # the skewness of a heavy-tailed count is noisy: REPEATS independent sets per dimension
    skew = {k: np.zeros((len(DIMS), REPEATS)) for k in (5, 20)}
    antihubs = np.zeros((len(DIMS), REPEATS))
    for i, d in enumerate(ctx.track(DIMS, "skewness of N_k against dimension")):
        for r in range(REPEATS):
            hub = Hubness(k=(5, 20)).fit(torch.randn(N_POINTS, d, generator=gen))
            for k in skew:
                skew[k][i, r] = hub.score(k=k)
            antihubs[i, r] = hub.score("antihub_occurrence", k=5)
    fig, ax = plt.subplots(figsize=(5.6, 4))
    for k, values in skew.items():
        mean = values.mean(1)
        err = np.stack([mean - values.min(1), values.max(1) - mean])
        ax.errorbar(DIMS, mean, yerr=err, fmt="o-", capsize=3, label=f"k = {k}")
    ax.set_xscale("log")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("dimension d")
    ax.set_ylabel("skewness of N_k (k-skewness)")
    ax.set_title(f"{N_POINTS:,} i.i.d. N(0, I) points: hubness grows with d")
    ax.legend(title=f"mean, min-max of {REPEATS} sets")
    saved = ctx.save_figure(
        fig, "skewness", f"k-skewness of Gaussian points against dimension ({REPEATS} sets each)"
    )
    numbers: dict = {}
    for i, d in enumerate(DIMS):
        for k in skew:
            numbers[f"k-skewness, k={k}, d={d}"] = float(skew[k][i].mean())
        numbers[f"anti-hub share, k=5, d={d}"] = float(antihubs[i].mean())
    return saved, numbers


def _histogram_and_scatter(ctx: SectionContext, gen: torch.Generator) -> tuple[list, dict]:
    plt = require("matplotlib.pyplot", "tour", "the tour's figures")
    stats = require("scipy.stats", "hubness")
    counts = {}
    points = {}
    for d in (2, 512):
        X = torch.randn(N_POINTS, d, generator=gen)
        points[d] = X
        counts[d] = k_occurrence(X, 5)
    fig, ax = plt.subplots(figsize=(5.6, 4))
    top = int(max(c.max() for c in counts.values()))
    bins = np.arange(top + 2) - 0.5
    for d, color in ((2, "#1f77b4"), (512, "#d62728")):
        ax.hist(
            counts[d].numpy(),
            bins=bins,
            histtype="step",
            lw=1.5,
            color=color,
            label=f"d = {d}: max N_5 = {int(counts[d].max())}",
        )
    ax.set_yscale("log")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("k-occurrence N_5 (times a point is among others' 5 nearest neighbours)")
    ax.set_ylabel("number of points (log scale)")
    ax.set_title(f"N_5 of {N_POINTS:,} Gaussian points")
    ax.legend()
    hist = ctx.save_figure(fig, "histogram", "distribution of N_5 at d = 2 and d = 512")

    X, n_k = points[512], counts[512].double()
    distance = (X - X.mean(0)).norm(dim=1)
    rho = float(stats.spearmanr(n_k.numpy(), distance.numpy()).statistic)
    rho_2 = float(
        stats.spearmanr(
            counts[2].numpy(), (points[2] - points[2].mean(0)).norm(dim=1).numpy()
        ).statistic
    )
    fig, ax = plt.subplots(figsize=(5.6, 4))
    ax.scatter(distance.numpy(), n_k.numpy(), s=4, alpha=0.4, color="#d62728")
    ax.set_xlabel("distance to the sample mean |x - mean|")
    ax.set_ylabel("hub value N_5")
    ax.set_title(f"d = 512: hubs sit near the centre (Spearman rho = {rho:.2f})")
    scatter = ctx.save_figure(fig, "centre", "hub value against distance to the centre, d = 512")
    numbers = {
        "max N_5, d=2": int(counts[2].max()),
        "max N_5, d=512": int(counts[512].max()),
        "anti-hubs (N_5 = 0), d=2": int((counts[2] == 0).sum()),
        "anti-hubs (N_5 = 0), d=512": int((counts[512] == 0).sum()),
        "Spearman(N_5, distance to centre), d=512": rho,
        "Spearman(N_5, distance to centre), d=2": rho_2,
    }
    return [hist, scatter], numbers


def _sampling(ctx: SectionContext) -> tuple[Table, list[dict], dict]:
    from kexue.diffusion import DigitEvaluator
    from kexue.hubness import DigitGenerator

    gan = DigitGenerator.from_pretrained("mnist-gan")
    step = gan.training_info.get("step")
    evaluator = DigitEvaluator()
    priors = list(SECTION_PRIORS)
    ctx.step("hub-prior sampling", total=len(priors))

    def on_row(label: str) -> None:
        ctx.step(f"{N_SAMPLES} images: {label}")

    rows = []
    for prior in priors:
        rows += compare_latent_priors(
            gan, evaluator, [prior], N_SAMPLES, (gan.latent_dim,), seed=ctx.seed, on_row=on_row
        )
        ctx.advance()
    table = Table(
        f"{N_SAMPLES} digits per latent prior from the shipped GAN (mnist-gan, {step} training "
        "steps; z in R^128), scored against the 1,000 held-out digits with the digit "
        "classifier's features (one seed: compare rows with care; docs/benchmarks/hubness.md "
        "has 1,000 per row, 3 seeds, bootstrap errors and paired differences)",
        SAMPLING_HEADERS,
        sampling_table_rows(rows),
    )
    return table, rows, {"GAN training steps": step}


def section_claims(numbers: dict, rows: list[dict]) -> list[Claim]:
    """The section's claims, judged from its numbers: hubness grows with d, hubs are central,
    and the hub prior's three parts (``kexue.experiments.hub_prior.hub_prior_claims``) with the
    gap between the two random seeds as the noise floor."""
    s2, s512 = numbers["k-skewness, k=5, d=2"], numbers["k-skewness, k=5, d=512"]
    rho = numbers["Spearman(N_5, distance to centre), d=512"]
    claims = [
        Claim(
            "The skewness of N_k grows with the dimension (i.i.d. Gaussian points, k = 5)",
            "holds" if s512 > 1 and s512 > s2 + 1 else "does not hold",
            f"k-skewness {s2:.2f} at d = 2, {s512:.2f} at d = 512",
        ),
        Claim(
            "Hubs lie near the centre (N_5 falls with the distance to the mean, d = 512)",
            "holds" if rho < -0.5 else ("partly" if rho < 0 else "does not hold"),
            f"Spearman correlation {rho:.2f}",
        ),
    ]
    by = {r["prior"]: r for r in rows}
    rand, again = by["random N(0, I)"], by["random N(0, I) (seed +1)"]
    noise = {key: abs(rand[key] - again[key]) for key in ("frechet", "precision", "recall")}
    truncation = sorted((r for r in rows if r["kind"] == "truncate"), key=lambda r: r["value"])
    hub = by[CLAIMED]
    matched = by[f"norm-matched to N_5 >= {hub['value']:g}"]
    for text, status, key in hub_prior_claims(hub, rand, truncation, noise, matched):
        claims.append(Claim(f"GAN latents, {text}", status, key))
    return claims


def run(ctx: SectionContext) -> Section:
    gen = torch.Generator().manual_seed(ctx.seed)
    skew_fig, numbers = _skewness_figure(ctx, gen)
    ctx.step("N_k histogram and hub value against distance to the centre")
    figs, more = _histogram_and_scatter(ctx, gen)
    numbers.update(more)
    table, rows, info = _sampling(ctx)
    numbers.update(info)
    for r in rows:
        for key in ("frechet", "precision", "recall", "latent_norm"):
            numbers[f"{r['prior']}: {key}"] = r[key]
    fig = quality_diversity_figure(rows, f"{N_SAMPLES} GAN samples per latent prior (mnist-gan)")
    qd = ctx.save_figure(fig, "quality-diversity", "quality against diversity per latent prior")
    claims = section_claims(numbers, rows)
    by = {r["prior"]: r for r in rows}
    rand, hub50, matched = by["random N(0, I)"], by[CLAIMED], by["norm-matched to N_5 >= 50"]
    s2, s512 = numbers["k-skewness, k=5, d=2"], numbers["k-skewness, k=5, d=512"]
    verdict = (
        f"k-skewness {s2:.2f} at d = 2 and {s512:.2f} at d = 512; hubs are central "
        f"(Spearman {numbers['Spearman(N_5, distance to centre), d=512']:.2f}). "
        f"Hub prior (N_5 >= 50) vs random at n = {N_SAMPLES}: Fréchet {hub50['frechet']:.1f} vs "
        f"{rand['frechet']:.1f}, precision {hub50['precision']:.2f} vs {rand['precision']:.2f}, "
        f"recall {hub50['recall']:.2f} vs {rand['recall']:.2f} (GAN latents; norm-matched "
        f"control: Fréchet {matched['frechet']:.1f}, precision {matched['precision']:.2f}, "
        f"recall {matched['recall']:.2f}). The hub prior's claim on this GAN: "
        + "; ".join(c.status for c in claims[2:])
        + " (see the claims table)"
    )
    return Section(
        name=ctx.name,
        title=TITLE,
        claim=(
            "In high dimension a few points (hubs) are among the k nearest neighbours of very "
            "many others and many points of none: the skewness of the k-occurrence N_k grows "
            "with d, and hubs lie near the centre. Hub-prior sampling (keep latents with "
            "N_k >= t within a pool of 10,000) is claimed to raise sample quality over random "
            "latents with less diversity loss than the truncation trick."
        ),
        method=(
            f"{N_POINTS:,} i.i.d. N(0, I) points per dimension, exact k-NN (kexue.hubness.knn, "
            "self excluded); Hubness(k=(5, 20)) from one search. Sampling: the shipped digit "
            "GAN (kexue.hubness.DigitGenerator, 'mnist-gan') from "
            f"{N_SAMPLES} latents per prior (random with two seeds, whose gap is the noise "
            "floor of the claims; hub prior k = 5 in pools of 10,000; random directions at the "
            "hub latents' norms; truncated normal, psi = 1 to 2.5), scored by "
            "kexue.diffusion.DigitEvaluator."
        ),
        verdict=verdict,
        numbers=numbers,
        claims=claims,
        tables=[table],
        figures=[skew_fig, *figs, qd],
        notes=[
            "Hub-prior latents have a smaller norm than random ones (the table's mean |z|): "
            "hubs sit near the centre. The norm-matched row draws random directions at the "
            "hub latents' norms, to separate 'hubs' from 'short latents'.",
            "One seed and 500 samples per row: differences between rows can be within the "
            "sampling noise, and the gap between the two random seeds is a rough noise floor; "
            "docs/benchmarks/hubness.md has 1,000 samples per row and 3 seeds with paired "
            "differences for this GAN, and the diffusion model run as DDIM.",
            f"The GAN is small and trained on a CPU: its N(0, I) samples have a mean classifier "
            f"confidence of {rand['confidence']:.2f} (the issue's bar for recognisable digits "
            "is 0.9).",
        ],
    )
