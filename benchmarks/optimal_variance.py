"""Benchmark of optimal reverse variances -> docs/benchmarks/optimal_variance.{json,md} (+ PNGs).

On the shipped MNIST-5k model, held-out digits:

1. Cost: ``estimate_moments`` over all T = 1000 steps against one training epoch (measured).
2. Estimator conditioning: Monte Carlo standard error per t of the Gamma, moment and MLE forms
   of ``sbar_t^2`` (formula and bootstrap over images), on MNIST-5k and on an exact testbed
   (a 784-d Gaussian mixture with the analytic eps-model, where the truth is known).
3. NLL bound in bits/dim for DDPM-large, DDPM-small, Analytic-DDPM (even and DP trajectory).
4. Sample quality (Fréchet distance, recognisability, precision/recall) of DDPM, DDIM,
   Analytic-DDPM, Analytic-DDIM and the SN/NPR heads; DDIM at more K to find where it reaches
   Analytic-DDIM's K = 10 quality; an ablation of the variance's details at K = 10.

Plans: ``smoke`` (about a minute; the slow test), ``quick`` (minutes), ``default`` (the committed
page, ~20 min on 2 CPU cores), ``claims`` (the K = 10 claims at n = 1,000, ~12 min; page
``optimal_variance_claims.md``), ``large`` (for an accelerator: ``--device cuda``). The sizes are
stated on the page.

    python benchmarks/optimal_variance.py [--plan ...] [--moments DIR] [--device cuda]
    python benchmarks/optimal_variance.py --render-only [--plan claims]   (page from its JSON)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from _common import Table, machine_line, main, markdown_table, wall_seconds
from kexue.diffusion import (
    DiffusionMoments,
    DigitEvaluator,
    estimate_moments,
    fixed_variance,
    image_grid,
    load_images,
    nll_bpd,
    optimal_trajectory,
    optimal_variance,
    train_variance_head,
)
from kexue.diffusion.moments import model_fingerprint
from kexue.experiments.diffusion import (
    FORMS,
    compared_samplers,
    decoder_variance,
    digit_mixture,
    first_true_step,
    forward_images_per_s,
    frechet_bootstrap_se,
    generate,
    log_interpolated_crossing,
    mixture_truth,
    nll_variances,
    plot_sbar2_estimates,
    quality_row,
    shipped_model,
    training_images_per_s,
)

_SIZES = ("batch", "train_steps", "truth_n", "moment_images", "nll_images", "nll_images_full_T",
          "nll_ks", "quality_n", "quality_ks", "ddim_extra_ks", "head_ks", "large_ks",
          "head_steps", "ablation_n", "fd_boot")  # fmt: skip
PLANS: dict[str, dict[str, Any]] = {
    name: dict(zip(_SIZES, values, strict=True))
    for name, values in {
        "default": (250, 20, 400, 64, 100, 25, (10, 25, 50, 100), 150, (10, 25, 50, 100), (200,),
                    (10, 25), (10, 25), 250, 150, 20),
        "large": (2000, 50, 400, 2000, 1000, 500, (10, 25, 50, 100), 1000,
                  (10, 25, 50, 100, 1000), (200, 400), (10, 25, 50), (10, 25), 2000, 1000, 30),
        "claims": (250, 20, 100, 64, 100, 0, (10,), 1000, (10,), (25, 50), (10,), (10,), 250,
                   150, 20),
        "quick": (250, 6, 50, 6, 12, 0, (10, 25), 60, (10, 25), (), (10,), (10,), 10, 60, 5),
        "smoke": (32, 1, 10, 2, 3, 0, (10,), 12, (10,), (), (10,), (10,), 2, 12, 2),
    }.items()
}  # fmt: skip

# Analytic-DPM (Bao, Li, Zhu, Zhang, ICLR 2022), CIFAR10 with the linear schedule: NLL bound
# (bits/dim) and FID at K = 10, 25, 50, 100, 200, 1000 steps, as published.
PAPER_KS = (10, 25, 50, 100, 200, 1000)
PAPER = {
    "NLL DDPM-small": (74.95, 24.98, 12.01, 7.08, 5.03, 3.73),
    "NLL DDPM-large": (6.99, 6.11, 5.44, 4.86, 4.39, 3.75),
    "NLL Analytic-DDPM": (5.47, 4.79, 4.38, 4.07, 3.84, 3.59),
    "FID DDIM": (21.31, 10.70, 7.74, 6.08, 5.07, 4.13),
    "FID Analytic-DDIM": (14.00, 5.81, 4.04, 3.55, 3.39, 3.74),
}
TESTBED_STEPS = (1, 2, 5, 10, 20, 50, 100, 150, 200, 300, 400, 500, 600, 700, 800, 900, 1000)
QUALITY_COLUMNS = ["sampler", "K", "n", "Fréchet", "± (boot.)", "confidence", "label entropy",
                   "precision", "recall"]  # fmt: skip
ABLATIONS = [
    ("Analytic-DDPM, default", 1.0, {}),
    ("Analytic-DDPM, no second-to-last cap", 1.0, {"cap_second_last": None}),
    ("Analytic-DDPM, no clipping", 1.0, {"clip": False}),
    ("Analytic-DDPM, Gamma form only", 1.0, {"kind": "analytic-gamma"}),
    ("Analytic-DDPM, MLE (imperfect mean)", 1.0, {"kind": "analytic-mle"}),
    ("Analytic-DDPM, per-dimension", 1.0, {"kind": "analytic-diag"}),
    ("Analytic-DDIM, no second-to-last cap", 0.0, {"cap_second_last": None}),
    ("DDPM, no second-to-last cap", 1.0, None),
]


def page_name(plan: str) -> str:
    return "optimal_variance" if plan == "default" else f"optimal_variance_{plan}"


def png_prefix(plan: str) -> str:
    return "optimal-variance" if plan == "default" else f"optimal-variance-{plan}"


class Stages:
    """Wall time of each stage (the shared timer, one run each), reported on the page."""

    def __init__(self) -> None:
        self.times: list[list] = []

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        seconds, result = wall_seconds(fn, 1, warmup=False)
        self.times.append([name, seconds])
        print(f"{name}: {seconds:.1f} s", file=sys.stderr, flush=True)
        return result


# ------------------------------------------------------------------------------ measuring
def moments_of(model, data, plan: dict, folder: Path | None) -> tuple[DiffusionMoments, float]:
    """The shipped model's moments at all T steps: loaded from ``folder`` if saved there
    (``--moments``), else estimated (and saved there); with the seconds they took."""
    if folder is not None and (folder / "config.json").exists():
        moments = DiffusionMoments.from_pretrained(folder)
        moments.check(model.schedule, (1, 28, 28))
        if moments.info.get("model_sha256") != model_fingerprint(model):
            raise SystemExit(f"{folder} holds moments of another model")
        return moments, float(moments.info["seconds"])
    seconds, moments = wall_seconds(
        lambda: estimate_moments(
            model,
            model.schedule,
            data.train,
            num_images=plan["moment_images"],
            batch_size=plan["batch"],
            generator=torch.Generator().manual_seed(0),
            keep_per_image=True,
            progress=False,
        ),
        1,
        warmup=False,
    )
    moments.info["seconds"] = seconds
    if folder is not None:
        moments.save_pretrained(folder)
    return moments, seconds


def measure_conditioning(model, moments, data, plan: dict, out: Path, prefix: str) -> dict:
    """Standard errors of the three forms (formula and bootstrap) on MNIST-5k and on the exact
    testbed, where the truth is known; writes the two estimator figures."""
    schedule = model.schedule
    se = {f: moments.standard_error(f) for f in FORMS}
    boot = {
        f: moments.bootstrap_standard_error(f, 200, torch.Generator().manual_seed(2)) for f in FORMS
    }
    testbed = digit_mixture(data.train, data.train_labels)
    gen = torch.Generator().manual_seed(3)
    tb_moments = estimate_moments(
        testbed.eps_model(schedule), schedule, testbed.sample(2000, gen),
        num_images=min(plan["moment_images"], 1000), batch_size=plan["batch"], generator=gen,
        progress=False, data_range=(-math.inf, math.inf),
    )  # fmt: skip
    truth = mixture_truth(testbed, schedule, TESTBED_STEPS, plan["truth_n"], gen)
    idx = torch.tensor(TESTBED_STEPS) - 1
    tb_se = {f: tb_moments.standard_error(f) for f in FORMS}
    tb_raw = {f: tb_moments.raw_sbar2(f) for f in FORMS}
    z = {f: float(((tb_raw[f][idx] - truth) / tb_se[f][idx]).abs().max()) for f in FORMS}
    ratio = torch.cat([boot["gamma"] / se["gamma"], boot["moment"] / se["moment"]])
    pref = moments.moment_form_preferred()
    estimator_figures(out, prefix, moments, se, boot, tb_moments, tb_se, tb_raw, truth)
    return {
        "mnist_first_t_moment_preferred": first_true_step(pref),
        "mnist_share_moment_preferred": float(pref.double().mean()),
        "testbed_first_t_moment_preferred": first_true_step(tb_moments.moment_form_preferred()),
        "bootstrap_over_formula_min": float(ratio.min()),
        "bootstrap_over_formula_max": float(ratio.max()),
        "testbed_max_abs_z": z,
        "testbed_images": tb_moments.num_images,
    }


def estimator_figures(out, prefix, moments, se, boot, tb_moments, tb_se, tb_raw, truth) -> None:
    ts = list(range(1, moments.T + 1))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    axes[0].plot(ts, moments.Gamma, color="k")
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[0].set(xlabel="step t", ylabel="Gamma_t = E||eps_theta||^2 / d",
                title="Gamma_t of the shipped model")  # fmt: skip
    plot_sbar2_estimates(axes[1], moments, ts, style="-")
    for f, c in zip(FORMS, ("C0", "C1", "C2"), strict=True):
        axes[2].plot(ts, se[f], color=c, lw=1, label=f"{f} (formula)")
        axes[2].plot(ts[::50], boot[f][::50], "o", color=c, ms=3)
    axes[2].set(yscale="log", xlabel="step t", ylabel="Monte Carlo standard error of sbar_t^2",
                title=f"Standard error, {moments.num_images} images (dots: bootstrap)")  # fmt: skip
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{prefix}-estimators.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for f, c in zip(FORMS, ("C0", "C1", "C2"), strict=True):
        axes[0].plot(ts, tb_se[f], color=c, lw=1, alpha=0.7, label=f)
        axes[1].plot(ts, tb_raw[f].clamp_min(1e-7), color=c, lw=1, alpha=0.7, label=f"{f} form")
    axes[1].plot(TESTBED_STEPS, truth, "k.", ms=7, label="truth (exact Var, Monte Carlo over x_t)")
    axes[0].set(
        yscale="log",
        xlabel="step t",
        ylabel="standard error of sbar_t^2",
        title=f"Exact testbed: standard error ({tb_moments.num_images} images)",
    )
    axes[1].set(yscale="log", xlabel="step t", ylabel="sbar_t^2",
                title="Exact testbed: estimates against the truth")  # fmt: skip
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{prefix}-testbed.png", dpi=110)
    plt.close(fig)


def measure_nll(model, moments, held, plan: dict) -> dict:
    """NLL bounds on the even and the DP trajectory for each K (variances paired on the same
    draws), and at K = T on a subset."""
    schedule = model.schedule
    rows, paired, subset, dp_paths = [], [], [], []
    for K in plan["nll_ks"]:
        even = schedule.trajectory(K)
        dp = optimal_trajectory(moments, schedule, K)
        dp_paths.append({"K": K, "steps": dp})
        kw = {"progress": False, "batch_size": plan["batch"]}
        res = nll_bpd(model, schedule, held, steps=even, **kw,
                      generator=torch.Generator().manual_seed(K),
                      variance=nll_variances(moments, schedule, even, mle=True))  # fmt: skip
        res_dp = nll_bpd(model, schedule, held, steps=dp, **kw,
                         generator=torch.Generator().manual_seed(K + 1),
                         variance={"Analytic-DDPM": decoder_variance(moments, schedule, dp),
                                   "DDPM-large": "large"})  # fmt: skip
        for name, r in (*res.items(), *((f"{n}, DP trajectory", r) for n, r in res_dp.items())):
            rows.append([name, K, len(held), r.bpd, r.standard_error])
        gap = {n: res[n].bpd_per_image - res["Analytic-DDPM"].bpd_per_image
               for n in ("DDPM-large", "DDPM-small")}  # fmt: skip
        paired.append({"K": K, **{
            f"{n.split('-')[1]}_minus_analytic{suffix}": value
            for n, g in gap.items()
            for suffix, value in (("", float(g.mean())),
                                  ("_se", float(g.std() / math.sqrt(len(g)))))
        }})  # fmt: skip
        first = max(plan["nll_images_full_T"], 1)
        subset.append({"K": K, **{n: float(r.bpd_per_image[:first].mean())
                                  for n, r in res.items() if "MLE" not in n}})  # fmt: skip
    full_T = {}
    if plan["nll_images_full_T"]:
        sub = held[: plan["nll_images_full_T"]]
        res = nll_bpd(model, schedule, sub, steps=None, progress=False, batch_size=plan["batch"],
                      generator=torch.Generator().manual_seed(9),
                      variance=nll_variances(moments, schedule, None))  # fmt: skip
        for name, r in res.items():
            rows.append([name, schedule.T, len(sub), r.bpd, r.standard_error])
            full_T[name] = r.bpd
    return {"rows": rows, "paired": paired, "subset": subset, "full_T": full_T, "dp": dp_paths}


def train_heads(model, data, plan: dict) -> tuple[dict, dict]:
    heads, info = {}, {}
    for kind in ("sn", "npr"):
        seconds, head = wall_seconds(
            lambda kind=kind: train_variance_head(
                model,
                kind,
                data=data.train,
                steps=plan["head_steps"],
                batch_size=64,
                seed=0,
                progress=False,
            ),
            1,
            warmup=False,
        )
        heads[kind] = head
        tail = head.history[-max(1, plan["head_steps"] // 10) :]
        info[kind] = {
            "seconds": seconds,
            "final_loss": sum(tail) / len(tail),
            "first_loss": sum(head.history[:10]) / min(10, len(head.history)),
        }
    return heads, info


def score(evaluator, images, reps: int) -> list[float]:
    """``[Fréchet, its bootstrap SE, confidence, entropy, precision, recall]``."""
    fd, conf, entropy, precision, recall = quality_row(evaluator, images)
    return [fd, frechet_bootstrap_se(evaluator, images, reps), conf, entropy, precision, recall]


def measure_quality(model, moments, heads, evaluator, plan: dict) -> tuple[list, dict]:
    """Quality rows per sampler and K (same x_T for every sampler at a K), DDIM at extra K
    only while it is still worse than Analytic-DDIM at K = 10; the K = 10 grids."""
    schedule = model.schedule
    n, reps = plan["quality_n"], plan["fd_boot"]
    rows, grids = [], {}
    for K in sorted(set(plan["quality_ks"]) | set(plan["ddim_extra_ks"])):
        if K not in plan["quality_ks"]:
            target = next(r[3] for r in rows if r[0] == "Analytic-DDIM" and r[1] == 10)
            if any(r[0] == "DDIM" and r[3] <= target for r in rows):
                continue
        methods = [("DDIM", 0.0, None, model)]
        if K in plan["quality_ks"]:
            methods += [(name, eta, var, model)
                        for name, eta, var in compared_samplers(moments, schedule, K)
                        if name != "DDIM"]  # fmt: skip
        if K in plan["large_ks"]:
            methods.append(("DDPM-large", 1.0, fixed_variance(schedule, K, "large"), model))
        if K in plan["head_ks"]:
            for kind, head in heads.items():
                for label, eta in (("DDPM", 1.0), ("DDIM", 0.0)):
                    var = head.reverse_variance(K, eta=eta)
                    methods.append((f"{kind.upper()}-{label}", eta, var, head))
        for name, eta, var, eps_model in methods:
            images = generate(eps_model, schedule, K, eta, var, n, seed=1000 + K)
            rows.append([name, K, n, *score(evaluator, images, reps)])
            if K == 10:
                grids[name] = images[:32]
    return rows, grids


def measure_ablation(model, moments, evaluator, plan: dict) -> list:
    if 10 not in plan["quality_ks"]:
        return []
    schedule, rows = model.schedule, []
    for name, eta, kw in ABLATIONS:
        if kw is None:
            var = fixed_variance(schedule, 10, "small", cap_second_last=None)
        else:
            var = optimal_variance(moments, schedule, 10, eta=eta, **kw)
        images = generate(model, schedule, 10, eta, var, plan["ablation_n"], seed=1010)
        s = score(evaluator, images, plan["fd_boot"])
        rows.append([name, plan["ablation_n"], s[0], s[1], s[2], s[4], s[5]])
    return rows


def quality_figures(out, prefix, nll_rows, rows, grids, real_fd: float, n: int) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in dict.fromkeys(r[0] for r in nll_rows):
        if "MLE" in name:
            continue
        pts = [(r[1], r[3]) for r in nll_rows if r[0] == name]
        ax.plot(*zip(*pts, strict=True), "s--" if "DP trajectory" in name else "o-", label=name)
    ax.set(xscale="log", yscale="log", xlabel="number of steps K",
           ylabel="NLL bound (bits/dim, held-out)",
           title="NLL bound against K (shipped MNIST-5k model)")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{prefix}-nll.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in ("DDPM", "DDIM", "Analytic-DDPM", "Analytic-DDIM", "SN-DDPM", "NPR-DDPM",
                 "SN-DDIM", "NPR-DDIM", "DDPM-large"):  # fmt: skip
        pts = [(r[1], r[3], r[4]) for r in rows if r[0] == name]
        if pts:
            k, v, e = zip(*pts, strict=True)
            ax.errorbar(k, v, yerr=e, marker="o", capsize=2, label=name)
    ax.axhline(real_fd, color="grey", ls="--", lw=0.8, label="real training digits")
    ax.set(xscale="log", yscale="log", xlabel="number of steps K",
           ylabel=f"Fréchet distance (classifier features, n = {n})",
           title="Sample quality against K")  # fmt: skip
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / f"{prefix}-quality.png", dpi=110)
    plt.close(fig)
    names = [m for m in ("DDPM", "Analytic-DDPM", "DDIM", "Analytic-DDIM") if m in grids]
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.6), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            ax.imshow(image_grid(grids[name][:25], nrow=5), cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{name}, K = 10", fontsize=10)
            ax.axis("off")
        fig.suptitle("K = 10, same initial noise x_T in every panel")
        fig.tight_layout()
        fig.savefig(out / f"{prefix}-grids.png", dpi=110)
        plt.close(fig)


def ddim_reach(rows: list) -> dict | None:
    """Where DDIM's Fréchet distance first reaches Analytic-DDIM's at K = 10."""
    target = next((r[3] for r in rows if r[0] == "Analytic-DDIM" and r[1] == 10), None)
    if target is None:
        return None
    ddim = sorted((r[1], r[3]) for r in rows if r[0] == "DDIM")
    return {
        "target_fd": target,
        "first_K": next((k for k, v in ddim if v <= target), None),
        "interpolated_K": log_interpolated_crossing(ddim, target),
        "ddim": ddim,
    }


def measure(plan_name: str, args: argparse.Namespace) -> dict[str, Any]:
    plan = PLANS[plan_name]
    out, prefix = args.out, png_prefix(plan_name)
    torch.manual_seed(0)
    if torch.device(args.device).type == "cuda":  # TF32 convolutions differ by ~1e-2
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    model = shipped_model(args.device)
    data = load_images("mnist5k")
    evaluator = DigitEvaluator(reference=data.heldout)
    stages = Stages()
    rates = stages.run(
        "throughput",
        lambda: (
            forward_images_per_s(model, plan["batch"]),
            training_images_per_s(plan["train_steps"]),
        ),
    )
    moments, moment_s = stages.run("moments", lambda: moments_of(model, data, plan, args.moments))
    epoch_s = len(data.train) / rates[1]
    cost = {"device": args.device, "forward_images_per_s": rates[0],
            "train_images_per_s": rates[1], "epoch_s": epoch_s,
            "moment_images": moments.num_images, "moments_s": moment_s,
            "moments_over_epoch": moment_s / epoch_s}  # fmt: skip
    conditioning = stages.run(
        "estimator conditioning",
        lambda: measure_conditioning(model, moments, data, plan, out, prefix),
    )
    held = data.heldout.double()[: plan["nll_images"]]
    nll = stages.run("NLL", lambda: measure_nll(model, moments, held, plan))
    heads, heads_info = stages.run("variance heads", lambda: train_heads(model, data, plan))
    rows, grids = stages.run(
        "quality", lambda: measure_quality(model, moments, heads, evaluator, plan)
    )
    ablation = stages.run(
        "ablation K=10", lambda: measure_ablation(model, moments, evaluator, plan)
    )
    real = score(evaluator, data.train[: plan["quality_n"]], plan["fd_boot"])
    rows.append(["real training digits", "-", plan["quality_n"], *real])
    quality_figures(out, prefix, nll["rows"], rows, grids, real[0], plan["quality_n"])
    results = {
        "plan_sizes": plan,
        "device": args.device,
        "figures": prefix,
        "model": {k: model.info.get(k) for k in ("step", "command")},
        "cost": cost,
        "conditioning": conditioning,
        "nll": nll,
        "heads": heads_info,
        "quality": rows,
        "ablation": ablation,
        "ddim_reach": ddim_reach(rows),
        "stages": stages.times,
    }
    return json.loads(json.dumps(results, default=float))  # as the page's JSON will hold it


# ------------------------------------------------------------------------------ rendering
def render(results: dict[str, Any], out: Path) -> str:
    plan = results["plan_sizes"]
    prefix = results["figures"]
    cpu = results["device"] == "cpu"
    model = results["model"]
    lines = [
        "# Benchmark: optimal reverse variance (Analytic-DPM and extensions) and NLL",
        "",
        machine_line(results["machine"]) + f" The model ran on {results['device']}.  ",
        f"Command: `{results['command']}` ({results['date']}, plan `{results['plan']}`), total "
        f"{results['seconds'] / 60:.1f} min of wall time.  ",
        f"Model: the shipped `mnist5k` model (step {model['step']}, {model['command']!r}).",
        "",
        "Everything below is subsampled for CPU time; the sizes are stated with each table."
        if cpu
        else "Sizes (stated with each table) are those of the plan below.",
        f"Plan sizes: `{json.dumps(plan)}`.",
        "",
    ]
    lines += render_cost(results["cost"])
    lines += render_conditioning(results["conditioning"], prefix)
    lines += render_nll(results["nll"], plan, prefix)
    lines += render_quality(results, plan, prefix)
    lines += render_paper(results)
    lines += render_claims(results)
    lines += [
        "",
        "## Stage times",
        "",
        markdown_table(Table("", ["stage", "seconds"], results["stages"])),
    ]
    return "\n".join(lines)


def render_cost(cost: dict) -> list[str]:
    labels = [
        ("model forward throughput (images/s, batch of the plan)", "forward_images_per_s"),
        ("training throughput (images/s, batch 64)", "train_images_per_s"),
        ("one training epoch (4,000 images), s", "epoch_s"),
        ("images used by estimate_moments (x 1000 steps)", "moment_images"),
        ("estimate_moments, s", "moments_s"),
        ("estimate_moments / one training epoch", "moments_over_epoch"),
    ]
    rows = [[label, cost[key]] for label, key in labels]
    return [
        "## Cost of the moments",
        "",
        markdown_table(Table("", ["quantity", cost["device"]], rows)),
        "",
        "The moments are estimated once for all T steps (one noise draw per image and step) and "
        "then reused for every K, trajectory and kind; their cost is `num_images * T` forward "
        "passes.",
        "",
    ]


def render_conditioning(cond: dict, prefix: str) -> list[str]:
    z = ", ".join(f"{f} {v:.1f}" for f, v in cond["testbed_max_abs_z"].items())
    return [
        "## Estimator conditioning: which form of sbar_t^2 per t",
        "",
        f"![estimators]({prefix}-estimators.png)",
        "",
        f"![testbed]({prefix}-testbed.png)",
        "",
        f"Standard errors are over images: the formula `factor_t * sd_i / sqrt(N)` and a "
        f"bootstrap (200 resamples of the images) agree within a factor "
        f"{cond['bootstrap_over_formula_min']:.2f}–{cond['bootstrap_over_formula_max']:.2f} "
        f"at every t (Gamma and moment forms). The Gamma form multiplies the noise of "
        f"`1 - Gamma_t` by `bbar_t^2/abar_t^2` (up to ~2.2e4 at t = T), the moment form does "
        f'not. The default `kind="analytic"` therefore takes, at each t, the form with the '
        f"smaller standard error: on MNIST-5k the moment form from t = "
        f"{cond['mnist_first_t_moment_preferred']} on "
        f"({100 * cond['mnist_share_moment_preferred']:.0f}% of the steps), on the exact "
        f"testbed from t = {cond['testbed_first_t_moment_preferred']}.",
        "",
        "Exact testbed (10-component Gaussian mixture on 28x28 images, component means = the "
        "class means of the training digits, std 0.25, analytic eps-model, "
        f"{cond.get('testbed_images', '?')} images): the largest |estimate - truth| / standard "
        f"error over {len(TESTBED_STEPS)} checked steps is {z} (all three forms are unbiased "
        "there, the mean being exact).",
        "",
    ]


def render_nll(nll: dict, plan: dict, prefix: str) -> list[str]:
    by = {(r[0], r[1]): r for r in nll["rows"]}
    ks = [k for k in (*plan["nll_ks"], 1000) if ("Analytic-DDPM", k) in by]
    names = ["DDPM-large", "DDPM-small", "Analytic-DDPM", "Analytic-DDPM (MLE)",
             "Analytic-DDPM, DP trajectory", "DDPM-large, DP trajectory"]  # fmt: skip
    table = [
        [name, *(f"{by[(name, k)][3]:.3f} ± {by[(name, k)][4]:.3f}" if (name, k) in by else "–"
                 for k in ks)]
        for name in names
    ]  # fmt: skip
    full = plan["nll_images_full_T"]
    lines = [
        "## NLL bound (bits/dim) on held-out digits",
        "",
        f"![nll]({prefix}-nll.png)",
        "",
        f"Negative ELBO with the discretised Gaussian decoder, 8-bit data, eta = 1 (DDPM forward "
        f"process on the trajectory), first {plan['nll_images']} held-out digits for K ≤ "
        f"{max(plan['nll_ks'])}"
        + (f" and the first {full} for K = 1000" if full else "; K = 1000 skipped")
        + "; ± is the standard error over images. The variances of every row with the same "
        "trajectory are scored on the same draws of x_t. DDPM's decoder uses the posterior "
        "variance of the jump tau_2 -> tau_1 (DDPM's clipped log-variance); the analytic "
        "decoder uses sbar_{tau_1}^2. No second-to-last cap in the likelihood.",
        "",
        markdown_table(Table("", ["variance", *[f"K = {k}" for k in ks]], table)),
        "",
    ]
    if nll["full_T"]:
        same = "; ".join(
            f"K = {s['K']}: " + ", ".join(f"{n} {v:.3f}" for n, v in s.items() if n != "K")
            for s in nll["subset"]
        )
        at_T = ", ".join(f"{n} {v:.3f}" for n, v in nll["full_T"].items())
        lines += [
            f"Same {full} digits at every K (for comparing K = 1000 with the rest): {same}; "
            f"K = 1000: {at_T}.",
            "",
        ]
    paired = "; ".join(
        f"K = {p['K']}: large − analytic {p['large_minus_analytic']:+.3f} ± "
        f"{p['large_minus_analytic_se']:.3f}, small − analytic "
        f"{p['small_minus_analytic']:+.3f} ± {p['small_minus_analytic_se']:.3f}"
        for p in nll["paired"]
    )
    paths = "; ".join(
        f"K = {p['K']}: {p['steps'] if len(p['steps']) <= 25 else str(p['steps'][:12])[:-1]}"
        + (", ...]" if len(p["steps"]) > 25 else "")
        for p in nll["dp"]
    )
    return [
        *lines,
        f"Paired differences (same images, same draws), bits/dim: {paired}.",
        "",
        "DP trajectories (kept steps; dynamic programming on the expected KL of each jump with "
        "the default variance and the model's measured mean error, `optimal_trajectory` "
        f"defaults): {paths}.",
        "",
    ]


def render_quality(results: dict, plan: dict, prefix: str) -> list[str]:
    heads = ", ".join(
        f"{k.upper()} {v['seconds']:.0f} s of training ({plan['head_steps']} steps x 64 "
        f"images), loss {v['first_loss']:.1f} -> {v['final_loss']:.1f}"
        for k, v in results["heads"].items()
    )
    lines = [
        "## Sample quality",
        "",
        f"![quality]({prefix}-quality.png)",
        "",
        f"![grids]({prefix}-grids.png)",
        "",
        f"{plan['quality_n']} samples per row (same initial noise for every method at a given "
        "K), scored with the shipped digit classifier against the 1,000 held-out digits: "
        "Fréchet distance (± bootstrap standard error over the samples; it is biased upwards at "
        "small n, so compare rows of equal n only), mean confidence, label entropy (log 10 = "
        "2.303 is balanced), k-NN precision/recall. Every method uses the same last-step rule: "
        "the last jump outputs the mean and the second-to-last variance is capped at "
        f"(2·(2/255)·sqrt(π/2))^2 (DDIM adds no noise anyway). SN/NPR heads: {heads}.",
        "",
        markdown_table(Table("", QUALITY_COLUMNS, results["quality"])),
        "",
    ]
    if results["ablation"]:
        lines += [
            "### Ablation at K = 10 (which detail matters)",
            "",
            markdown_table(
                Table(
                    "",
                    ["variant", "n", "Fréchet", "± (boot.)", "confidence", "precision", "recall"],
                    results["ablation"],
                )
            ),
            "",
        ]
    return lines


def render_paper(results: dict) -> list[str]:
    nll = {(r[0], r[1]): r for r in results["nll"]["rows"]}
    fd = {(r[0], r[1]): r for r in results["quality"]}
    trend = []
    for key, values in PAPER.items():
        metric, name = key.split(" ", 1)
        ours = nll if metric == "NLL" else fd
        trend.append([f"{key} (paper, CIFAR10)", *values])
        trend.append([f"{key.replace('FID', 'Fréchet')} (ours, MNIST-5k)",
                      *[f"{ours[(name, k)][3]:.3g}" if (name, k) in ours else "–"
                        for k in PAPER_KS]])  # fmt: skip
    return [
        "## Against the paper's CIFAR10 trend",
        "",
        "Published numbers of Analytic-DPM (Bao et al., ICLR 2022; CIFAR10, linear schedule, "
        "FID with Inception features) next to ours (MNIST-5k, su_linear schedule, Fréchet "
        "distance with the digit classifier's features): only the trends are comparable, not "
        "the values.",
        "",
        markdown_table(Table("", ["", *[f"K = {k}" for k in PAPER_KS]], trend)),
        "",
    ]


def render_claims(results: dict) -> list[str]:
    out = ["## The claims", ""]
    nll = {(r[0], r[1]): r for r in results["nll"]["rows"]}
    by = {(r[0], r[1]): r for r in results["quality"]}
    k10 = next((p for p in results["nll"]["paired"] if p["K"] == 10), None)
    if k10:
        best_fixed = min(nll[("DDPM-large", 10)][3], nll[("DDPM-small", 10)][3])
        ours = nll[("Analytic-DDPM", 10)][3]
        holds = (ours < best_fixed and k10["small_minus_analytic"] > 0
                 and k10["large_minus_analytic"] > 2 * k10["large_minus_analytic_se"])  # fmt: skip
        out.append(
            f"- **NLL at K = 10**: Analytic-DDPM {ours:.3f} bits/dim against the better fixed "
            f"variance {best_fixed:.3f} (paired difference to DDPM-large "
            f"{k10['large_minus_analytic']:+.3f} ± {k10['large_minus_analytic_se']:.3f}): "
            + ("**holds**." if holds else "**does not hold**.")
        )
    for a, b in (("Analytic-DDPM", "DDPM"), ("Analytic-DDIM", "DDIM")):
        if (a, 10) in by and (b, 10) in by:
            ra, rb = by[(a, 10)], by[(b, 10)]
            gap, se = rb[3] - ra[3], math.hypot(ra[4], rb[4])
            verdict = ("**holds**" if gap > 2 * se else
                       "**holds, within noise**" if gap > 0 else "**does not hold**")  # fmt: skip
            out.append(
                f"- **Fréchet at K = 10, {a} vs {b}**: {ra[3]:.2f} ± {ra[4]:.2f} against "
                f"{rb[3]:.2f} ± {rb[4]:.2f}: {verdict}."
            )
    reach = results["ddim_reach"]
    if reach:
        first, est = reach["first_K"], reach["interpolated_K"]
        ddim = ", ".join(f"K = {k}: {v:.2f}" for k, v in reach["ddim"])
        if first is None:
            text = (f"DDIM does not reach it at any K measured ({ddim}): the speed-up is more "
                    f"than {max(k for k, _ in reach['ddim']) / 10:.0f}x")  # fmt: skip
        else:
            speed = (est or first) / 10
            text = (
                f"DDIM first reaches it at K = {first} among the K measured ({ddim}); "
                + (f"log-linear interpolation puts the crossing at K ≈ {est:.0f}, " if est else "")
                + f"a speed-up of about {speed:.1f}x against the goal of ≥ 4x: "
                + ("**met**" if speed >= 4 else "**not met**")
            )
        out.append(
            f"- **Steps for DDIM to match Analytic-DDIM at K = 10** (Fréchet "
            f"{reach['target_fd']:.2f}): {text}."
        )
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    parser.add_argument(
        "--moments",
        type=Path,
        default=None,
        help="reuse/save the moments here (the shipped model's, all T steps)",
    )


def _plan(argv: list[str]) -> str:
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--plan", default="default")
    return probe.parse_known_args(argv)[0].plan


if __name__ == "__main__":
    main(
        page_name(_plan(sys.argv[1:])),
        measure,
        render,
        plans=tuple(PLANS),
        description=__doc__.split("\n")[0],
        add_arguments=add_arguments,
    )
