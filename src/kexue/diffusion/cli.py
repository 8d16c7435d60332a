"""``kexue diffusion ...``: train, sample and export diffusion models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help=(
        "Diffusion models: train (DDPM), sample (DDPM/DDIM, fixed or analytic variance), export, "
        "train-variance (SN/NPR variance heads), nll (the likelihood bound in bits/dim)."
    ),
    no_args_is_help=True,
)


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint=name
        ) from None


def load_model(ckpt: str):
    """``--ckpt``: a shipped model name (``mnist5k``), a saved model folder, a training run folder
    (its ``model/``; a run without one: the EMA of its latest checkpoint) or a checkpoint."""
    from kexue.diffusion.train import ema_from_checkpoint
    from kexue.diffusion.unet import RUN_MODEL_DIR, UNet
    from kexue.exceptions import CheckpointError

    path = Path(ckpt)
    try:
        if not (path / RUN_MODEL_DIR).is_dir() and (
            (path / "checkpoints").is_dir() or (path / "state.json").is_file()
        ):
            return ema_from_checkpoint(path)
        return UNet.from_pretrained(ckpt)
    except (ValueError, CheckpointError) as err:
        raise typer.BadParameter(str(err), param_hint="--ckpt") from None


def model_moments(
    model,
    images,
    image_shape,
    folder: Path | None,
    steps: list[int] | None,
    num_images: int,
    generator,
    progress: bool,
):
    """The moments behind ``--variance analytic*``: loaded from ``folder`` when it holds them
    (checked against the model and the image shape), else estimated (at ``steps`` only when no
    ``folder`` is given, at every step otherwise) and saved to ``folder``."""
    from kexue.diffusion.moments import DiffusionMoments, estimate_moments, model_fingerprint
    from kexue.exceptions import CheckpointError

    schedule = model.schedule
    if folder is not None and (folder / "config.json").exists():
        try:
            stats = DiffusionMoments.from_pretrained(folder)
            stats.check(schedule, image_shape)
            if steps is not None:
                stats.check_steps(steps)
        except (ValueError, CheckpointError) as err:
            raise typer.BadParameter(str(err), param_hint="--moments") from None
        recorded = stats.info.get("model_sha256")
        if recorded and recorded != model_fingerprint(model):
            raise typer.BadParameter(
                "these moments were estimated for another model", param_hint="--moments"
            )
        return stats
    stats = estimate_moments(
        model, schedule, images, num_images=num_images,
        timesteps=steps if folder is None else None, generator=generator, progress=progress,
    )  # fmt: skip
    if folder is not None:
        stats.save_pretrained(folder)
    return stats


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
    timesteps: Annotated[
        int, typer.Option("--timesteps", help="Number of diffusion steps T of the schedule.")
    ] = 1000,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Train a U-Net eps-model (DDPM loss summed over pixels, EMA, crash-safe checkpoints).

    Multi-GPU: ``accelerate launch -m kexue.cli diffusion train ...``.
    """
    from kexue.diffusion.train import DiffusionTrainConfig, Trainer
    from kexue.exceptions import CheckpointError

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
            "T": timesteps,
        }
        try:
            config = DiffusionTrainConfig(
                data=data, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                ema_decay=ema_decay, grad_clip=grad_clip, seed=seed, ckpt_every=ckpt_every,
                sample_every=sample_every, schedule={"kind": schedule, "T": timesteps}, unet=unet,
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
    variance: Annotated[
        str,
        typer.Option(
            help="eta | small | large | analytic[-gamma|-moment|-mle|-diag|-mle-diag] (the "
            "optimal variance from the model's moments, see --moments)"
        ),
    ] = "eta",
    moments: Annotated[
        Path | None,
        typer.Option(
            help="Moments folder for --variance analytic*: loaded if present, else estimated "
            "on --data and saved there (default: estimated at the kept steps, not saved)."
        ),
    ] = None,
    data: Annotated[
        str, typer.Option(help="Training data of the moments (mnist5k | digits8x8 | folder:PATH).")
    ] = "mnist5k",
    moment_images: Annotated[int, typer.Option(help="Training images for the moments.")] = 100,
    n: Annotated[int, typer.Option(help="Number of images.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the noise.")] = 0,
    clip_x0: Annotated[float, typer.Option(help="Clamp x0 estimates (0 = off).")] = 0.0,
    size: Annotated[
        str, typer.Option(help="Image height,width (default: the model's training size).")
    ] = "",
) -> None:
    """Sample a grid of images from a trained model.

    --variance analytic (Analytic-DPM) replaces the fixed reverse variance by the optimal one,
    computed from the model's moments over training data: pass --moments DIR to estimate them
    once for all T steps (saved there) and reuse them on later calls.
    """
    import torch

    from kexue.diffusion.images import save_image_grid
    from kexue.diffusion.sampler import sample

    if variance not in ("eta", *VARIANCES):
        raise typer.BadParameter(
            f"must be one of eta, {', '.join(VARIANCES)}", param_hint="--variance"
        )
    if n < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--n")
    if moment_images < 2:
        raise typer.BadParameter("must be >= 2", param_hint="--moment-images")
    model = load_model(ckpt)
    schedule = model.schedule
    if schedule is None:
        raise typer.BadParameter("this model was saved without its schedule", param_hint="--ckpt")
    if size:
        hw = _ints(size, "--size")
        if len(hw) != 2 or min(hw) < 1:
            raise typer.BadParameter("expected two positive integers H,W", param_hint="--size")
    elif model.info.get("image_shape"):
        hw = [int(v) for v in model.info["image_shape"][1:]]
    else:
        raise typer.BadParameter("the model does not record its image size", param_hint="--size")
    if not 2 <= steps <= schedule.T:
        raise typer.BadParameter(f"must be in 2..{schedule.T}", param_hint="--steps")
    if spacing not in ("even", "quadratic"):
        raise typer.BadParameter("must be even or quadratic", param_hint="--spacing")
    if eta < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--eta")
    shape = (n, model.config.in_channels, *hw)
    kept = schedule.trajectory(steps, spacing) if steps < schedule.T else None
    spec: str | torch.Tensor | None = None if variance == "eta" else variance
    if variance.startswith("analytic"):
        from kexue.diffusion.data import load_images
        from kexue.diffusion.variance import optimal_variance

        try:
            data_images = load_images(data)
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--data") from None
        stats = model_moments(model, data_images, shape[1:], moments, kept, moment_images,
                              torch.Generator().manual_seed(seed), progress=True)  # fmt: skip
        try:
            spec = optimal_variance(stats, schedule, kept, kind=variance, eta=eta, shape=shape[1:])
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--moments") from None
    images = sample(
        model,
        schedule,
        shape,
        steps=kept,
        spacing=spacing,
        eta=eta,
        variance=spec,
        generator=torch.Generator().manual_seed(seed),
        clip_x0=clip_x0 or None,
    )
    assert isinstance(images, torch.Tensor)  # no trajectory asked for
    save_image_grid(images, out)
    typer.echo(f"wrote {n} samples to {out}")


