"""Benchmark of kexue.diffusion -> docs/benchmarks/diffusion.{json,md}.

1. Sampling loop: kexue's ``sample`` (DDIM, eta = 0) against diffusers' ``DDIMScheduler`` loop
   around the same U-Net, same process, same noise (goal: <= 1.05x diffusers' time); also
   with a trivial eps-model, which exposes the loop overhead alone.
2. Training throughput (images/s) of the default U-Net at batch 64, 1 and 2 threads.
3. The shipped digit classifier's accuracy on the 1,000 held-out digits (it scores samples).
4. Quality of the shipped MNIST-5k model: Fréchet distance (classifier features, against the
   1,000 held-out digits), recognisability and precision/recall for DDPM (eta = 1) and DDIM
   (eta = 0) at several K.

Plans: ``smoke`` (seconds; what the slow test runs), ``default`` (CPU: K = 10..100 at
n = 250, about 6 minutes on 2 cores) and ``large`` (for an accelerator, ``--device cuda``:
n = 1,000 at K = 10..1000).

    python benchmarks/diffusion_sampling.py [--plan smoke|default|large] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from _common import Table, machine_line, main, markdown_table, wall_seconds
from kexue.diffusion import (
    DigitEvaluator,
    NoiseSchedule,
    classifier_accuracy,
    load_images,
    sample,
)
from kexue.experiments.diffusion import (
    QUALITY_HEADERS,
    generate,
    quality_row,
    shipped_model,
    training_images_per_s,
)

PLANS: dict[str, dict[str, Any]] = {
    "smoke": {"loop": (2, 5, 1), "train_steps": 1, "threads": (1,), "quality": [(5, 16)],
              "real_n": 16},
    "default": {"loop": (16, 50, 5), "train_steps": 40, "threads": (1, 2),
                "quality": [(10, 250), (25, 250), (50, 250), (100, 250)], "real_n": 250},
    "large": {"loop": (16, 50, 5), "train_steps": 40, "threads": (1, 2),
              "quality": [(k, 1000) for k in (10, 25, 50, 100, 1000)], "real_n": 1000},
}  # fmt: skip


LOOP_HEADERS = ["eps-model", "batch", "diffusers ms", "kexue ms", "kexue/diffusers",
                "max rel. difference"]  # fmt: skip


def diffusers_loop(model, schedule: NoiseSchedule, x_T: torch.Tensor, K: int) -> torch.Tensor:
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        num_train_timesteps=schedule.T,
        trained_betas=schedule.to_diffusers_betas().float(),
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )
    sched.set_timesteps(K)
    x = x_T.clone()
    with torch.no_grad():
        for k in sched.timesteps:
            eps = model(x, torch.full((len(x),), int(k) + 1))
            x = sched.step(eps, int(k), x, eta=0.0).prev_sample
    return x


def loop_rows(n: int, K: int, repeats: int) -> list[list]:
    """kexue against diffusers on diffusers' 'trailing' steps T/K, 2T/K, ..., T."""
    model = shipped_model()
    schedule = model.schedule
    steps = [j * (schedule.T // K) for j in range(1, K + 1)]
    rows = []
    for label, eps_model in (
        ("default U-Net (shipped weights)", model),
        ("trivial eps-model (loop overhead)", lambda x, t: 0.1 * x),
    ):
        x_T = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))

        def ours(m=eps_model, x=x_T):
            return sample(m, schedule, x.shape, steps=steps, eta=0.0, x_T=x, progress=False)

        def theirs_loop(m=eps_model, x=x_T):
            return diffusers_loop(m, schedule, x, K)

        t_ours, mine = wall_seconds(ours, repeats)
        t_theirs, theirs = wall_seconds(theirs_loop, repeats)
        err = float((mine - theirs).abs().max() / theirs.abs().max())
        rows.append([label, f"{n} x 28x28, K={K}", t_theirs * 1e3, t_ours * 1e3,
                     t_ours / t_theirs, err])  # fmt: skip
    return rows


def training_rows(steps: int, threads: tuple[int, ...]) -> list[list]:
    rows = []
    before = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            rows.append([n, shipped_model().num_parameters(), 64, training_images_per_s(steps)])
    finally:
        torch.set_num_threads(before)
    return rows


