"""The memory probe: one :func:`kexue.lst.run` per process, with its peak training memory.

``python -m kexue.lst.measure '<json>'`` (or :func:`measure_in_subprocess`) runs one
:class:`~kexue.lst.RunSpec` in a fresh process and prints one JSON line: the run's results
(:meth:`RunResult.to_dict`) plus the memory it measured.

Peak training memory (Linux): once the backbone and data are loaded, the process's
resident-set high-water mark is reset (``/proc/self/clear_refs``); when training has finished
(before evaluation), ``VmHWM - VmRSS(at reset)`` is the most memory training added on top of
the loaded backbone and data (weights' gradients, optimiser state, activations kept for
backward, caches, allocator slack). ``idle=True`` only loads, which gives the baseline of the
whole-process high-water mark. On a GPU the peak of memory allocated by torch on the device
during training is recorded too (``cuda_peak_train_mib``).

``processes=N`` (``N > 1``) runs the spec data-parallel under ``torchrun`` on ``N`` processes
(CPU processes with ``device="cpu"``); the JSON line is process 0's, and its memory is that
of one process (each holds a replica of the backbone).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from kexue.distributed import free_port, is_main_process
from kexue.lst.run import RunSpec, load_inputs, run
from kexue.validation import check_int

MIB = 2**20


def memory_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in bytes (0 when /proc is unavailable)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def reset_peak_memory() -> bool:
    """Reset this process's resident-set high-water mark (Linux); False where impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(spec: RunSpec, *, threads: int | None = None, idle: bool = False) -> dict[str, Any]:
    """Run ``spec`` in this process (no progress bars) and add memory readings to its
    results; ``threads`` sets torch's thread count first; ``idle`` stops after loading."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(int(threads))
    inputs = load_inputs(spec)
    loaded = memory_status()
    header = {
        "threads": torch.get_num_threads(),
        "rss_loaded_mib": loaded["VmRSS"] / MIB,
        "hwm_loading_mib": loaded["VmHWM"] / MIB,
    }
    if idle:
        return {**header, "spec": spec.to_dict(), "idle": True}
    reset = reset_peak_memory()
    base = memory_status()["VmRSS"]

    cuda = torch.cuda.is_available() and spec.device != "cpu"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()

    def after_training() -> dict[str, Any]:
        after = memory_status()
        out = {
            "peak_reset": reset,
            "peak_train_mib": (after["VmHWM"] - base) / MIB if reset else float("nan"),
            "hwm_total_mib": after["VmHWM"] / MIB,
        }
        if cuda:
            torch.cuda.synchronize()
            out["cuda_peak_train_mib"] = (torch.cuda.max_memory_allocated() - cuda_base) / MIB
        return out

    result = run(spec, inputs=inputs, progress=False, after_training=after_training)
    return {**header, **result.to_dict()}


def measure_in_subprocess(
    spec: RunSpec,
    *,
    threads: int | None = None,
    idle: bool = False,
    timeout: float | None = None,
    processes: int = 1,
) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process (so memory peaks do not mix), or in
    ``processes`` data-parallel ones started by ``torchrun``."""
    processes = check_int(processes, "processes", low=1)
    payload = json.dumps({"spec": spec.to_dict(), "threads": threads, "idle": idle})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        launcher += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    proc = subprocess.run(
        [*launcher, "-m", "kexue.lst.measure", payload],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measured run failed ({spec.method}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    measured = measure(
        RunSpec.from_dict(request["spec"]),
        threads=request.get("threads"),
        idle=bool(request.get("idle")),
    )
    if is_main_process():
        print(json.dumps(measured), flush=True)
