"""``kexue diffusion ...``: train, sample and export diffusion models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Diffusion models: train (DDPM), sample (DDPM/DDIM), export.", no_args_is_help=True
)


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint=name
        ) from None


def resolve_model_path(ckpt: str) -> Path:
    """A shipped model name (``mnist5k``) or a folder (run, checkpoint or exported model)."""
    from kexue.diffusion.pretrained import ASSETS, available

    if (ASSETS / ckpt / "ema.safetensors").exists():
        return ASSETS / ckpt
    path = Path(ckpt)
    if not path.exists():
        raise typer.BadParameter(
            f"{ckpt!r} is neither a folder nor a shipped model {available()}", param_hint="--ckpt"
        )
    return path


@app.command()
def train(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder (config, checkpoints, samples).")
    ],
    data: Annotated[str, typer.Option(help="mnist5k | digits8x8 | folder:PATH")] = "mnist5k",
    steps: Annotated[int, typer.Option(help="Total optimiser steps.")] = 20_000,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue OUT from its last checkpoint.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Global batch size.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 2e-4,
    warmup: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 500,
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the sampling weights.")] = 0.999,
    grad_clip: Annotated[float, typer.Option(help="Gradient-norm clip (0 = off).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of every random draw.")] = 0,
    ckpt_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 500,
    sample_every: Annotated[int, typer.Option(help="Sample grid every N steps (0 = off).")] = 2000,
    channels: Annotated[int, typer.Option(help="U-Net base width.")] = 32,
    channel_mults: Annotated[str, typer.Option(help="Width multipliers per level.")] = "1,2,3",
    blocks: Annotated[int, typer.Option(help="Residual blocks per level.")] = 2,
    attention_levels: Annotated[
        str, typer.Option(help="Levels with self-attention, e.g. '2'.")
    ] = "",
    schedule: Annotated[str, typer.Option(help="su_linear | ddpm_linear | cosine")] = "su_linear",
    T: Annotated[int, typer.Option("--T", help="Number of diffusion steps.")] = 1000,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Train a U-Net eps-model (DDPM loss summed over pixels, EMA, crash-safe checkpoints).

    Multi-GPU: ``accelerate launch -m kexue.cli diffusion train ...``.
    """
    from kexue.diffusion.checkpoint import CheckpointError
    from kexue.diffusion.train import TrainConfig, Trainer

    if resume:
        try:
            trainer = Trainer.resume(out, steps=steps)
        except CheckpointError as err:
            raise typer.BadParameter(str(err), param_hint="--out") from None
    else:
        if schedule not in ("su_linear", "ddpm_linear", "cosine"):
            raise typer.BadParameter(f"unknown schedule {schedule!r}", param_hint="--schedule")
        unet = {
            "channels": channels,
            "channel_mults": _ints(channel_mults, "--channel-mults"),
            "blocks": blocks,
            "attention_levels": _ints(attention_levels, "--attention-levels"),
            "T": T,
        }
        try:
            config = TrainConfig(
                data=data, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                ema_decay=ema_decay, grad_clip=grad_clip, seed=seed, ckpt_every=ckpt_every,
                sample_every=sample_every, schedule={"kind": schedule, "T": T}, unet=unet,
            )  # fmt: skip
            trainer = Trainer.create(config, out)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
    result = trainer.train(progress=progress)
    if trainer.accelerator.is_main_process:
        typer.echo(
            f"step {result['step']}: loss {result['loss']:.3f}, "
            f"{result['images_per_s']:.1f} images/s; checkpoints in {out / 'checkpoints'}"
        )


@app.command("sample")
def sample_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG grid to write.")] = Path(
        "samples.png"
    ),
    ckpt: Annotated[
        str, typer.Option(help="Built-in model name or a run/model folder.")
    ] = "mnist5k",
    steps: Annotated[int, typer.Option(help="Number of kept steps K (1000 = all).")] = 100,
    spacing: Annotated[str, typer.Option(help="even | quadratic")] = "even",
    eta: Annotated[float, typer.Option(help="1 = DDPM, 0 = DDIM.")] = 1.0,
    variance: Annotated[str, typer.Option(help="eta | small | large")] = "eta",
    n: Annotated[int, typer.Option(help="Number of images.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the noise.")] = 0,
    clip_x0: Annotated[float, typer.Option(help="Clamp x0 estimates (0 = off).")] = 0.0,
) -> None:
    """Sample a grid of images from a trained model."""
    import torch

    from kexue.diffusion.images import save_image_grid
    from kexue.diffusion.sampler import sample
    from kexue.diffusion.train import load_model

    if variance not in ("eta", "small", "large"):
        raise typer.BadParameter("must be eta, small or large", param_hint="--variance")
    if n < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--n")
    model, schedule = load_model(resolve_model_path(ckpt))
    if not 2 <= steps <= schedule.T:
        raise typer.BadParameter(f"must be in 2..{schedule.T}", param_hint="--steps")
    if spacing not in ("even", "quadratic"):
        raise typer.BadParameter("must be even or quadratic", param_hint="--spacing")
    if eta < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--eta")
    shape = (n, model.config.in_channels, *_image_size(resolve_model_path(ckpt)))
    images = sample(
        model,
        schedule,
        shape,
        steps=steps if steps < schedule.T else None,
        spacing=spacing,
        eta=eta,
        variance=None if variance == "eta" else variance,
        generator=torch.Generator().manual_seed(seed),
        clip_x0=clip_x0 or None,
    )
    save_image_grid(images, out)
    typer.echo(f"wrote {n} samples to {out}")


def _image_size(path: Path) -> tuple[int, int]:
    import json

    from kexue.diffusion.checkpoint import load_checkpoint

    config_file = path / "config.json"
    if config_file.exists():
        shape = json.loads(config_file.read_text()).get("image_shape")
    else:
        shape = load_checkpoint(path)[1]["config"]["image_shape"]
    return int(shape[1]), int(shape[2])


@app.command()
def export(
    run: Annotated[Path, typer.Option(help="Training run folder.")],
    to: Annotated[Path, typer.Option(help="Folder for ema.safetensors + config.json.")],
    command: Annotated[str, typer.Option(help="The command that produced the run.")] = "",
) -> None:
    """Export a run's EMA weights and config as a small model folder."""
    from kexue.diffusion.checkpoint import CheckpointError
    from kexue.diffusion.train import export_model

    try:
        path = export_model(run, to, command)
    except CheckpointError as err:
        raise typer.BadParameter(str(err), param_hint="--run") from None
    typer.echo(f"exported to {path}")
