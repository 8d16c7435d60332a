"""Few-step sampling on the shipped model -> docs/benchmarks/few_step.{json,md,png}.

kexue's DDPM, DDIM (even and trailing steps) and DPM-Solver-v3 (the shipped statistics) against
diffusers' DPM-Solver++ (2M, 3M, 2M SDE) and UniPC run on kexue's loop with the model's schedule,
all from the same initial noise, at K = 5, 10, 20 model calls:

1. quality: Fréchet distance of the shipped classifier's features to the held-out digits (with a
   bootstrap standard error), precision/recall (``DigitEvaluator``), and wall time per image
   relative to DDIM (trailing) at the same K;
2. convergence: RMS distance of each deterministic sampler's output to a 1,000-step DDIM
   solution of the same ODE from the same noise, against K (fewer samples).

Plans: ``smoke`` (seconds), ``default`` (what one core of a loaded 2-core CPU affords in
about 30 minutes: 64 samples per row at K = 5 and 10, 2 convergence samples; the counts are on
the page), ``cpu`` (a quiet 2-core CPU in about an hour and a half: 500 samples per row, as in
the issue that asked for this page, K = 5, 10, 20, 8 convergence samples; it took 59 minutes on
one thread), ``large`` (1,000 samples per row, K = 50 too, 64 convergence samples: minutes on
an accelerator with ``--device cuda``, about an hour and a half on one CPU thread),
``timing`` (re-times the main rows of the stored run at K <= 20: the median of 3
interleaved runs on 100 images each; the quality numbers are kept as measured) and ``k50``
(adds the K = 50 rows to a stored ``cpu`` run: same 500 noises; 37 minutes on one thread).

    python benchmarks/few_step.py [--plan smoke|default|cpu|timing|k50|large] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from _common import (
    RUN_FIELDS,
    Table,
    command_line,
    machine_line,
    main,
    markdown_table,
    stored_run,
)
from kexue.diffusion import DigitEvaluator, load_images, sample
from kexue.diffusion.solver_statistics import SolverStatistics
from kexue.experiments.diffusion import (
    ANALYTIC_FEW_STEP,
    DETERMINISTIC,
    IMAGE_SHAPE,
    KEXUE_FEW_STEP,
    PEER_FEW_STEP,
    few_step_images,
    few_step_moments,
    frechet_bootstrap_se,
    peer_scheduler,
    quality_row,
    shipped_model,
)

PLANS: dict[str, dict[str, Any]] = {
    "smoke": {"n": 8, "Ks": (2, 3), "conv_n": 2, "conv_Ks": (2, 4), "ref_steps": 20,
              "boot": 3, "real_n": 8},
    "default": {"n": 64, "Ks": (5, 10), "conv_n": 2, "conv_Ks": (5, 10, 20),
                "ref_steps": 1000, "boot": 50, "real_n": 64},
    "cpu": {"n": 500, "Ks": (5, 10, 20), "conv_n": 8, "conv_Ks": (5, 10, 20),
            "ref_steps": 1000, "boot": 100, "real_n": 500},
    "timing": {"timing_n": 100, "repeats": 3},
    "k50": {"n": 500, "Ks": (50,), "boot": 100, "extends": "cpu"},
    "smoke-extend": {"n": 8, "Ks": (4,), "boot": 3, "extends": "smoke"},
    # the Analytic rows added to a stored `large` run (same noise and sample count)
    "analytic": {"n": 1000, "rows": ANALYTIC_FEW_STEP, "boot": 200, "extends": "large"},
    "smoke-rows": {"n": 8, "rows": ANALYTIC_FEW_STEP[:1], "boot": 3, "extends": "smoke"},
    "large": {"n": 1000, "Ks": (5, 10, 20, 50), "conv_n": 64, "conv_Ks": (5, 10, 20, 50),
              "ref_steps": 1000, "boot": 200, "real_n": 1000},
}  # fmt: skip
ROWS = (*KEXUE_FEW_STEP, *PEER_FEW_STEP)
TIMED = ("DDIM trailing", "DPM-Solver-v3", "UniPC", "DPM-Solver++ 2M", "DPM-Solver++ 3M")
SEED = 0
MOMENT_IMAGES = 256  # digits behind the Analytic rows' moments (at the rows' steps only)


def measure_timing(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Re-time the main rows of an earlier run (its ``few_step.json``, kept as measured): the
    median of ``repeats`` runs per row on ``timing_n`` images, rows interleaved in every repeat
    so a change of load hits them all."""
    results = stored_run(args.out / "few_step.json", "timing", "quality_from")
    model = shipped_model(args.device)
    stats = SolverStatistics.from_pretrained("mnist5k")
    peer_scheduler("UniPC")
    x_T = torch.randn(
        (cfg["timing_n"], *IMAGE_SHAPE), generator=torch.Generator().manual_seed(SEED)
    )
    few_step_images(model, "DPM-Solver-v3", 2, x_T[:2], SEED + 1, stats)  # warm-up
    Ks = [K for K in results["config"]["Ks"] if K <= 20]  # the goal's steps; K = 50 is a reference
    times: dict[tuple[str, int], list[float]] = {(n, K): [] for n in TIMED for K in Ks}
    for _ in range(cfg["repeats"]):
        for K in Ks:
            for name in TIMED:
                start = time.perf_counter()
                few_step_images(model, name, K, x_T, SEED + 1, stats)
                times[(name, K)].append((time.perf_counter() - start) / cfg["timing_n"])
    results["timing"] = {
        "n": cfg["timing_n"], "repeats": cfg["repeats"], "threads": args.threads,
        "rows": [{"sampler": n, "K": K, "seconds_per_image": statistics.median(v)}
                 for (n, K), v in times.items()],
    }  # fmt: skip
    return results


