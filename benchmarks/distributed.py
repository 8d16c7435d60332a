"""Many processes: the speed-up of ``estimate_moments`` and ``nll_bpd`` under ``accelerate launch``.

For P in 1, 2 (default plan) CPU processes, ``accelerate launch`` (torchrun under the hood,
one thread per process, gloo) runs this script's worker on the shipped mnist5k model: the
moments over ``images x steps`` (image, step) pairs, then the NLL bound on held-out digits.
The worker times the two calls on rank 0 (start-up excluded) and saves the results, which must
agree across P to float64 rounding (recorded). The page records the machine and its load:
several engineers share its 2 cores, so the speed-up measured here is a lower bound.

    python benchmarks/distributed.py [--plan smoke|default]
    python benchmarks/distributed.py --render-only
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, Table, machine_line, main, markdown_table
from kexue.distributed import free_port

PLANS = {
    "smoke": {"images": 4, "steps": 4, "nll_images": 4, "nll_steps": 3, "nll_batch": 2,
              "processes": [1, 2]},
    "default": {"images": 32, "steps": 40, "nll_images": 32, "nll_steps": 10, "nll_batch": 16,
                "processes": [1, 2]},
}  # fmt: skip


def worker(out: Path, settings: dict[str, Any]) -> None:
    """One process of the launch: join the group, time the two calls, save the results."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=True)
    torch.set_num_threads(1)
    from kexue.diffusion import estimate_moments, load_images, nll_bpd
    from kexue.experiments.diffusion import shipped_model

    model = shipped_model()
    data = load_images("mnist5k")
    held = torch.round((data.heldout[: settings["nll_images"]].double() + 1) * 127.5) / 127.5 - 1
    steps = model.schedule.trajectory(settings["steps"])
    state.wait_for_everyone()
    t0 = time.perf_counter()
    moments = estimate_moments(model, model.schedule, data.train, num_images=settings["images"],
                               timesteps=steps, generator=torch.Generator().manual_seed(0),
                               progress=False)  # fmt: skip
    state.wait_for_everyone()
    t1 = time.perf_counter()
    nll = nll_bpd(model, model.schedule, held, steps=settings["nll_steps"], progress=False,
                  batch_size=settings.get("nll_batch", 250),
                  generator=torch.Generator().manual_seed(1))  # fmt: skip
    state.wait_for_everyone()
    t2 = time.perf_counter()
    if state.is_main_process:
        idx = torch.tensor(steps) - 1
        result = {"processes": state.num_processes, "moments_s": t1 - t0, "nll_s": t2 - t1,
                  "gamma": moments.Gamma[idx].tolist(), "bpd": nll.bpd}  # fmt: skip
        (out / f"p{state.num_processes}.json").write_text(json.dumps(result))


def measure(plan: str, args) -> dict[str, Any]:
    settings = PLANS[plan]
    work = Path(tempfile.mkdtemp(prefix="kexue-distributed-"))  # the workers' result files
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    runs = []
    for p in settings["processes"]:
        cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(p),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(Path(__file__).resolve()),
               "--worker", str(work), json.dumps(settings)]  # fmt: skip
        if p == 1:  # torchrun needs >= 2 processes for --multi_gpu: launch one plainly
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(work),
                   json.dumps(settings)]  # fmt: skip
        wall = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"{p} processes failed:\n{done.stderr[-3000:]}")
        run = json.loads((work / f"p{p}.json").read_text())
        run["wall_s"] = time.perf_counter() - wall
        runs.append(run)
    base = runs[0]
    for run in runs:
        run["gamma_max_abs_diff"] = max(
            abs(a - b) for a, b in zip(run["gamma"], base["gamma"], strict=True)
        )
        run["bpd_abs_diff"] = abs(run["bpd"] - base["bpd"])
    for run in runs:
        del run["gamma"]
    return {"settings": settings, "runs": runs}


def render(results: dict[str, Any], out: Path) -> str:
    s, runs = results["settings"], results["runs"]
    base = runs[0]
    rows = [
        [r["processes"], f"{r['moments_s']:.1f}", f"{base['moments_s'] / r['moments_s']:.2f}x",
         f"{r['nll_s']:.1f}", f"{base['nll_s'] / r['nll_s']:.2f}x",
         f"{r['gamma_max_abs_diff']:.1e}", f"{r['bpd_abs_diff']:.1e}"]
        for r in runs
    ]  # fmt: skip
    table = markdown_table(Table(
        "",
        ["processes", "moments (s)", "speed-up", "NLL (s)", "speed-up", "max abs dGamma",
         "abs d bpd"], rows,
    ))  # fmt: skip
    return f"""# Many processes: estimate_moments and nll_bpd under accelerate launch

`estimate_moments` splits its (image, step) pairs and `nll_bpd` its batches of images (here
{s["nll_batch"]} per batch) over the processes of `accelerate launch` (any initialised
`torch.distributed` group); each pair's noise is keyed
by the seed, the image and the step, and partial sums are reduced in float64, so every process
returns the result of one process (the last two columns: differences against 1 process).

Shipped mnist5k model; moments of {s["images"]} training digits at {s["steps"]} steps
({s["images"] * s["steps"]} model calls), NLL bound of {s["nll_images"]} held-out digits at
K = {s["nll_steps"]}. One thread per process, CPU processes joined by gloo; times on rank 0
between barriers (process start-up and model loading excluded).

{table}

{machine_line(results["machine"])} Plan `{results["plan"]}`, {results["date"]}.

**Not run: GPUs.** No GPU was available in this session; the issue's GPU measurement (several
GPU processes, the 7-hour statistics of the DPM-Solver-v3 paper) is still to be made. On this
shared 2-core machine other jobs compete for the cores, so the CPU speed-up above is a lower
bound of what two idle cores give; the agreement columns do not depend on the load.

Reproduce: `{results["command"]}`
"""


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), json.loads(sys.argv[3]))
    else:
        main("distributed", measure, render, plans=tuple(PLANS),
             description=__doc__.splitlines()[0])  # fmt: skip