def quality(plan: dict[str, Any], device: str) -> dict[str, Any]:
    if torch.device(device).type == "cuda":  # TF32 convolutions differ from float32 by ~1e-2
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    model = shipped_model(device)
    data = load_images("mnist5k")
    evaluator = DigitEvaluator(reference=data.heldout)
    start = time.perf_counter()
    rows = []
    for K, n in plan["quality"]:
        for name, eta in (("DDPM", 1.0), ("DDIM", 0.0)):
            images = generate(model, model.schedule, K, eta, None, n, seed=K)
            rows.append([name, K, n, *quality_row(evaluator, images)])
    real_n = plan["real_n"]
    rows.append(["real training digits", "-", real_n,
                 *quality_row(evaluator, data.train[:real_n])])  # fmt: skip
    accuracy = classifier_accuracy(evaluator.classifier, data.heldout, data.heldout_labels)
    return {
        "rows": rows,
        "seconds": time.perf_counter() - start,
        "device": device,
        "classifier_accuracy": accuracy,
        "heldout": len(data.heldout),
    }


def measure(plan_name: str, args: argparse.Namespace) -> dict[str, Any]:
    plan = PLANS[plan_name]
    n, K, repeats = plan["loop"]
    info = shipped_model().info
    out = {
        "plan_sizes": plan,
        "loop": loop_rows(n, K, repeats),
        "training": training_rows(plan["train_steps"], plan["threads"]),
        "quality": quality(plan, args.device),
        "model": {k: info.get(k) for k in ("step", "command", "image_shape", "train")},
    }
    print(f"classifier accuracy {out['quality']['classifier_accuracy']:.4f}")
    return out


def render(results: dict[str, Any], out: Path) -> str:
    q = results["quality"]
    sizes = sorted({(r[1], r[2]) for r in q["rows"] if r[1] != "-"})
    where = "the CPU above" if q["device"] == "cpu" else f"{q['device']} (TF32 off)"
    return "\n".join(
        [
            "# Benchmark: diffusion sampling, training throughput, shipped model quality",
            "",
            machine_line(results["machine"]) + "  ",
            f"Command: `{results['command']}` ({results['date']}, plan `{results['plan']}`, "
            f"{results['seconds'] / 60:.1f} min).",
            "",
            "## Sampling loop: kexue vs diffusers (same U-Net, same noise, same process)",
            "",
            "DDIM, eta = 0, su_linear schedule (T = 1000), diffusers' `DDIMScheduler` with "
            "'trailing' spacing and kexue's explicit kept steps T/K, 2T/K, ..., T (the same "
            "trajectory). Median of repeated runs after a warm-up. Goal: kexue <= 1.05x "
            "diffusers.",
            "",
            markdown_table(Table("", LOOP_HEADERS, results["loop"])),
            "",
            "## Training throughput of the default U-Net",
            "",
            markdown_table(
                Table("", ["torch threads", "parameters", "batch", "images/s"], results["training"])
            ),
            "",
            "## Shipped MNIST-5k model: sample quality against K",
            "",
            f"Features and probabilities from the shipped digit classifier "
            f'(`DigitClassifier.from_pretrained("mnist5k")`; measured here: '
            f"{100 * q['classifier_accuracy']:.1f}% accuracy on the {q['heldout']:,} held-out "
            "digits). Fréchet distance to the held-out digits (lower is better; it grows as n "
            "shrinks, so compare rows with the same n), mean max-softmax confidence, entropy of "
            "the predicted-label histogram (log 10 = 2.303 is perfectly balanced), k-NN (k = 3) "
            f"precision/recall. Sizes (K, n): {', '.join(f'({k}, {n})' for k, n in sizes)}; "
            f"each row starts from its own seeded x_T (seed K) and runs K model calls on "
            "`sample`'s default trailing steps T/K, ..., T (even steps 1, ..., T before issue "
            "12; docs/benchmarks/few_step.md compares both). Sampling + scoring: "
            f"{q['seconds']:.0f} s on {where}.",
            "",
            markdown_table(Table("", ["sampler", "K", "n", *QUALITY_HEADERS], q["rows"])),
            "",
            "Model config (the shipped model's `info`):",
            "",
            "```json",
            json.dumps(results["model"], indent=2),
            "```",
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="quality part: where the model runs")


if __name__ == "__main__":
    main(
        "diffusion",
        measure,
        render,
        plans=tuple(PLANS),
        description=__doc__.split("\n")[0],
        add_arguments=add_arguments,
    )