class Setup(NamedTuple):
    model: Any
    stats: SolverStatistics
    data: Any
    evaluator: DigitEvaluator
    x_T: torch.Tensor  # the same initial noise for every row
    moments: Any  # for the Analytic rows (None when none is measured)
    moment_info: dict[str, Any]


def setup(cfg: dict[str, Any], args: argparse.Namespace, Ks: Any, rows: Any) -> Setup:
    model = shipped_model(args.device)
    data = load_images("mnist5k")
    peer_scheduler("UniPC")  # imports diffusers before any timing
    x_T = torch.randn((cfg["n"], *IMAGE_SHAPE), generator=torch.Generator().manual_seed(SEED))
    stats = SolverStatistics.from_pretrained("mnist5k")
    moments, info = None, {}
    if any(name in ANALYTIC_FEW_STEP for name in rows):
        count = min(MOMENT_IMAGES, cfg["n"])
        start = time.perf_counter()
        moments = few_step_moments(model, data.train, Ks, count, seed=SEED + 2)
        steps = moments.info["timesteps"]  # how many the estimate visited
        info = {"num_images": count, "steps": steps, "seconds": time.perf_counter() - start}
    evaluator = DigitEvaluator(reference=data.heldout)
    return Setup(model, stats, data, evaluator, x_T, moments, info)


def quality_rows(
    cfg: dict[str, Any], run: Setup, rows: Any = ROWS, Ks: Any = None
) -> list[dict[str, Any]]:
    """Fréchet distance, bootstrap error, precision, recall and time of every row at every K
    (default ``cfg['Ks']``; the same ``cfg['n']`` initial noises for all)."""
    model, stats, evaluator, x_T = run.model, run.stats, run.evaluator, run.x_T
    quality: list[dict[str, Any]] = []
    for K in Ks or cfg["Ks"]:
        for name in rows:
            start = time.perf_counter()
            images = few_step_images(model, name, K, x_T, SEED + 1, stats, moments=run.moments)
            seconds = time.perf_counter() - start
            fd, conf, _, prec, rec = quality_row(evaluator, images)
            se = frechet_bootstrap_se(evaluator, images, cfg["boot"])
            quality.append({"sampler": name, "K": K, "frechet": fd, "frechet_se": se,
                            "precision": prec, "recall": rec, "confidence": conf,
                            "seconds_per_image": seconds / cfg["n"]})  # fmt: skip
            print(f"K={K} {name}: Fréchet {fd:.1f} ± {se:.1f}, {seconds:.0f} s", flush=True)
    return quality


