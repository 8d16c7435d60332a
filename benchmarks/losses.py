"""Benchmark of kexue.ops / kexue.losses -> docs/benchmarks/losses.md (+ losses.json, PNG).

1. Speed, one process, CPU float32, forward + backward: ``zlpr_loss`` against torch's
   ``BCEWithLogitsLoss`` and a torch port of the sentinel (1e12) formulation; kexue's
   ``logsumexp`` against ``torch.logsumexp``. Measured twice: with glibc's default allocator
   settings, and in a child process whose allocator keeps freed memory (so fresh buffers cost
   no page faults, the state of a long training loop).
2. Quality on BibTeX (``../shared/data/multilabel/bibtex.arff``): the same MLP, budget and
   seeds for BCE (0.5 and tuned), focal, ASL, ZLPR (threshold 0, untuned), ZLPR + label
   smoothing, ZLPR + mixup; micro/macro-F1, mAP, calibration of sigmoid(2s) against
   sigmoid(s).

Plans: ``smoke`` (small speed sizes, one epoch on 500 BibTeX rows), ``default`` (the page),
``speed`` (re-measures the speed part only and carries the quality part over from the
existing losses.json, stating so on the page).

Usage: ``python benchmarks/losses.py --plan default`` (takes the CPU lock), ``--plan smoke``,
``--render-only``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from _common import SHARED_DATA, Table, machine_line, main, markdown_table
from kexue.experiments.multilabel import (
    MultilabelTrainConfig,
    Split,
    compare_methods,
    reliability_curve,
    scores_metrics,
    summarize,
    trainings_needed,
)
from kexue.experiments.speed import LOSS_HEADERS, LSE_HEADERS, loss_speed_rows, lse_speed_rows

DATA = SHARED_DATA / "multilabel" / "bibtex.arff"
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "8589934592"}
PLANS: dict[str, dict[str, Any]] = {
    "smoke": {"sizes": [1000], "min_run_time": 0.05, "epochs": 1, "seeds": [0], "train": 500},
    "default": {"sizes": [1000, 10000], "min_run_time": 1.0, "epochs": 30, "seeds": [0, 1, 2]},
    "speed": {"sizes": [1000, 10000], "min_run_time": 1.0},
}
CALIBRATED = ("ZLPR (s>0)", "ZLPR + smoothing 0.1", "ZLPR + mixup 0.4", "BCE (t=0.5)")
PLOTTED = (
    "ZLPR (s>0), sigmoid(2s)",
    "ZLPR (s>0), sigmoid(s)",
    "ZLPR + smoothing 0.1, sigmoid(2s)",
    "BCE (t=0.5), sigmoid(s)",
)


# 1. speed -------------------------------------------------------------------------------------


def speed(sizes: list[int], min_run_time: float) -> dict[str, list]:
    # One thread: on a shared 2-core machine a second thread mostly waits, and the waits
    # distort the ratios between kexue and torch.
    torch.set_num_threads(1)
    return {
        "loss": loss_speed_rows(tuple(sizes), min_run_time=min_run_time),
        "lse": lse_speed_rows(tuple(sizes), min_run_time=min_run_time),
    }


def speed_in_child(sizes: list[int], min_run_time: float) -> dict[str, list]:
    """The same timings in a child process whose allocator keeps freed memory."""
    child = subprocess.run(
        [sys.executable, __file__, "--speed-child", json.dumps([sizes, min_run_time])],
        env={**os.environ, **ALLOCATOR_ENV},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


# 2. quality on BibTeX -------------------------------------------------------------------------


def load_bibtex(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """BibTeX from sparse ARFF: 1,836 binary word features, then 159 TAG_* labels."""
    import arff  # liac-arff (dev extra)

    with open(path) as fh:
        data = arff.load(fh, encode_nominal=True, return_type=arff.COO)
    names = [a[0] for a in data["attributes"]]
    values, (rows, cols) = data["data"][0], data["data"][1:]
    dense = np.zeros((max(rows) + 1, len(names)), dtype=np.float32)
    dense[np.asarray(rows), np.asarray(cols)] = np.asarray(values, dtype=np.float32)
    is_label = np.array([n.startswith("TAG_") for n in names])
    return torch.from_numpy(dense[:, ~is_label]), torch.from_numpy(dense[:, is_label])


def split(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> tuple[Split, Split, Split]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    a, b = int(0.6 * len(x)), int(0.8 * len(x))
    train, val, test = (Split(x[i], y[i]) for i in (order[:a], order[a:b], order[b:]))
    return train, val, test


def quality(epochs: int, seeds: list[int], train_size: int | None = None) -> dict[str, Any]:
    x, y = load_bibtex(DATA)
    train, val, test = split(x, y)
    if train_size is not None:  # smoke plan: a prefix of the (shuffled) training split
        train = Split(train.x[:train_size], train.y[:train_size])
    cfg = MultilabelTrainConfig(
        hidden=512, dropout=0.5, epochs=epochs, batch_size=64, lr=1e-3, weight_decay=1e-4
    )
    t0 = time.perf_counter()
    runs = compare_methods(train, val, test, seeds, cfg)
    seconds = time.perf_counter() - t0
    ytest = torch.cat([test.y] * len(seeds))
    calibration, curves = {}, {}
    for method in CALIBRATED:
        scores = torch.cat([r.test_scores for r in runs if r.method == method])
        maps = [("sigmoid(s)", 1.0)] if method.startswith("BCE") else [("sigmoid(2s)", 2.0)]
        maps += [] if method.startswith("BCE") else [("sigmoid(s)", 1.0)]
        for label, scale in maps:
            probs = torch.sigmoid(scale * scores)
            calibration[f"{method}, {label}"] = scores_metrics(probs, ytest, 0.5)["ece"]
            curves[f"{method}, {label}"] = [a.tolist() for a in reliability_curve(probs, ytest)]
    return {
        "config": dataclasses.asdict(cfg),
        "seeds": seeds,
        "sizes": [len(train.x), len(val.x), len(test.x)],
        "labels": int(y.shape[1]),
        "label_cardinality": float(y.sum(1).mean()),
        "trainings": trainings_needed() * len(seeds),
        "seconds": seconds,
        "runs": [
            {"method": r.method, "seed": r.seed, "threshold": r.threshold, "metrics": r.metrics}
            for r in runs
        ],
        "summary": summarize(runs),
        "calibration": calibration,
        "curves": curves,
    }


def measure(plan: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg = PLANS[plan]
    torch.manual_seed(0)
    out: dict[str, Any] = {
        "speed_default": speed(cfg["sizes"], cfg["min_run_time"]),
        "speed_warm_allocator": speed_in_child(cfg["sizes"], cfg["min_run_time"]),
    }
    if plan == "speed":
        previous = args.out / "losses.json"
        kept = json.loads(previous.read_text()) if previous.exists() else {}
        out["quality"] = kept.get("quality")
        out["quality_from"] = kept.get("quality_from") or {
            k: kept.get(k) for k in ("command", "date", "machine")
        }
    elif DATA.exists():
        out["quality"] = quality(cfg["epochs"], cfg["seeds"], cfg.get("train"))
    else:
        out["quality"] = None
        out["quality_skipped"] = f"{DATA.relative_to(SHARED_DATA.parent)} not found"
    return out


# rendering ------------------------------------------------------------------------------------


def _span(rows: list, col: int) -> str:
    values = [r[col] for r in rows]
    return f"{min(values):.2f}-{max(values):.2f}x"


def goal_lines(default: dict, warm: dict) -> list[str]:
    """One bullet per goal, with the measured range over both allocators."""
    both = default["loss"] + warm["loss"]
    plain = [r for r in default["lse"] + warm["lse"] if "N(0,1)" in r[0]]
    masked = [r for r in default["lse"] + warm["lse"] if "masked" in r[0]]
    worst_diff = max(r[8] for r in both)
    return [
        f"- ZLPR <= 1.1x BCE: float targets {_span(both, 5)}, bool targets {_span(both, 6)} of "
        f"BCE's time (default allocator {_span(default['loss'], 5)} / "
        f"{_span(default['loss'], 6)}; warm allocator {_span(warm['loss'], 5)} / "
        f"{_span(warm['loss'], 6)}); with the native kernel (`kexue.native`). The eager path, "
        f"float targets: {_span(both, 10)}.",
        f"- ZLPR >= 2x faster than the sentinel port at equal values: {_span(both, 7)} faster, "
        f"largest |difference| {worst_diff:.3g}.",
        f"- logsumexp <= 1.2x torch.logsumexp on plain N(0,1) scores: {_span(plain, 3)}; "
        f"masked: {_span(masked, 3)}.",
        *bound_lines(both, plain),
    ]


def bound_lines(loss_rows: list, plain: list) -> list[str]:
    """What bounds a ratio that misses its goal (from the passes each side makes)."""
    lines = []
    missed = [r for r in loss_rows if r[5] > 1.1]
    if missed:
        lines.append(
            "- Where ZLPR misses 1.1x ("
            + ", ".join(f"{r[0]}: {r[5]:.2f}x" for r in missed)
            + "): its forward makes 7 passes over the scores (exp, two thresholds for the eps "
            "rule, 1 - t, a division, a product, one sum over both terms) and its backward one "
            "batched product, against about 5 and 3 for BCE; at 256 x 1000 the arrays fit in cache "
            "and the fixed cost of ~15 small tensor operations and the autograd Function "
            "weighs as much as the passes."
        )
    slow = [r for r in plain if r[3] > 1.2]
    if slow:
        lines.append(
            "- Where logsumexp misses 1.2x ("
            + ", ".join(f"{r[0]}: {r[3]:.2f}x" for r in slow)
            + "): it adds to torch's max-shift-exp-sum the flush of subnormal terms (a clamp "
            "and a threshold pass, which make wide inputs 10-30x faster than torch) and the "
            "checks for masked and infinite rows; at 256 x 1000 the extra small operations "
            "dominate."
        )
    return lines


def _gap(a: dict, b: dict, key: str) -> float:
    """Difference of means in units of the larger seed standard deviation (min 1e-4)."""
    return (a[key][0] - b[key][0]) / max(a[key][1], b[key][1], 1e-4)


def compare(a: dict, b: dict) -> str:
    words = []
    for key, label in (("micro_f1", "micro-F1"), ("macro_f1", "macro-F1")):
        g = _gap(a, b, key)
        words.append(f"{'ahead' if g > 2 else 'behind' if g < -2 else 'level'} on {label}")
    return " and ".join(words) + " (more than 2 seed sd = ahead/behind)"


def verdict(zlpr: dict, bce_tuned: dict) -> str:
    ok = all(_gap(zlpr, bce_tuned, k) >= -2 for k in ("micro_f1", "macro_f1"))
    return "**Holds.**" if ok else "**Does not hold on this benchmark.**"


def reliability_plot(curves: dict, seeds: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    for label in PLOTTED:
        mean_p, freq, _ = curves[label]
        ax.plot(mean_p, freq, "o-", ms=3, label=label)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed label frequency")
    ax.set_title(f"BibTeX test labels: reliability ({seeds} seed(s) pooled)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def quality_lines(q: dict, out: Path) -> list[str]:
    cfg, summary = q["config"], q["summary"]
    rows = [
        [name]
        + [f"{m[k][0]:.4f} ± {m[k][1]:.4f}" for k in ("micro_f1", "macro_f1", "mAP")]
        + [f"{m['threshold'][0]:.2f}"]
        for name, m in summary.items()
    ]
    reliability_plot(q["curves"], len(q["seeds"]), out / "losses-reliability.png")
    zl, bt, b5 = summary["ZLPR (s>0)"], summary["BCE (tuned t)"], summary["BCE (t=0.5)"]
    zt = summary["ZLPR (tuned t)"]
    negatives = q["labels"] - q["label_cardinality"]
    return [
        "## Quality on BibTeX",
        "",
        f"BibTeX (Katakis et al. 2008): {q['labels']} labels, {q['label_cardinality']:.2f} "
        f"labels per sample. Random split 60/20/20 (seed 0): {q['sizes'][0]} train / "
        f"{q['sizes'][1]} validation / {q['sizes'][2]} test. MLP 1836-{cfg['hidden']}-"
        f"{q['labels']}, ReLU, dropout {cfg['dropout']}, AdamW lr {cfg['lr']}, weight decay "
        f"{cfg['weight_decay']}, batch {cfg['batch_size']}, {cfg['epochs']} epochs, for every "
        f"loss; seeds {q['seeds']} (init, dropout, order). Thresholds are on probabilities; only "
        "the '(tuned t)' rows are tuned (on validation, for micro-F1). Macro-F1 and mAP average "
        f"over the labels with a positive in the test split. Training time: {q['seconds']:.0f} s "
        f"for {q['trainings']} trainings.",
        "",
        markdown_table(Table("", ["method", "micro-F1", "macro-F1", "mAP", "threshold"], rows)),
        "",
        "**Claim tested: ZLPR without threshold tuning >= BCE with a tuned threshold.** "
        f"{verdict(zl, bt)} Measured: ZLPR (s > 0) micro-F1 {zl['micro_f1'][0]:.4f} / macro-F1 "
        f"{zl['macro_f1'][0]:.4f}; BCE with a tuned threshold {bt['micro_f1'][0]:.4f} / "
        f"{bt['macro_f1'][0]:.4f}; BCE at 0.5 {b5['micro_f1'][0]:.4f} / "
        f"{b5['macro_f1'][0]:.4f}; ZLPR with a tuned threshold {zt['micro_f1'][0]:.4f} / "
        f"{zt['macro_f1'][0]:.4f}. Against BCE at its default threshold 0.5, untuned ZLPR is "
        f"{compare(zl, b5)}.",
        "",
        "Label smoothing with alpha = 0.1 gives every negative the soft target 0.05; with about "
        f"{negatives:.0f} negatives per row that mass outweighs the positive term, which is how "
        "it can hurt here.",
        "",
        "### Calibration: sigmoid(2s) versus sigmoid(s)",
        "",
        markdown_table(
            Table(
                "",
                ["model, probability map", "ECE (15 bins)"],
                [[k, v] for k, v in q["calibration"].items()],
            )
        ),
        "",
        "![reliability](losses-reliability.png)",
        "",
    ]


def render(results: dict[str, Any], out: Path) -> str:
    default, warm = results["speed_default"], results["speed_warm_allocator"]
    lines = [
        "# Benchmark: ZLPR loss and masked logsumexp",
        "",
        machine_line(results["machine"]) + "  ",
        f"Command: `{results['command']}` ({results['date']}, plan `{results['plan']}`, "
        f"{results['seconds']:.0f} s in all).",
        "",
    ]
    if results["plan"] == "smoke":
        lines += ["**Smoke plan**: tiny sizes and one epoch; these numbers check the code.", ""]
    lines += [
        "## Speed (forward + backward, CPU float32)",
        "",
        "Median over repeated runs (torch.utils.benchmark), kexue and its peer timed in one "
        "process. Targets: 5 positives per row on average. BCE is "
        "`torch.nn.BCEWithLogitsLoss()`. The port is the sentinel formulation (`1e12`, "
        "concatenated zero column, `torch.logsumexp`). `zlpr_loss` runs kexue's native kernel "
        "(`kexue.native`: loss and gradient in two passes per row, built on first use); the "
        "last two columns time the same loss on its eager path (`KEXUE_NATIVE=0`).",
        "",
        "### Goals of the issue, as measured",
        "",
        *goal_lines(default, warm),
        "",
        "### glibc default allocator settings (what most users run)",
        "",
        "Fresh full-size buffers may cost page faults here, depending on glibc's adaptive mmap "
        "threshold: these timings are noisy and can be bimodal between runs.",
        "",
        markdown_table(Table("", LOSS_HEADERS, default["loss"])),
        "",
        markdown_table(Table("", LSE_HEADERS, default["lse"])),
        "",
        "### Allocator that keeps freed memory (no page faults on fresh buffers)",
        "",
        "Same code, child process with "
        + ", ".join(f"`{k}={v}`" for k, v in ALLOCATOR_ENV.items())
        + " (the effect jemalloc/tcmalloc or a long training loop's warm heap have).",
        "",
        markdown_table(Table("", LOSS_HEADERS, warm["loss"])),
        "",
        markdown_table(Table("", LSE_HEADERS, warm["lse"])),
        "",
    ]
    q = results.get("quality")
    if q is None:
        why = results.get("quality_skipped", "not measured")
        lines += ["## Quality on BibTeX", "", f"Skipped: {why}.", ""]
        return "\n".join(lines)
    if "quality_from" in results:
        src = results["quality_from"]
        lines += [
            "The quality part below was measured by an earlier run of this script "
            f"(`{src.get('command')}`, {src.get('date')}) and carried over unchanged from "
            "losses.json; this run re-measured the speed part only.",
            "",
        ]
    return "\n".join(lines + quality_lines(q, out))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--speed-child":
        sizes, min_run_time = json.loads(sys.argv[2])
        print(json.dumps(speed(sizes, min_run_time)))
    else:
        main("losses", measure, render, plans=tuple(PLANS), description=__doc__.split("\n")[0])