@app.command()
def export(
    run: Annotated[Path, typer.Option(help="Training run folder.")],
    to: Annotated[Path, typer.Option(help="Folder for ema.safetensors + config.json.")],
    command: Annotated[str, typer.Option(help="The command that produced the run.")] = "",
) -> None:
    """Export a run's (or a checkpoint's) EMA weights and schedule as a model folder
    (save_pretrained format: load it with UNet.from_pretrained)."""
    from kexue.diffusion.train import ema_from_checkpoint
    from kexue.exceptions import CheckpointError

    try:
        model = ema_from_checkpoint(run)
    except CheckpointError as err:
        raise typer.BadParameter(str(err), param_hint="--run") from None
    if command:
        model.info["command"] = command
    typer.echo(f"exported to {model.save_pretrained(to)}")


@app.command("train-variance")
def train_variance(
    ckpt: Annotated[str, typer.Option(help="Mean model: shipped name or run/model folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the trained head.")],
    kind: Annotated[str, typer.Option(help="sn (regress eps^2) | npr (regress residual^2)")] = "sn",
    data: Annotated[str, typer.Option(help="mnist5k | digits8x8 | folder:PATH")] = "mnist5k",
    steps: Annotated[int, typer.Option(help="Optimiser steps on the head.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (cosine decay).")] = 3e-3,
    seed: Annotated[int, typer.Option(help="Seed of every random draw.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Train a conditional variance head (SN-DPM or NPR-DPM) on a frozen mean model.

    The model's body is reused (UNet.features) and only a new output head is trained and saved
    (head.safetensors + config.json). Load it with kexue.diffusion.VarianceHead.from_pretrained.
    """
    from kexue.diffusion.conditional import train_variance_head

    if kind not in ("sn", "npr"):
        raise typer.BadParameter("must be sn or npr", param_hint="--kind")
    model = load_model(ckpt)
    try:
        head = train_variance_head(
            model, kind, data=data, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
            progress=progress,
        )  # fmt: skip
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    head.info["base"] = ckpt if not Path(ckpt).exists() else str(Path(ckpt).resolve())
    head.save_pretrained(out)
    tail = head.history[-max(1, steps // 10) :]
    typer.echo(
        f"trained a {kind.upper()} variance head for {steps} steps: final loss "
        f"{sum(tail) / len(tail):.3f}; saved to {out}"
    )


VARIANCES = ("small", "large", "analytic", "analytic-gamma", "analytic-moment", "analytic-mle",
             "analytic-diag", "analytic-mle-diag")  # fmt: skip


@app.command("nll")
def nll_command(
    ckpt: Annotated[
        str, typer.Option(help="Built-in model name or a run/model folder.")
    ] = "mnist5k",
    steps: Annotated[int, typer.Option(help="Number of kept steps K (T = all).")] = 10,
    variance: Annotated[
        str, typer.Option(help="small | large | analytic[-gamma|-moment|-mle|-diag|-mle-diag]")
    ] = "analytic",
    trajectory: Annotated[
        str, typer.Option(help="even | quadratic | optimal (DP on the expected KL)")
    ] = "even",
    data: Annotated[str, typer.Option(help="Data spec; its held-out split is scored.")] = "mnist5k",
    n: Annotated[int, typer.Option(help="Held-out images scored (0 = all).")] = 100,
    moments: Annotated[
        Path | None,
        typer.Option(help="Moments folder: loaded if present, else estimated and saved there."),
    ] = None,
    moment_images: Annotated[int, typer.Option(help="Training images for the moments.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the noise draws.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Upper bound on the NLL (negative ELBO) in bits/dim on held-out 8-bit images.

    Data are rounded to 8 bits (256 levels in [-1, 1]) first. The analytic variances need the
    model's moments: pass --moments DIR to reuse them (estimated once for all T steps and saved
    there when DIR does not exist yet); without it they are estimated at the K kept steps only.
    """
    import torch

    from kexue.diffusion.data import load_images
    from kexue.diffusion.likelihood import NLLResult, nll_bpd
    from kexue.diffusion.variance import optimal_trajectory, optimal_variance

    if variance not in VARIANCES:
        raise typer.BadParameter(f"must be one of {', '.join(VARIANCES)}", param_hint="--variance")
    if trajectory not in ("even", "quadratic", "optimal"):
        raise typer.BadParameter("must be even, quadratic or optimal", param_hint="--trajectory")
    if n < 0 or moment_images < 2:
        raise typer.BadParameter("--n must be >= 0 and --moment-images >= 2")
    model = load_model(ckpt)
    schedule = model.schedule
    if schedule is None:
        raise typer.BadParameter("this model was saved without its schedule", param_hint="--ckpt")
    if not 2 <= steps <= schedule.T:
        raise typer.BadParameter(f"must be in 2..{schedule.T}", param_hint="--steps")
    try:
        images = load_images(data)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--data") from None
    held = images.heldout if n == 0 else images.heldout[:n]
    held = torch.round((held.double().clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
    gen = torch.Generator().manual_seed(seed)
    need_moments = variance.startswith("analytic") or trajectory == "optimal"
    stats = None
    if need_moments:
        only = None
        if trajectory != "optimal" and steps < schedule.T:
            only = schedule.trajectory(steps, trajectory)
        stats = model_moments(model, images, held.shape[1:], moments, only, moment_images, gen,
                              progress)  # fmt: skip
    if steps == schedule.T:
        kept = list(range(1, schedule.T + 1))
    elif trajectory == "optimal":
        assert stats is not None  # need_moments
        kept = optimal_trajectory(stats, schedule, steps)
    else:
        kept = schedule.trajectory(steps, trajectory)
    spec: torch.Tensor | str
    if variance.startswith("analytic"):
        assert stats is not None  # need_moments
        spec = optimal_variance(stats, schedule, kept, kind=variance, eta=1.0,
                                last_step="decoder", cap_second_last=None)  # fmt: skip
    else:
        spec = variance
    result = nll_bpd(model, schedule, held, steps=kept, variance=spec, generator=gen,
                     progress=progress)  # fmt: skip
    assert isinstance(result, NLLResult)  # one variance, one result
    typer.echo(
        f"NLL bound {result.bpd:.4f} ± {result.standard_error:.4f} bits/dim on {len(held)} "
        f"held-out images (K={len(kept)}, {trajectory} trajectory, variance {variance}): prior "
        f"{result.prior:.4f}, KL terms {float(result.per_step[1:].sum()):.4f}, decoder "
        f"{float(result.per_step[0]):.4f}"
    )
