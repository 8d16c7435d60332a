"""Benchmark of kexue.diffusion -> docs/benchmarks/diffusion.md.

1. Sampling loop: kexue's ``sample`` (DDIM, eta = 0) against diffusers' ``DDIMScheduler`` loop
   around the same U-Net, same process, same noise (goal: <= 1.05x diffusers' time); also
   with a trivial eps-model, which exposes the loop overhead alone.
2. Training throughput (images/s) of the default U-Net at batch 64, 1 and 2 threads.
3. Quality of the shipped MNIST-5k model: Fréchet distance (classifier features, against the
   1,000 held-out digits), recognisability and precision/recall for DDPM (eta = 1) and DDIM
   (eta = 0) at K = 10, 25, 50, 100 (and 1000 on fewer images).

Usage: python benchmarks/diffusion_sampling.py [--quick] [--skip-quality]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kexue.diffusion import NoiseSchedule, UNet, sample
from kexue.diffusion.evaluate import DigitEvaluator
from kexue.diffusion.pretrained import ASSETS
from kexue.diffusion.train import TrainConfig, Trainer, load_model
from kexue.experiments.machine import machine_info
from kexue.experiments.tables import Table, markdown_table

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"


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


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def sampling_rows(quick: bool) -> list[list]:
    schedule = NoiseSchedule.su_linear(1000)
    K = 50
    steps = [j * (schedule.T // K) for j in range(1, K + 1)]  # diffusers' "trailing" steps
    rows = []
    models = [
        (
            "default U-Net (shipped weights)" if (ASSETS / "mnist5k").exists() else "default U-Net",
            _shipped_or_random(),
            16,
        ),
        ("trivial eps-model (loop overhead)", lambda x, t: 0.1 * x, 16),
    ]
    for label, model, n in models:
        x_T = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        ours = sample(model, schedule, x_T.shape, steps=steps, eta=0.0, x_T=x_T, progress=False)
        theirs = diffusers_loop(model, schedule, x_T, K)
        err = float((ours - theirs).abs().max() / theirs.abs().max())
        repeats = 2 if quick else 5
        t_ours = best_of(
            lambda m=model, x=x_T: sample(
                m, schedule, x.shape, steps=steps, eta=0.0, x_T=x, progress=False
            ),
            repeats,
        )
        t_theirs = best_of(lambda m=model, x=x_T: diffusers_loop(m, schedule, x, K), repeats)
        rows.append(
            [label, f"{n} x 28x28, K={K}", t_theirs * 1e3, t_ours * 1e3, t_ours / t_theirs, err]
        )
    return rows


def _shipped_or_random():
    if (ASSETS / "mnist5k" / "ema.safetensors").exists():
        return load_model(ASSETS / "mnist5k")[0]
    return UNet().eval()


def training_rows(quick: bool) -> list[list]:
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        trainer = Trainer(
            TrainConfig(steps=3, ckpt_every=10**6, sample_every=0), "/tmp/kexue-bench-run"
        )
        trainer.train(progress=False)  # warm-up
        trainer.config.steps = 3 + (10 if quick else 40)
        result = trainer.train(progress=False)
        rows.append([threads, trainer.unwrapped.num_parameters(), 64, result["images_per_s"]])
    torch.set_num_threads(2)
    return rows


def quality_rows(quick: bool, device: str = "cpu") -> tuple[list[list], float]:
    model, schedule = load_model(ASSETS / "mnist5k")
    model.to(device)
    evaluator = DigitEvaluator()
    plan = [(k, 500) for k in (10, 25, 50, 100)] + [(1000, 200), (100, 200)]
    if device != "cpu":  # an accelerator affords 1,000 images at every K
        plan = [(k, 1000) for k in (10, 25, 50, 100, 1000)]
    if quick:
        plan = [(10, 100), (50, 100)]
    rows = []
    start = time.perf_counter()
    for K, n in plan:
        for name, eta in (("DDPM", 1.0), ("DDIM", 0.0)):
            images = sample(
                model,
                schedule,
                (n, 1, 28, 28),
                steps=K if K < schedule.T else None,
                eta=eta,
                x_T=torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(K)).to(
                    device
                ),
                generator=torch.Generator(device).manual_seed(K),
                progress=False,
            )
            q = evaluator(images.cpu())
            rows.append(
                [name, K, n, q.frechet, q.confidence, q.label_entropy, q.precision, q.recall]
            )
    reference = evaluator(evaluator_reference_images(500))
    rows.append(
        [
            "held-out real digits",
            "-",
            500,
            reference.frechet,
            reference.confidence,
            reference.label_entropy,
            reference.precision,
            reference.recall,
        ]
    )
    return rows, time.perf_counter() - start


def evaluator_reference_images(n: int) -> torch.Tensor:
    """Real training digits (not the held-out reference itself) as a ceiling for the metrics."""
    from kexue.diffusion.data import load_images

    return load_images("mnist5k").train[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--device", default="cpu", help="quality part: where the model runs")
    parser.add_argument(
        "--quality-only", type=Path, default=None, help="run the quality part only -> this JSON"
    )
    parser.add_argument(
        "--quality-json", type=Path, default=None, help="quality rows from a --quality-only run"
    )
    args = parser.parse_args()
    if args.quality_only is not None:
        if torch.device(args.device).type == "cuda":  # TF32 convs differ from float32 by ~1e-2
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        rows, seconds = quality_rows(args.quick, args.device)
        args.quality_only.parent.mkdir(parents=True, exist_ok=True)
        args.quality_only.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "seconds": seconds,
                    "machine": machine_info(),
                    "device": args.device,
                    "command": " ".join(sys.argv),
                },
                indent=2,
                default=float,
            )
        )
        print(json.dumps(rows, default=float))
        return
    machine = machine_info()
    lines = [
        "# Benchmark: diffusion sampling, training throughput, shipped model quality",
        "",
        f"Machine: {machine['summary']}; {machine['os']}.  ",
        f"Command: `python benchmarks/diffusion_sampling.py{' --quick' if args.quick else ''}` "
        f"({time.strftime('%Y-%m-%d')}).",
        "",
        "## Sampling loop: kexue vs diffusers (same U-Net, same noise, same process)",
        "",
        "DDIM, eta = 0, su_linear schedule (T = 1000), diffusers' `DDIMScheduler` with "
        "'trailing' spacing and kexue's explicit kept steps 20, 40, ..., 1000 (the same "
        "trajectory). Best of repeated runs. Goal: kexue <= 1.05x diffusers.",
        "",
        markdown_table(
            Table(
                "",
                [
                    "eps-model",
                    "batch",
                    "diffusers ms",
                    "kexue ms",
                    "kexue/diffusers",
                    "max rel. difference",
                ],
                sampling_rows(args.quick),
            )
        ),
        "",
        "## Training throughput of the default U-Net",
        "",
        markdown_table(
            Table(
                "", ["torch threads", "parameters", "batch", "images/s"], training_rows(args.quick)
            )
        ),
        "",
    ]
    if args.quality_json is not None:
        stored = json.loads(args.quality_json.read_text())
        rows, seconds = stored["rows"], stored["seconds"]
        where = (
            f"on {stored['machine'].get('cuda') or stored['device']} (TF32 off; "
            f"`{stored['command']}`)"
        )
    elif not args.skip_quality and (ASSETS / "mnist5k" / "ema.safetensors").exists():
        rows, seconds = quality_rows(args.quick)
        where = "on the CPU above"
    if (args.quality_json is not None or not args.skip_quality) and (
        ASSETS / "mnist5k" / "ema.safetensors"
    ).exists():
        n_note = (
            "K = 1000 runs on 200 images only (CPU time); K = 100 is repeated at n = 200 for "
            "comparison."
            if any(r[2] == 200 for r in rows if r[1] != "-")
            else "1,000 generated images at every K."
        )
        info = (ASSETS / "mnist5k" / "config.json").read_text()
        lines += [
            "## Shipped MNIST-5k model: sample quality against K",
            "",
            "Features and probabilities from the shipped digit classifier "
            "(`kexue.diffusion.evaluate`, 97.2% held-out accuracy). Fréchet distance to the "
            "1,000 held-out digits (lower is better; it grows as n shrinks, so compare rows "
            "with the same n), mean max-softmax confidence, entropy of the predicted-label "
            "histogram (log 10 = 2.303 is perfectly balanced), k-NN (k = 3) precision/recall. "
            f"{n_note} Sampling + scoring time: {seconds:.0f} s {where}.",
            "",
            markdown_table(
                Table(
                    "",
                    [
                        "sampler",
                        "K",
                        "n",
                        "Fréchet",
                        "confidence",
                        "label entropy",
                        "precision",
                        "recall",
                    ],
                    rows,
                )
            ),
            "",
            "Model config and the command that produced it:",
            "",
            "```json",
            info.strip(),
            "```",
            "",
        ]
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "diffusion.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
