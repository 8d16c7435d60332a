"""Tour section ``diffusion``: the shipped MNIST-5k model sampled with DDPM and DDIM, and with
few model calls (DDIM, UniPC, DPM-Solver-v3) side by side."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import matplotlib.pyplot as plt
import torch

from kexue.diffusion import DigitEvaluator, image_grid, load_images, sample
from kexue.diffusion.solver_statistics import SolverStatistics
from kexue.experiments.diffusion import (
    IMAGE_SHAPE,
    QUALITY_HEADERS,
    few_step_images,
    quality_row,
    shipped_model,
)
from kexue.tour.report import Claim, Section, Table
from kexue.tour.runner import SectionContext

if TYPE_CHECKING:
    from kexue.diffusion.schedule import NoiseSchedule

TITLE = "Diffusion models: DDPM, DDIM and few-step solvers (kexue.diffusion)"
N_SCORED = 200  # per sampler and K
N_FEW = 100  # per few-step sampler and K
FEW_KS = (5, 10)
FEW_SAMPLERS = ("DDIM trailing", "UniPC", "DPM-Solver-v3")
FEW_LABELS = {"DDIM trailing": "DDIM", "UniPC": "UniPC", "DPM-Solver-v3": "DPM-Solver-v3"}


def strip_figure(rows: Sequence[tuple[str, torch.Tensor]], nrow: int, width: float = 9.0):
    """One titled image grid per row, each as wide as the figure and as tall as its grid (no
    empty bands between rows)."""
    grids = [image_grid(images, nrow=nrow) for _, images in rows]
    heights = [width * g.shape[0] / g.shape[1] for g in grids]
    fig, axes = plt.subplots(len(rows), 1, figsize=(width, sum(heights) + 0.4 * len(rows)),
                             gridspec_kw={"height_ratios": heights})  # fmt: skip
    for ax, (label, _), grid in zip(axes, rows, grids, strict=True):
        ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
        ax.set_title(label, fontsize=10, loc="left")
        ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.97, bottom=0.01, hspace=0.3)
    return fig


def _grid_figure(ctx: SectionContext, model, schedule, gen: torch.Generator):
    rows = [("DDPM, K = 1000", None, 1.0, 8), ("DDPM, K = 100", 100, 1.0, 16),
            ("DDPM, K = 10", 10, 1.0, 16), ("DDIM, K = 10", 10, 0.0, 16)]  # fmt: skip
    drawn = []
    for label, steps, eta, n in rows:
        ctx.step(f"sample grid: {label}")
        images = sample(
            model, schedule, (n, 1, 28, 28), steps=steps, eta=eta, generator=gen, progress=False
        )
        assert isinstance(images, torch.Tensor)  # no trajectory asked for
        drawn.append((label, images))
    fig = strip_figure(drawn, nrow=8)
    return ctx.save_figure(
        fig, "samples", "samples of the shipped model (each block: a sampler and K; trailing steps)"
    )


def _rebuild_figure(ctx: SectionContext, model, schedule, digits: torch.Tensor, gen):
    """x_0 -> x_t (demolish, one jump) -> DDIM back to 0 in 20 steps (rebuild), several t."""
    ts = [100, 300, 500, 700, 900]
    fig, axes = plt.subplots(3, len(ts), figsize=(2.2 * len(ts), 6.4))
    for col, t in enumerate(ts):
        eps = torch.randn(digits.shape, generator=gen)
        x_t = schedule.add_noise(digits, eps, t)
        steps = sorted({max(1, round(t * k / 20)) for k in range(1, 21)})
        rebuilt = sample(
            model, schedule, digits.shape, steps=steps, eta=0.0, x_T=x_t, progress=False
        )
        for row, (images, name) in enumerate(
            ((digits, "x_0"), (x_t, f"x_{t}"), (rebuilt, "rebuilt"))
        ):
            ax = axes[row, col]
            ax.imshow(image_grid(images, nrow=3), cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{name} (t = {t})" if row else name, fontsize=9)
            ax.axis("off")
    fig.suptitle("Demolish (one jump to x_t) and rebuild (DDIM, 20 steps from t to 0)")
    fig.tight_layout()
    return ctx.save_figure(fig, "rebuild", "demolish-then-rebuild on held-out digits")


def _few_step_figure(ctx: SectionContext, grids: Mapping[tuple[str, int], torch.Tensor]):
    """K = 5 and K = 10 grids of DDIM, UniPC and DPM-Solver-v3 from the same noise, one panel
    each (rows: K; columns: samplers)."""
    first = image_grid(grids[(FEW_SAMPLERS[0], FEW_KS[0])], nrow=4)
    panel = 3.2 * first.shape[0] / first.shape[1] + 0.4  # as tall as a grid, plus its title
    fig, axes = plt.subplots(len(FEW_KS), len(FEW_SAMPLERS), figsize=(9.6, panel * len(FEW_KS)))
    for r, K in enumerate(FEW_KS):
        for c, name in enumerate(FEW_SAMPLERS):
            ax = axes[r, c]
            ax.imshow(image_grid(grids[(name, K)], nrow=4), cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{FEW_LABELS[name]}, K = {K}", fontsize=10)
            ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.94, bottom=0.01, wspace=0.05, hspace=0.12)
    return ctx.save_figure(
        fig, "few-step", "K = 5 and 10 model calls, the same initial noise in every panel"
    )


def section_claims(numbers: Mapping[str, float]) -> list[Claim]:
    """The section's claims, each verdict computed from the measured ``numbers`` (the keys
    :func:`run` writes)."""
    fd = lambda name, K: numbers[f"{name} K={K} Fréchet"]  # noqa: E731
    real = numbers["real training digits K=- Fréchet"]
    conf = numbers["DDIM K=25 confidence"]
    claims = [
        Claim(
            "The shipped model generates recognisable digits (DDIM, K = 25)",
            "holds" if conf >= 0.9 else "partly" if conf >= 0.8 else "does not hold",
            f"classifier confidence {conf:.2f}; Fréchet {fd('DDIM', 25):.1f} against "
            f"{real:.1f} for real digits",
        ),
        Claim(
            "At K = 10, deterministic DDIM (eta = 0) beats DDPM (eta = 1)",
            "holds" if fd("DDIM", 10) < fd("DDPM", 10) else "does not hold",
            f"Fréchet {fd('DDIM', 10):.1f} (DDIM) against {fd('DDPM', 10):.1f} (DDPM)",
        ),
        Claim(
            "Trailing steps beat even steps at K = 5 with the same DDIM update",
            "holds" if fd("DDIM trailing", 5) < fd("DDIM even", 5) else "does not hold",
            f"Fréchet {fd('DDIM trailing', 5):.1f} (trailing) against "
            f"{fd('DDIM even', 5):.1f} (even)",
        ),
    ]
    wins = [fd("DPM-Solver-v3", K) <= fd("UniPC", K) for K in FEW_KS]
    claims.append(
        Claim(
            "DPM-Solver-v3 with the shipped statistics reaches UniPC's quality at K = 5 and 10",
            "holds" if all(wins) else "partly" if any(wins) else "does not hold",
            "; ".join(
                f"K = {K}: {fd('DPM-Solver-v3', K):.1f} (v3) against {fd('UniPC', K):.1f} (UniPC)"
                for K in FEW_KS
            ),
        )
    )
    return claims


def run(ctx: SectionContext) -> Section:
    model = shipped_model()
    # the shipped model carries its schedule
    schedule, info = cast("NoiseSchedule", model.schedule), model.info
    gen = torch.Generator().manual_seed(ctx.seed)
    ctx.step("sample grids", total=4 + 1 + 3 + 1)
    grids = _grid_figure(ctx, model, schedule, gen)
    ctx.advance(4)
    data = load_images("mnist5k")
    ctx.step("demolish and rebuild")
    rebuild = _rebuild_figure(ctx, model, schedule, data.heldout[:9], gen)
    ctx.advance()
    evaluator = DigitEvaluator(reference=data.heldout)
    rows: list[list[Any]] = []  # sampler, K, quality numbers
    for name, K, eta in (("DDPM", 10, 1.0), ("DDIM", 10, 0.0), ("DDIM", 25, 0.0)):
        ctx.step(f"scoring {N_SCORED} samples: {name}, K = {K}")
        images = sample(
            model,
            schedule,
            (N_SCORED, 1, 28, 28),
            steps=K,
            eta=eta,
            generator=gen,
            progress=False,
        )
        assert isinstance(images, torch.Tensor)  # no trajectory asked for
        rows.append([name, K, *quality_row(evaluator, images)])
        ctx.advance()
    real = quality_row(evaluator, data.train[:N_SCORED])
    rows.append(["real training digits", "-", *real])
    table = Table(
        f"Sample quality, {N_SCORED} samples each, against the 1,000 held-out digits "
        "(classifier features; see docs/benchmarks/diffusion.md for larger samples)",
        ["sampler", "K", *QUALITY_HEADERS],
        rows,
    )

    ctx.step(f"few-step samplers: {N_FEW} samples each at K = {FEW_KS}")
    statistics = SolverStatistics.from_pretrained("mnist5k")
    x_T = torch.randn((N_FEW, *IMAGE_SHAPE), generator=torch.Generator().manual_seed(ctx.seed + 1))
    few_rows: list[list[Any]]  # sampler, K, quality numbers
    few_rows, few_grids = [], {}
    for K in FEW_KS:
        for name in ("DDIM even", *FEW_SAMPLERS) if K == 5 else FEW_SAMPLERS:
            images = few_step_images(model, name, K, x_T, ctx.seed + 2, statistics)
            few_grids[(name, K)] = images[:16]
            few_rows.append([name, K, *quality_row(evaluator, images)])
    few_table = Table(
        f"Few model calls, {N_FEW} samples each from the same noise (DDIM: eta = 0; UniPC: "
        "diffusers' UniPCMultistepScheduler, order 3, trailing, run by kexue's sample; "
        "DPM-Solver-v3 with the shipped statistics; docs/benchmarks/few_step.md for more)",
        ["sampler", "K", *QUALITY_HEADERS],
        few_rows,
    )
    few_figure = _few_step_figure(ctx, few_grids)
    ctx.advance()

    numbers: dict[str, Any] = {
        f"{r[0]} K={r[1]} {h}": v
        for r in rows + few_rows
        for h, v in zip(table.headers[2:], r[2:], strict=True)
    }
    numbers.update({"training steps": info.get("step"), "parameters": model.num_parameters()})
    by = {(r[0], r[1]): r for r in rows}
    verdict = (
        f"at K = 10, DDIM's Fréchet distance is {by[('DDIM', 10)][2]:.1f} against DDPM's "
        f"{by[('DDPM', 10)][2]:.1f}; DDIM at K = 25: {by[('DDIM', 25)][2]:.1f} "
        f"(real digits: {real[0]:.1f}); at K = 5: "
        + ", ".join(f"{FEW_LABELS[n]} {numbers[f'{n} K=5 Fréchet']:.1f}" for n in FEW_SAMPLERS)
    )
    return Section(
        name=ctx.name,
        title=TITLE,
        claim=(
            "A U-Net trained with the summed-over-pixels DDPM loss generates recognisable "
            "digits; the same model samples with DDPM (eta = 1) or DDIM (eta = 0) on any "
            "trajectory, and with few model calls through higher-order ODE solvers (UniPC run "
            "on kexue's loop, DPM-Solver-v3 on statistics of the model itself)."
        ),
        method=(
            f"The shipped model ({model.num_parameters():,} parameters, {info.get('step')} steps "
            "on mnist5k's 4,000 training digits, EMA weights) sampled with kexue.diffusion.sample "
            "(default trailing steps T/K, ..., T). Quality is scored with the shipped digit "
            "classifier: Fréchet distance of its features to the held-out digits, mean "
            "confidence, label-histogram entropy (log 10 = 2.30 is balanced) and k-NN "
            "precision/recall."
        ),
        verdict=verdict,
        numbers=numbers,
        tables=[table, few_table],
        figures=[grids, rebuild, few_figure],
        notes=[
            f"Command that produced the model: {info.get('command', 'n/a')}",
            "Integer K spreads K model calls on trailing steps T/K, 2T/K, ..., T (sample's "
            "default since issue 12); the K = 10 and 25 rows used even steps 1, ..., T before.",
        ],
        claims=section_claims(numbers),
    )
