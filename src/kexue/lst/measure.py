"""One measured training run per process: accuracy, time per step/epoch, peak training memory.

``python -m kexue.lst.measure '<json spec>'`` (or ``measure_in_subprocess(spec)``) loads the
backbone and the data, then trains and evaluates one method and prints one JSON line.

Peak training memory (Linux): once the model and data are loaded, the process's resident-set
high-water mark is reset (``/proc/self/clear_refs``); after training, ``VmHWM - VmRSS(at
reset)`` is the most memory training added on top of the loaded backbone and data (weights'
gradients, optimiser state, activations kept for backward, caches, allocator slack). The
``"idle"`` method only loads, which gives the baseline of the whole-process high-water mark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

MIB = 2**20


def _status() -> dict[str, int]:
    """VmRSS and VmHWM in bytes (0 when /proc is unavailable)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run(spec: dict) -> dict:
    """Train and evaluate as ``spec`` says (keys: see ``DEFAULTS``); returns the numbers."""
    spec = {**DEFAULTS, **spec}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers.utils import logging as hf_logging

    from kexue.lst.config import LSTConfig
    from kexue.lst.data import encode, read_tsv
    from kexue.lst.model import trainable_parameters
    from kexue.lst.train import (
        DEFAULT_LR,
        TrainSettings,
        accuracy,
        build_model,
        load_backbone,
        train_classifier,
    )

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if spec["threads"]:
        torch.set_num_threads(int(spec["threads"]))
    seed = int(spec["seed"])
    torch.manual_seed(seed)
    backbone, tokenizer = load_backbone(spec["backbone"])
    texts, labels = read_tsv(spec["train"])
    if spec["train_size"] and spec["train_size"] < len(texts):
        pick = torch.Generator().manual_seed(int(spec["subset_seed"]))
        keep = torch.randperm(len(texts), generator=pick)[: int(spec["train_size"])].tolist()
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    train_set = encode(tokenizer, texts, labels, int(spec["max_length"]))
    eval_texts, eval_labels = read_tsv(spec["eval"])
    eval_set = encode(tokenizer, eval_texts, eval_labels, int(spec["max_length"]))
    num_labels = max(labels) + 1
    loaded = _status()
    result: dict = {
        "spec": spec,
        "threads": torch.get_num_threads(),
        "rss_loaded_mib": loaded["VmRSS"] / MIB,
        "hwm_loading_mib": loaded["VmHWM"] / MIB,
        "train_examples": len(train_set),
        "eval_examples": len(eval_set),
        "mean_train_tokens": sum(len(x) for x in train_set.ids) / len(train_set),
    }
    if spec["method"] == "idle":
        return result
    reset = _reset_peak()
    base = _status()["VmRSS"]
    method = spec["method"]
    gen = torch.Generator().manual_seed(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    config = LSTConfig(
        reduction_factor=int(spec["reduction_factor"]),
        init=spec["init"],
        fisher_samples=int(spec["fisher_samples"]),
        num_labels=num_labels,
    )
    model = build_model(
        method,
        backbone,
        num_labels,
        lst_config=config,
        init_data=train_set.batches(int(spec["batch_size"]), generator=gen),
        generator=gen,
    )
    build_seconds = time.perf_counter() - t0
    build_cpu_seconds = time.process_time() - c0
    settings = TrainSettings(
        epochs=int(spec["epochs"]),
        batch_size=int(spec["batch_size"]),
        lr=float(spec["lr"] or DEFAULT_LR[method]),
        seed=seed,
        cache_backbone=bool(spec["cache_backbone"]),
        cache_dtype=spec["cache_dtype"],
    )
    stats = train_classifier(model, train_set, settings)
    after = _status()
    t1 = time.perf_counter()
    acc = accuracy(model, eval_set)
    trainable, total = trainable_parameters(model)
    summary = stats.summary()
    summary.pop("losses")
    result.update(
        {
            "accuracy": acc,
            "eval_seconds": time.perf_counter() - t1,
            "trainable": trainable,
            "total": total,
            "build_seconds": build_seconds,
            "build_cpu_seconds": build_cpu_seconds,
            "lr": settings.lr,
            "peak_reset": reset,
            "peak_train_mib": (after["VmHWM"] - base) / MIB if reset else float("nan"),
            "hwm_total_mib": after["VmHWM"] / MIB,
            "step_seconds": stats.step_seconds,
            "loss_curve": stats.losses,
            **summary,
        }
    )
    if hasattr(model, "gate_values"):
        result["gates"] = {k: v.tolist() for k, v in model.gate_values().items()}
    return result


DEFAULTS: dict = {
    "backbone": None,
    "train": None,
    "eval": None,
    "method": "lst",
    "init": "fisher",
    "train_size": None,
    "subset_seed": 0,
    "max_length": 128,
    "seed": 0,
    "epochs": 3,
    "batch_size": 32,
    "lr": None,
    "reduction_factor": 8,
    "fisher_samples": 1024,
    "cache_backbone": False,
    "cache_dtype": "float32",
    "threads": None,
}


def measure_in_subprocess(spec: dict, timeout: float | None = None) -> dict:
    """``run(spec)`` in a fresh Python process (so memory peaks do not mix)."""
    proc = subprocess.run(
        [sys.executable, "-m", "kexue.lst.measure", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measured run failed ({spec.get('method')}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