def measure_extension(plan: str, cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Add rows to an earlier run of plan ``cfg['extends']`` (its ``few_step.json``, kept as
    measured): every row at new steps ``cfg['Ks']``, or the rows ``cfg['rows']`` at the stored
    steps; same sample count, same initial noise."""
    previous = args.out / "few_step.json"
    results = stored_run(previous, plan, "quality_from")
    if results["config"].get("n") != cfg["n"]:
        raise SystemExit(
            f"--plan {plan} extends a --plan {cfg['extends']} run of {cfg['n']} samples per row; "
            f"{previous} has {results['config'].get('n')} (re-run --plan {cfg['extends']} first)"
        )
    if "timing" in results:
        results["timing"].setdefault("made", {k: results.get(k) for k in RUN_FIELDS})
    start, load = time.perf_counter(), os.getloadavg()[0]
    names = cfg.get("rows", ROWS)
    Ks = cfg.get("Ks") or results["config"]["Ks"]
    run = setup(cfg, args, Ks, names)
    rows = quality_rows(cfg, run, names, Ks)
    new = {(r["sampler"], r["K"]) for r in rows}
    results["quality"] = [r for r in results["quality"] if (r["sampler"], r["K"]) not in new]
    results["quality"] += rows
    results["config"]["Ks"] = sorted(set(results["config"]["Ks"]) | set(Ks))
    if run.moment_info:
        results["moments"] = run.moment_info
    results.setdefault("extensions", []).append(
        {"plan": plan, "Ks": sorted(Ks), "rows": list(names) if "rows" in cfg else None,
         "command": command_line(), "date": time.strftime("%Y-%m-%d"),
         "seconds": time.perf_counter() - start, "threads": args.threads,
         "load_average": [load, os.getloadavg()[0]]}
    )  # fmt: skip
    return results


def measure(plan: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    cfg = PLANS[plan]
    if plan == "timing":
        return measure_timing(cfg, args)
    if "extends" in cfg:
        return measure_extension(plan, cfg, args)
    run = setup(cfg, args, cfg["Ks"], ROWS)
    quality = quality_rows(cfg, run)
    model, stats, data, evaluator, x_T = run[:5]
    real = quality_row(evaluator, data.train[: cfg["real_n"]])
    conv_x = x_T[: cfg["conv_n"]].to(args.device)
    start = time.perf_counter()
    reference = sample(model, model.schedule, conv_x.shape, steps=cfg["ref_steps"], eta=0.0,
                       x_T=conv_x, progress=False).cpu()  # fmt: skip
    ref_seconds = time.perf_counter() - start
    convergence: list[dict[str, Any]] = []
    for name in DETERMINISTIC:
        for K in cfg["conv_Ks"]:
            out = few_step_images(model, name, K, conv_x.cpu(), SEED + 1, stats)
            rms = float((out.double() - reference.double()).pow(2).mean().sqrt())
            convergence.append({"sampler": name, "K": K, "rms": rms})
    return {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "device": str(args.device),
        "threads": args.threads,
        "quality": quality,
        "real": {"frechet": real[0], "precision": real[3], "recall": real[4]},
        "convergence": convergence,
        "reference_seconds": ref_seconds,
        "statistics": dict(stats.info),
        "moments": run.moment_info,
    }


def _plot(results: dict[str, Any], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in DETERMINISTIC:
        pts = [(r["K"], r["rms"]) for r in results["convergence"] if r["sampler"] == name]
        style = "o-" if name in KEXUE_FEW_STEP else "s--"
        ax.plot(*zip(*pts, strict=True), style, label=name, lw=1.2, ms=4)
    cfg = results["config"]
    ax.set(xscale="log", yscale="log", xlabel="model calls K",
           ylabel=f"RMS distance to the {cfg['ref_steps']}-step DDIM solution",
           title=f"Convergence to the ODE ({cfg['conv_n']} samples, same noise)")  # fmt: skip
    ax.set_xticks(cfg["conv_Ks"], [str(k) for k in cfg["conv_Ks"]])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = "few-step-convergence.png"
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return name


def goals(results: dict[str, Any]) -> list[str]:
    """The issue's goals, evaluated on the measured numbers."""
    by = {(r["sampler"], r["K"]): r for r in results["quality"]}
    lines = []
    for K in (5, 10):
        if not any(k == K for _, k in by):
            continue
        kexue = min(
            (n for n in KEXUE_FEW_STEP if (n, K) in by), key=lambda n: by[(n, K)]["frechet"]
        )
        peer = min((n for n in PEER_FEW_STEP if (n, K) in by), key=lambda n: by[(n, K)]["frechet"])
        a, b = by[(kexue, K)], by[(peer, K)]
        met = a["frechet"] <= b["frechet"]
        lines.append(
            f"K = {K}: kexue's best is {kexue} at {a['frechet']:.1f} ± {a['frechet_se']:.1f}, "
            f"the best of DPM-Solver++ (2M, 3M, 2M SDE) and UniPC is {peer} at "
            f"{b['frechet']:.1f} ± {b['frechet_se']:.1f}: goal (at or below) "
            f"**{'met' if met else 'not met'}**"
            + ("" if abs(a["frechet"] - b["frechet"]) > 2 * max(a["frechet_se"], b["frechet_se"])
               else " (within two bootstrap errors: not resolved at this sample size)")
        )  # fmt: skip
    K_max = max(results["config"]["Ks"])
    if K_max > 10 and any(k == 10 for _, k in by):
        ode = [by[(n, K_max)]["frechet"] for n in DETERMINISTIC]
        best10 = min((by[(n, 10)]["frechet"], n) for n in PEER_FEW_STEP)
        lines.append(
            f"The ODE's own limit: at K = {K_max} the deterministic solvers score "
            f"{min(ode):.1f} to {max(ode):.1f}; "
            + (
                f"{best10[1]} at K = 10 ({best10[0]:.1f}) is below that range, where the "
                "ODE solvers have converged, so no ODE solver reaches it on this model"
                if best10[0] < min(ode)
                else "the best peer at K = 10 is not below it"
            )
        )
    timed = results.get("timing")
    Ks = results["config"]["Ks"]
    if timed:
        by = {(r["sampler"], r["K"]): r for r in timed["rows"]}
        Ks = sorted({r["K"] for r in timed["rows"]})
    ratios = [
        by[("DPM-Solver-v3", K)]["seconds_per_image"]
        / by[("DDIM trailing", K)]["seconds_per_image"]
        for K in Ks
    ]
    worst = max(ratios)
    how = (
        f"median of {timed['repeats']} interleaved runs on {timed['n']} images, see the timing "
        "table"
        if timed
        else "one run per row on a shared machine: indicative only, see the load average above"
    )
    lines.append(
        f"Time per step, DPM-Solver-v3 / DDIM (same K, wall time of the whole run incl. the "
        f"per-trajectory plan): {', '.join(f'{r:.2f}x' for r in ratios)} at K = "
        f"{', '.join(map(str, Ks))}: goal (within 1.1x) "
        f"**{'met' if worst <= 1.1 else 'not met'}** ({how})"
    )
    return lines


def timing_lines(results: dict[str, Any]) -> list[str]:
    timed = results.get("timing")
    if not timed:
        return []
    Ks = sorted({r["K"] for r in timed["rows"]})
    by = {(r["sampler"], r["K"]): r["seconds_per_image"] for r in timed["rows"]}
    rows = [[n, *[by[(n, K)] / by[("DDIM trailing", K)] for K in Ks]] for n in TIMED]
    rows.append(["DDIM trailing, ms per image", *[1e3 * by[("DDIM trailing", K)] for K in Ks]])
    made = timed.get("made") or results
    machine = made["machine"]
    return [
        "## Time per image against DDIM",
        "",
        f"Produced by `{made['command']}` on {made['date']} "
        f"({timed['threads']} thread(s); load average {machine['load_average'][0]:.2f} before, "
        f"{machine['load_average'][1]:.2f} after): the median of {timed['repeats']} runs per "
        f"row on {timed['n']} images, the rows interleaved in every repeat, each sampler's whole "
        "call (its per-trajectory plan included). This table replaces the single-run time "
        "column of the quality tables in the goals.",
        "",
        markdown_table(
            Table("time / DDIM trailing, same K", ["sampler", *[f"K = {K}" for K in Ks]], rows)
        ),
        "",
    ]


def render(results: dict[str, Any], out: Path) -> str:
    cfg, info = results["config"], results["statistics"]
    plot = _plot(results, out)
    made = results.get("quality_from") or results
    lines = [
        "# Few-step sampling: kexue's samplers and DPM-Solver-v3 against DPM-Solver++ and UniPC",
        "",
        f"Quality and convergence produced by `{made['command']}` on {made['date']} in "
        f"{made['seconds'] / 60:.0f} minutes ({results['device']}, {results['threads']} "
        "thread(s)). " + machine_line(made["machine"]),
        "",
        *[
            (
                f"The rows {', '.join(e['rows'])} (at K = {', '.join(map(str, e['Ks']))})"
                if e.get("rows")
                else f"Rows at K = {', '.join(map(str, e['Ks']))}"
            )
            + f" added by `{e['command']}` on "
            f"{e['date']} in {e['seconds'] / 60:.0f} minutes ({e['threads']} thread(s); load "
            f"average {e['load_average'][0]:.2f} before, {e['load_average'][1]:.2f} after), "
            "same noise and sample count"
            + (
                "; their time column, on another thread count, does not compare with DDIM's.\n"
                if e["threads"] != results["threads"]
                else ".\n"
            )
            for e in results.get("extensions", [])
        ],
        f"**Sample counts: {cfg['n']} samples per row** "
        + (
            "(the goal is 1,000; this run had no GPU, so Fréchet distances are biased upwards by "
            "the smaller sample: compare rows, and pages only at equal counts), "
            if cfg["n"] < 1000
            else ""
        )
        + "the same initial "
        f"noise for every row; {cfg['real_n']} real training digits score "
        f"{results['real']['frechet']:.1f}. "
        + (
            f"Not run in this plan (CPU time): K = "
            f"{', '.join(str(k) for k in (5, 10, 20, 50) if k not in cfg['Ks'])} in the quality "
            "tables. "
            if set(cfg["Ks"]) != {5, 10, 20, 50}
            else ""
        )
        + (
            f"This is the `large` plan, run on {results['device']} ({results['threads']} "
            "thread(s)): no GPU was lent to this session."
            if made.get("plan") == "large" and results["device"] == "cpu"
            else "The `large` plan (`--plan large`, best with `--device cuda`) runs 1,000 samples "
            "per row at K = 5, 10, 20 and 50."
        ),
        "",
        "Rows: kexue's `sample` with `eta = 1` (DDPM) and `eta = 0` (DDIM) on even, quadratic or "
        "trailing steps; "
        + (
            "the same on trailing steps with Analytic-DPM's optimal reverse variance "
            f"(`optimal_variance`; moments of {results['moments']['num_images']} training "
            f"digits at the {results['moments']['steps']} steps these trajectories visit, "
            f"{results['moments']['seconds']:.0f} s); "
            if results.get("moments")
            else ""
        )
        + '`solver="dpm-solver-v3"` with the shipped statistics '
        f"(`SolverStatistics.from_pretrained('mnist5k')`: {info.get('num_images')} digits x "
        f"{info.get('grid')} grid steps, `s, b` zeroed at steps {info.get('s_b_zeroed_at')}); "
        "diffusers' `DPMSolverMultistepScheduler` (2M, 3M, 2M SDE) and "
        "`UniPCMultistepScheduler` (order 3) with `timestep_spacing='trailing'`, "
        "passed as `sample(..., solver=<scheduler>)` (kexue gives them the model's betas and "
        "calls the model at diffusers' timestep + 1). diffusers' DDIM with trailing spacing is "
        "not a separate row: it is the same update on the same steps as kexue's DDIM trailing "
        "(equal to 1e-5, `tests/diffusion/test_sampler_solvers.py`).",
        "",
    ]
    order = {name: i for i, name in enumerate(ROWS)}
    for K in cfg["Ks"]:
        rows = [r for r in results["quality"] if r["K"] == K]
        rows.sort(key=lambda r: order.get(r["sampler"], len(order)))
        ddim = next(r for r in rows if r["sampler"] == "DDIM trailing")["seconds_per_image"]
        table = Table(
            f"K = {K} model calls",
            ["sampler", "Fréchet", "± (bootstrap)", "precision", "recall", "time / DDIM"],
            [
                [
                    r["sampler"],
                    r["frechet"],
                    r["frechet_se"],
                    r["precision"],
                    r["recall"],
                    r["seconds_per_image"] / ddim,
                ]
                for r in rows
            ],
        )
        lines += [f"## {table.caption}", "", markdown_table(table), ""]
    lines += timing_lines(results)
    lines += ["## Goals, as measured", ""] + [f"- {g}" for g in goals(results)] + [""]
    lines += [
        "## Convergence to the ODE solution",
        "",
        f"RMS distance (pixels in [-1, 1]) of each deterministic sampler's output to a "
        f"{cfg['ref_steps']}-step DDIM solution from the same noise, {cfg['conv_n']} samples "
        f"(the reference took {results['reference_seconds']:.0f} s).",
        "",
        f"![convergence]({plot})",
        "",
        markdown_table(
            Table(
                "RMS distance to the reference",
                ["sampler", *[f"K = {k}" for k in cfg["conv_Ks"]]],
                [
                    [name, *[r["rms"] for r in results["convergence"] if r["sampler"] == name]]
                    for name in DETERMINISTIC
                ],
            )
        ),
        "",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)


if __name__ == "__main__":
    main("few_step", measure, render, plans=tuple(PLANS), description=__doc__,
         add_arguments=add_arguments)  # fmt: skip
