"""Tour section ``optimal-variance``: Analytic-DPM's optimal reverse variance on the shipped model.

Small in-section runs (CPU budget of the tour): the moments on the kept steps of the
trajectories shown, the NLL bound on a few held-out digits, and sample quality on ~100 samples
per sampler. docs/benchmarks/optimal_variance.md has the larger runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import matplotlib.pyplot as plt
import torch

from kexue.diffusion import (
    DigitEvaluator,
    estimate_moments,
    image_grid,
    load_images,
    nll_bpd,
    sample,
)
from kexue.experiments.diffusion import (
    compared_samplers,
    nll_variances,
    plot_sbar2_estimates,
    shipped_model,
)
from kexue.tour.report import Claim, Section, Table
from kexue.tour.runner import SectionContext

if TYPE_CHECKING:
    from kexue.diffusion.schedule import NoiseSchedule

TITLE = "Optimal reverse variance and NLL in bits/dim (kexue.diffusion, Analytic-DPM)"
NLL_KS = (5, 10, 20, 50)
QUALITY_KS = (5, 10, 20)
MOMENT_IMAGES = 16
NLL_IMAGES = 16
N_SCORED = 80


def _gamma_figure(ctx: SectionContext, moments, steps: list[int]):
    idx = torch.tensor(steps) - 1
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].plot(steps, moments.Gamma[idx], "k.-")
    axes[0].axhline(1.0, color="grey", ls="--", lw=0.8)
    axes[0].set(
        xlabel="step t",
        ylabel="Gamma_t = E||eps_theta(x_t, t)||^2 / d",
        title="Gamma_t of the shipped model",
    )
    plot_sbar2_estimates(axes[1], moments, steps)
    fig.tight_layout()
    return ctx.save_figure(
        fig, "gamma", f"Gamma_t and the estimates of sbar_t^2 ({moments.num_images} images per t)"
    )


def _tally(wins: list[bool]) -> str:
    return "holds" if all(wins) else "partly" if any(wins) else "does not hold"


def section_claims(numbers: Mapping[str, float]) -> list[Claim]:
    """The section's claims, each verdict computed from the measured ``numbers`` (the keys
    :func:`run` writes): the bound at every K of ``NLL_KS``, the Fréchet distance at every K
    of ``QUALITY_KS`` (lower is better)."""
    nll = lambda name, K: numbers[f"NLL K={K} {name}"]  # noqa: E731
    fd = lambda name, K: numbers[f"{name} K={K} Fréchet"]  # noqa: E731
    best_fixed = {K: min(nll("DDPM-small", K), nll("DDPM-large", K)) for K in NLL_KS}
    claims = [
        Claim(
            "The optimal variance tightens the NLL bound against DDPM's fixed variances",
            _tally([nll("Analytic-DDPM", K) < best_fixed[K] for K in NLL_KS]),
            "; ".join(
                f"K = {K}: {nll('Analytic-DDPM', K):.2f} against {best_fixed[K]:.2f} bits/dim"
                for K in NLL_KS
            ),
        )
    ]
    for fixed in ("DDPM", "DDIM"):
        optimal = f"Analytic-{fixed}"
        claims.append(
            Claim(
                f"The optimal variance improves {fixed} samples at few steps (Fréchet distance, "
                f"{N_SCORED} samples)",
                _tally([fd(optimal, K) < fd(fixed, K) for K in QUALITY_KS]),
                "; ".join(
                    f"K = {K}: {fd(optimal, K):.1f} against {fd(fixed, K):.1f}" for K in QUALITY_KS
                ),
            )
        )
    return claims


def run(ctx: SectionContext) -> Section:
    model = shipped_model()
    # the shipped model carries its schedule
    schedule, info = cast("NoiseSchedule", model.schedule), model.info
    data = load_images("mnist5k")
    gen = torch.Generator().manual_seed(ctx.seed)
    ctx.step("moments", total=1 + len(NLL_KS) + len(QUALITY_KS) + 1)
    grid = torch.unique(torch.logspace(0, 3, 25).round().long()).tolist()
    kept = {K: schedule.trajectory(K) for K in sorted(set(NLL_KS) | set(QUALITY_KS))}
    steps = sorted(set(grid).union(*kept.values()))
    moments = estimate_moments(
        model,
        schedule,
        data.train,
        num_images=MOMENT_IMAGES,
        timesteps=steps,
        generator=gen,
        progress=False,
    )
    ctx.advance()
    gamma_fig = _gamma_figure(ctx, moments, steps)

    held = data.heldout[:NLL_IMAGES]
    nll_rows = []
    for K in NLL_KS:
        ctx.step(f"NLL bound, K = {K}")
        res = nll_bpd(
            model,
            schedule,
            held,
            steps=K,
            generator=gen,
            progress=False,
            variance=nll_variances(moments, schedule, K),
        )
        assert isinstance(res, dict)  # several variances, one result each
        nll_rows.append([K, *(res[n].bpd for n in ("DDPM-small", "DDPM-large", "Analytic-DDPM"))])
        ctx.advance()

    evaluator = DigitEvaluator(reference=data.heldout)
    q_rows: list[list[Any]]  # sampler, K, quality numbers
    q_rows, grids = [], {}
    for K in QUALITY_KS:
        ctx.step(f"sampling and scoring {N_SCORED} digits per sampler, K = {K}")
        x_T = torch.randn((N_SCORED, 1, 28, 28), generator=gen)
        for name, eta, var in compared_samplers(moments, schedule, K):
            images = sample(
                model,
                schedule,
                x_T.shape,
                steps=K,
                eta=eta,
                variance=var,
                x_T=x_T,
                generator=torch.Generator().manual_seed(K),
                progress=False,
            )
            assert isinstance(images, torch.Tensor)  # no trajectory asked for
            q = evaluator(images)
            q_rows.append([name, K, q.frechet, q.confidence, q.precision, q.recall])
            if K == 10:
                grids[name] = images[:16]
        ctx.advance()

    ctx.step("figures")
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for col, name in enumerate(("DDPM-small", "DDPM-large", "Analytic-DDPM"), start=1):
        ax.plot(NLL_KS, [r[col] for r in nll_rows], "o-", label=name)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="number of steps K",
        ylabel="NLL bound (bits/dim)",
        title=f"NLL bound vs K ({NLL_IMAGES} held-out digits)",
    )
    ax.legend(fontsize=8)
    nll_fig = ctx.save_figure(fig, "nll", "negative ELBO in bits/dim against the number of steps")
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name in ("DDPM", "Analytic-DDPM", "DDIM", "Analytic-DDIM"):
        ax.plot(QUALITY_KS, [r[2] for r in q_rows if r[0] == name], "o-", label=name)
    ax.set(
        xscale="log",
        xlabel="number of steps K",
        ylabel=f"Fréchet distance (classifier features, n = {N_SCORED})",
        title="Sample quality vs K (lower is better)",
    )
    ax.legend(fontsize=8)
    quality_fig = ctx.save_figure(fig, "quality", "Fréchet distance against the number of steps")
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.9))
    for ax, name in zip(axes, ("DDPM", "Analytic-DDPM", "DDIM", "Analytic-DDIM"), strict=True):
        ax.imshow(image_grid(grids[name], nrow=4), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{name}, K = 10", fontsize=10)
        ax.axis("off")
    fig.suptitle("K = 10, the same initial noise in every panel: fixed vs optimal variance")
    grid_fig = ctx.save_figure(fig, "grids", "K = 10 samples, DDPM vs Analytic-DDPM side by side")
    ctx.advance()

    nll_by = {r[0]: r for r in nll_rows}
    q_by = {(r[0], r[1]): r for r in q_rows}
    n10 = nll_by[10]
    verdict = (
        f"K = 10: NLL bound {n10[3]:.2f} bits/dim with the optimal variance against "
        f"{n10[1]:.2f} (small) and {n10[2]:.2f} (large); Fréchet distance "
        f"{q_by[('Analytic-DDPM', 10)][2]:.1f} vs {q_by[('DDPM', 10)][2]:.1f} (DDPM) and "
        f"{q_by[('Analytic-DDIM', 10)][2]:.1f} vs {q_by[('DDIM', 10)][2]:.1f} (DDIM), "
        f"{N_SCORED} samples each (noisy at this size)."
    )
    numbers: dict[str, Any] = {  # floats, and the model's step (or None)
        f"NLL K={r[0]} {n}": v
        for r in nll_rows
        for n, v in zip(("DDPM-small", "DDPM-large", "Analytic-DDPM"), r[1:], strict=True)
    }
    numbers.update({f"{r[0]} K={r[1]} Fréchet": r[2] for r in q_rows})
    numbers["model step"] = info.get("step")
    return Section(
        name=ctx.name,
        title=TITLE,
        claim=(
            "Replacing the fixed reverse variance by the optimal one, sigma^2 + gamma^2 sbar_t^2 "
            "with sbar_t^2 = E Var[x_0 | x_t] estimated once from the trained model (no "
            "retraining), tightens the likelihood bound and improves samples at few steps, for "
            "DDPM and DDIM alike."
        ),
        method=(
            f"The shipped model (step {info.get('step')}). Moments from {MOMENT_IMAGES} training "
            f"digits at {len(steps)} steps (the kept steps of every trajectory shown plus a "
            f"log grid); NLL bound (discretised Gaussian decoder, 8-bit) on {NLL_IMAGES} held-out "
            f"digits; {N_SCORED} samples per sampler and K, same initial noise for all four, "
            "scored with the shipped digit classifier against the 1,000 held-out digits. Every "
            "sampler ends with the mean only and caps the second-to-last variance."
        ),
        verdict=verdict,
        numbers=numbers,
        claims=section_claims(numbers),
        tables=[
            Table(
                f"NLL bound (bits/dim), {NLL_IMAGES} held-out digits, even trajectory",
                ["K", "DDPM-small", "DDPM-large", "Analytic-DDPM"],
                nll_rows,
            ),
            Table(
                f"Sample quality, {N_SCORED} samples each",
                ["sampler", "K", "Fréchet", "confidence", "precision", "recall"],
                q_rows,
            ),
        ],
        figures=[gamma_fig, nll_fig, quality_fig, grid_fig],
        notes=[
            "Small runs for the tour's time budget; see docs/benchmarks/optimal_variance.md for "
            "K up to 1000, the DP trajectory, the SN/NPR heads and the estimator standard errors."
        ],
    )
