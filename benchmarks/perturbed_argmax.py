"""Benchmark of kexue.distributions -> docs/benchmarks/distributions.md (+ JSON, PNG).

1. Accuracy: max |p - p_ref| against the number of nodes K for the article's equal-weight rule,
   Gauss–Legendre and tanh-sinh (kexue's default), normal noise, batch 64 x n in
   {10, 100, 1000}; the reference is scipy's adaptive quadrature (``quad_vec``) in float64
   (``kexue.testing.perturbed_argmax``). The other families at n = 30.
2. Speed at equal error, CPU float64, in one process: kexue against Monte Carlo frequencies of
   ``argmax(mu + eps)`` (torch, same threads) and against the scipy reference itself.
3. Cost as a classification head: float32 forward + backward against softmax.

Plans: ``smoke`` (small sizes, what the slow test runs), ``default`` (the page).
Usage: ``python benchmarks/perturbed_argmax.py --plan default`` (takes the CPU lock),
``--render-only``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from _common import Table, machine_line, main, markdown_table, median_ms
from kexue.distributions import (
    perturbed_argmax_cross_entropy,
    perturbed_argmax_log_probs,
    perturbed_argmax_probs,
    uniform,
)
from kexue.testing.perturbed_argmax import reference_probs as scipy_probs

BATCH = 64
SCALES = (0.3, 1.0, 3.0)  # score spreads, cycled over the rows of a batch
RULES = ("midpoint", "gauss-legendre", "tanh-sinh")
RULE_LABEL = {
    "midpoint": "article's rule u_k = k/(K+1)",
    "gauss-legendre": "Gauss–Legendre",
    "tanh-sinh": "tanh-sinh (kexue default)",
}
KS = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
GOAL_ERROR = 1e-6
PLANS: dict[str, dict[str, Any]] = {
    "smoke": {
        "sizes": {10: 4, 100: 2},
        "family_n": 6,
        "family_rows": 2,
        "mc_samples": {10: 20_000, 100: 5_000},
        "head_sizes": (10, 100),
        "min_run_time": 0.05,
    },
    "default": {
        "sizes": {10: BATCH, 100: 16, 1000: 4},
        "family_n": 30,  # Laplace/uniform references split at every kink: n(n-1) pieces
        "family_rows": 8,
        "mc_samples": {10: 200_000, 100: 50_000, 1000: 10_000},
        "head_sizes": (10, 100, 1000),
        "min_run_time": 1.0,
    },
}


def scores(n: int, rows: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([SCALES[r % len(SCALES)] for r in range(rows)], dtype=torch.float64)
    return torch.randn(rows, n, generator=gen, dtype=torch.float64) * scale[:, None]


def references(mu: torch.Tensor, family: str) -> tuple[np.ndarray, float]:
    """Reference rows and the scipy seconds per row."""
    t0 = time.perf_counter()
    ref = np.stack([scipy_probs(row.numpy(), family) for row in mu])
    return ref, (time.perf_counter() - t0) / len(mu)


def max_error(p: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(p.detach().numpy() - ref).max())


def monte_carlo(mu: torch.Tensor, samples: int, gen: torch.Generator) -> torch.Tensor:
    """Frequencies of argmax(mu + eps) over ``samples`` normal draws per row (torch)."""
    rows, n = mu.shape
    counts = torch.zeros(rows, n, dtype=torch.float64)
    chunk = max(1, (1 << 22) // (rows * n))
    done = 0
    while done < samples:
        m = min(chunk, samples - done)
        eps = torch.randn(m, rows, n, generator=gen, dtype=mu.dtype)
        winners = (mu + eps).argmax(-1)  # (m, rows)
        counts.scatter_add_(1, winners.T, torch.ones(rows, m, dtype=torch.float64))
        done += m
    return counts / samples


# 1. accuracy ----------------------------------------------------------------------------------


def convergence(sizes: dict[int, int]) -> dict:
    """Max error over the reference rows, per n, rule and K (normal noise)."""
    out: dict = {"errors": {}, "scipy_s_per_row": {}, "rows": sizes}
    for n, rows in sizes.items():
        mu = scores(n, rows, seed=n)
        ref, secs = references(mu, "normal")
        out["scipy_s_per_row"][n] = secs
        out["errors"][n] = {
            rule: [
                max_error(perturbed_argmax_probs(mu, "normal", num_nodes=k, rule=rule), ref)
                for k in KS
            ]
            for rule in RULES
        }
        out.setdefault("mu", {})[n], out.setdefault("ref", {})[n] = mu, ref
    return out


def families(n: int, rows: int) -> dict:
    mu = scores(n, rows, seed=7)
    mu_u = mu * 0.3  # uniform noise of width 1: keep several classes within reach
    out = {}
    for family in ("gumbel", "normal", "logistic", "laplace", "uniform"):
        m = mu_u if family == "uniform" else mu
        ref = np.asarray(torch.softmax(m, -1)) if family == "gumbel" else references(m, family)[0]
        noise = uniform(1.0) if family == "uniform" else family
        out[family] = {
            rule: [
                max_error(
                    perturbed_argmax_probs(m, noise, num_nodes=k, rule=rule, closed_form=False),
                    ref,
                )
                for k in KS
            ]
            for rule in ("auto", "gauss-legendre")
        }
    return out


# 2. speed at equal error ----------------------------------------------------------------------


def smallest_k(mu: torch.Tensor, ref: np.ndarray, target: float) -> tuple[int, float]:
    for k in (2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64, 96, 128):
        err = max_error(perturbed_argmax_probs(mu, "normal", num_nodes=k), ref)
        if err <= target:
            return k, err
    return 128, err


def speed(conv: dict, min_run_time: float, mc_samples: dict[int, int]) -> dict:
    gen = torch.Generator().manual_seed(0)
    rows_out, direct_rows = [], []
    for n in conv["errors"]:
        sub, ref_rows = conv["mu"][n], conv["ref"][n]  # the reference rows open the batch
        batch = torch.cat([sub, scores(n, BATCH - len(sub), seed=n + 1)])
        samples = mc_samples[n]
        mc_ms = median_ms(lambda b=batch, s=samples: monte_carlo(b, s, gen), min_run_time=0.2)
        mc_err = max_error(monte_carlo(sub, samples, gen), ref_rows)
        c = mc_err * math.sqrt(samples)  # MC error ~ c / sqrt(S)
        for k in (32, 64):
            ours_ms = median_ms(
                lambda b=batch, k=k: perturbed_argmax_probs(b, "normal", num_nodes=k),
                min_run_time=min_run_time,
            )
            err = conv["errors"][n]["tanh-sinh"][KS.index(k)]
            need = (c / err) ** 2
            mc_equal_ms = mc_ms * need / samples
            scipy_ms = conv["scipy_s_per_row"][n] * 1e3 * BATCH
            rows_out.append(
                [
                    f"{BATCH} x {n}",
                    k,
                    err,
                    ours_ms,
                    f"{need:.2g}",
                    mc_equal_ms,
                    mc_equal_ms / ours_ms,
                    scipy_ms,
                    scipy_ms / ours_ms,
                ]
            )
        # directly measured: the smallest K that matches Monte Carlo's measured error
        k_eq, err_eq = smallest_k(sub, ref_rows, mc_err)
        ours_eq = median_ms(
            lambda b=batch, k=k_eq: perturbed_argmax_probs(b, "normal", num_nodes=k),
            min_run_time=min_run_time,
        )
        direct_rows.append(
            [f"{BATCH} x {n}", samples, mc_err, mc_ms, k_eq, err_eq, ours_eq, mc_ms / ours_eq]
        )
    return {"equal": rows_out, "direct": direct_rows}


SPEED_HEADERS = [
    "batch x n",
    "K",
    "kexue max error",
    "kexue ms",
    "MC samples for that error",
    "MC ms at that error (extrapolated)",
    "MC / kexue",
    "scipy quad ms (per batch)",
    "scipy / kexue",
]
DIRECT_HEADERS = [
    "batch x n",
    "MC samples",
    "MC max error",
    "MC ms",
    "kexue K for <= that error",
    "kexue max error",
    "kexue ms",
    "MC / kexue",
]


# 3. as a classification head ------------------------------------------------------------------


def fwd_bwd_ms(loss_fn, mu: torch.Tensor, target: torch.Tensor, min_run_time: float) -> float:
    def step() -> None:
        mu.grad = None
        loss_fn(mu, target).backward()

    return median_ms(step, min_run_time=min_run_time)


def head_cost(sizes: tuple[int, ...], min_run_time: float) -> list[list]:
    gen = torch.Generator().manual_seed(1)
    losses = {
        "softmax": torch.nn.functional.cross_entropy,
        "normal": lambda m, t: perturbed_argmax_cross_entropy(m, t, "normal"),
        "uniform": lambda m, t: perturbed_argmax_cross_entropy(m, t, "uniform"),
    }
    rows = []
    for n in sizes:
        mu = torch.randn(BATCH, n, generator=gen).requires_grad_()
        target = torch.randint(n, (BATCH,), generator=gen)
        ms = {name: fwd_bwd_ms(fn, mu, target, min_run_time) for name, fn in losses.items()}
        with torch.no_grad():
            fwd = median_ms(
                lambda m=mu: perturbed_argmax_log_probs(m, "normal"), min_run_time=min_run_time
            )
        rows.append(
            [
                f"{BATCH} x {n}",
                ms["softmax"],
                fwd,
                ms["normal"],
                ms["uniform"],
                ms["normal"] / ms["softmax"],
            ]
        )
    return rows


HEAD_HEADERS = [
    "batch x n",
    "softmax CE fwd+bwd ms",
    "probit fwd ms",
    "probit CE fwd+bwd ms",
    "uniform CE fwd+bwd ms",
    "probit / softmax",
]


# Figures and document -------------------------------------------------------------------------


def measure(plan: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg = PLANS[plan]
    conv = convergence(cfg["sizes"])
    fams = families(cfg["family_n"], cfg["family_rows"])
    spd = speed(conv, cfg["min_run_time"], cfg["mc_samples"])
    head = head_cost(cfg["head_sizes"], cfg["min_run_time"])
    conv.pop("mu"), conv.pop("ref")
    return {
        "ks": list(KS),
        "convergence": conv,
        "family_n": cfg["family_n"],
        "families": fams,
        "speed": spd,
        "head": head,
    }


def convergence_plot(conv: dict, fams: dict, family_n: int, path: Path) -> None:
    sizes = list(conv["errors"])
    cols = 2
    rows = math.ceil((len(sizes) + 1) / cols)
    fig, grid = plt.subplots(rows, cols, figsize=(10, 4 * rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(sizes) + 1 :]:
        ax.axis("off")
    for ax, n in zip(axes, sizes, strict=False):
        for rule in RULES:
            ax.loglog(
                KS, np.maximum(conv["errors"][n][rule], 1e-17), "o-", ms=3, label=RULE_LABEL[rule]
            )
        ax.axhline(GOAL_ERROR, color="k", ls=":", lw=1, label="goal 1e-6")
        ax.set_title(f"normal noise, n = {n} ({conv['rows'][n]} rows)")
        ax.set_xlabel("quadrature nodes K")
        ax.set_ylabel("max |p - p_scipy| (probability)")
    axes[0].legend(fontsize=7)
    ax = axes[len(sizes)]
    for family, errs in fams.items():
        line = ax.loglog(KS, np.maximum(errs["auto"], 1e-17), "o-", ms=3, label=f"{family}")
        ax.loglog(
            KS, np.maximum(errs["gauss-legendre"], 1e-17), "--", lw=1, color=line[0].get_color()
        )
    ax.set_title(
        f"all families, n = {family_n} (solid: default rule, dashed: Gauss–Legendre)", fontsize=8
    )
    ax.set_xlabel("quadrature nodes K")
    ax.set_ylabel("max |p - p_ref| (probability)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def goal_lines(conv: dict, spd: dict) -> list[str]:
    lines = []
    for rule in ("tanh-sinh", "gauss-legendre", "midpoint"):
        parts = []
        for n, errs in conv["errors"].items():
            ok = [k for k, e in zip(KS, errs[rule], strict=True) if e <= GOAL_ERROR]
            parts.append(f"n = {n}: K = {ok[0]}" if ok else f"n = {n}: not reached by K = 128")
        met = all(
            any(e <= GOAL_ERROR for k, e in zip(KS, errs[rule], strict=True) if k <= 64)
            for errs in conv["errors"].values()
        )
        lines.append(
            f"- Error <= 1e-6 at K <= 64 (normal noise), {RULE_LABEL[rule]}: "
            f"{'**met**' if met else '**not met**'} (smallest K reaching 1e-6: {'; '.join(parts)})."
        )
    ratios = [r[6] for r in spd["equal"]]
    direct = [r[7] for r in spd["direct"]]
    lines.append(
        f"- >= 100x faster than Monte Carlo at equal error: "
        f"{'**met**' if min(ratios) >= 100 else '**not met**'} at the errors of K = 32 and 64 "
        f"({min(ratios):.3g}x to {max(ratios):.3g}x, Monte Carlo time extrapolated from measured "
        f"runs as S ~ 1/error^2); measured side by side at Monte Carlo's own error "
        f"({', '.join(f'{r[1]:,} samples' for r in spd['direct'])}): "
        f"{min(direct):.3g}x to {max(direct):.3g}x "
        f"{'(>= 100x)' if min(direct) >= 100 else '(below 100x in at least one case)'}."
    )
    return lines


def render(results: dict[str, Any], out: Path) -> str:
    conv, fams, spd, head = (results[k] for k in ("convergence", "families", "speed", "head"))
    conv["errors"] = {int(n): e for n, e in conv["errors"].items()}  # JSON keys are strings
    conv["rows"] = {int(n): r for n, r in conv["rows"].items()}
    family_n = results["family_n"]
    convergence_plot(conv, fams, family_n, out / "distributions-convergence.png")
    conv_rows = [
        [f"{n}", RULE_LABEL[rule], *errs[rule]]
        for n, errs in conv["errors"].items()
        for rule in RULES
    ]
    fam_rows = [[family, rule, *e[rule]] for family, e in fams.items() for rule in e]
    lines = [
        "# Benchmark: perturbed-argmax probability maps (kexue.distributions)",
        "",
        machine_line(results["machine"]) + "  ",
        f"Command: `{results['command']}` ({results['date']}, plan `{results['plan']}`, "
        f"{results['seconds']:.0f} s in all).",
        "",
        *(
            ["**Smoke plan**: tiny sizes; these numbers check the code.", ""]
            if results["plan"] == "smoke"
            else []
        ),
        "Scores: `mu ~ N(0, s^2)` with `s` cycling through 0.3, 1, 3 over the rows of a batch. "
        "Error: the largest `|p_i - p_ref,i|` over the classes and the reference rows. "
        "Reference `p_ref`: scipy's adaptive Gauss–Kronrod `quad_vec` in float64 of "
        "`int pdf(e) prod_{j != i} cdf(mu_i - mu_j + e) de` (tolerance 1e-14, split at the "
        "kinks of the integrand); softmax for Gumbel noise.",
        "",
        "## Goals of the issue, as measured",
        "",
        *goal_lines(conv, spd),
        "",
        "The article's rule `u_k = k/(K+1)` with equal weights converges like 1/K, and "
        "Gauss–Legendre on `u` only algebraically: the quantile `Phi^{-1}(u)` is singular at "
        "both ends, and for large n the integrand of the leading classes is a narrow bump near "
        "`u = 1`. The tanh-sinh (double-exponential) substitution removes both problems, which "
        'is why kexue uses it by default (`rule="auto"`) instead of the `gauss-legendre` '
        "default the issue proposed; uniform noise keeps Gauss–Legendre (its integrand has "
        "kinks, where neither rule converges exponentially).",
        "",
        "## Accuracy against the number of nodes (normal noise, float64)",
        "",
        "![convergence](distributions-convergence.png)",
        "",
        markdown_table(Table("", ["n", "rule", *[f"K={k}" for k in KS]], conv_rows)),
        "",
        f"### Every family, n = {family_n}, default rule and Gauss–Legendre",
        "",
        "Uniform noise has width 1 and scores scaled by 0.3 so that several classes stay "
        "within reach of the maximum; Laplace and uniform integrands have one kink per class, "
        "so their errors fall algebraically.",
        "",
        markdown_table(Table("", ["family", "rule", *[f"K={k}" for k in KS]], fam_rows)),
        "",
        f"## Speed at equal error (batch {BATCH}, float64, normal noise)",
        "",
        "Monte Carlo: frequencies of `argmax(mu + eps)` with torch on the same threads; its "
        "error is measured against the reference at the sample count shown in the second "
        "table and scales as `1/sqrt(S)`, so reaching kexue's error needs "
        "`S = S_measured (error_MC / error_kexue)^2` samples and proportionally more time "
        "(extrapolated: such runs would take days). The scipy reference is timed per row on "
        "the reference rows and multiplied by the batch size.",
        "",
        markdown_table(Table("", SPEED_HEADERS, spd["equal"])),
        "",
        "Measured side by side (no extrapolation): Monte Carlo at the sample count shown, "
        "kexue with the smallest K whose error is at most Monte Carlo's.",
        "",
        markdown_table(Table("", DIRECT_HEADERS, spd["direct"])),
        "",
        f"## As a classification head (float32, batch {BATCH}, K = 32)",
        "",
        "Forward + backward of the mean cross-entropy `-log p_target`; softmax is "
        "`torch.nn.functional.cross_entropy`. The probit costs O(K n^2) per row against "
        "softmax's O(n).",
        "",
        markdown_table(Table("", HEAD_HEADERS, head)),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main("distributions", measure, render, plans=tuple(PLANS), description=__doc__.split("\n")[0])
