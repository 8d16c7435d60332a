"""``kexue hubness ...``: hubness of a point set, and hub-prior latents to a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Hubness measures of a point set; hub-prior latents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _ks(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise typer.BadParameter(
            f"expected comma-separated positive integers, got {text!r}", param_hint="--k"
        )
    return values


def _load_points(path: Path):
    import numpy as np
    import torch

    if not path.is_file():
        raise typer.BadParameter(f"{path} is not a file", param_hint="POINTS")
    try:
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(path))
        if path.suffix in (".pt", ".pth"):
            data = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(data, torch.Tensor):
                return data
    except (OSError, ValueError, RuntimeError) as err:
        raise typer.BadParameter(f"cannot read {path}: {err}", param_hint="POINTS") from None
    raise typer.BadParameter(
        f"{path} must be a .npy array or a .pt file holding one tensor", param_hint="POINTS"
    )


@app.command()
def score(
    points: Annotated[Path, typer.Argument(help="(N, d) points: a .npy file or a .pt tensor.")],
    k: Annotated[str, typer.Option(help="Neighbourhood sizes, comma-separated.")] = "5,10",
    metric: Annotated[str, typer.Option(help="euclidean | cosine")] = "euclidean",
    index: Annotated[str, typer.Option(help="flat (exact) | ivf | hnsw (faiss)")] = "flat",
    hub_size: Annotated[float, typer.Option(help="Hubs: N_k >= hub_size * k.")] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """k-skewness, Robin Hood, Gini, Atkinson, hub and anti-hub occurrence of POINTS."""
    from rich.console import Console
    from rich.table import Table

    from kexue.hubness import Hubness

    X = _load_points(points)
    try:
        hub = Hubness(k=_ks(k), metric=metric, index=index, hub_size=hub_size).fit(X)
    except (ValueError, TypeError) as err:
        raise typer.BadParameter(str(err), param_hint="POINTS / options") from None
    rows = [s.as_dict() for s in hub.scores_.values()]
    if as_json:
        typer.echo(json.dumps({"n": hub.n_samples_in_, "d": hub.n_features_in_, "scores": rows}))
        return
    table = Table(title=f"{points.name}: N = {hub.n_samples_in_:,}, d = {hub.n_features_in_}")
    table.add_column("measure")
    for row in rows:
        table.add_column(f"k = {row['k']}", justify="right")
    for name in list(rows[0])[1:]:
        values = [row[name] for row in rows]
        table.add_row(name, *(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values))
    Console().print(table)


@app.command()
def latents(
    out: Annotated[Path, typer.Argument(help="Output file (.npy or .pt).")],
    n: Annotated[int, typer.Option(min=1, help="Number of latents.")] = 64,
    dim: Annotated[int, typer.Option(min=1, help="Latent dimension.")] = 512,
    k: Annotated[int, typer.Option(min=1, help="Neighbourhood size.")] = 5,
    threshold: Annotated[int, typer.Option(min=0, help="Least hub value kept.")] = 50,
    pool_size: Annotated[int, typer.Option(min=2, help="Candidates per round.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Seed of the candidate draws.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Hub-prior latents: N(0, I) candidates whose hub value in their pool reaches THRESHOLD."""
    import numpy as np
    import torch

    from kexue.hubness import HubPriorSampler

    if out.suffix not in (".npy", ".pt"):
        raise typer.BadParameter("must end in .npy or .pt", param_hint="OUT")
    try:
        sampler = HubPriorSampler(
            dim,
            k=k,
            threshold=threshold,
            pool_size=pool_size,
            generator=torch.Generator().manual_seed(seed),
            progress=progress,
        )
        z = sampler.sample(n)
    except (ValueError, RuntimeError) as err:
        raise typer.BadParameter(str(err), param_hint="--threshold") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, z.numpy())
    else:
        torch.save(z, out)
    typer.echo(
        f"{n} latents -> {out} ({sampler.rounds_} rounds, acceptance "
        f"{sampler.acceptance_rate_:.2%}, mean hub value {sampler.hub_values_.double().mean():.1f})"
    )


@app.command("train-gan")
def train_gan_command(
    out: Annotated[Path, typer.Argument(help="Run folder (checkpoints, final generator).")],
    steps: Annotated[int, typer.Option(min=1, help="Training steps (batches of 64).")] = 16_000,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the weights and every draw.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue OUT from its latest checkpoint.")] = False,
    d_channels: Annotated[
        int, typer.Option(min=1, help="Critic channels at 14 x 14 (new runs only).")
    ] = 32,
    deep_critic: Annotated[
        bool,
        typer.Option(help="Critic with a 3 x 3 layer after each strided one (new runs only)."),
    ] = True,
    lr: Annotated[float, typer.Option(help="Adam learning rate, > 0 (new runs only).")] = 2e-4,
    refine: Annotated[
        bool,
        typer.Option(help="Generator with 3 x 3 layers at 14 x 14 and 28 x 28 (new runs only)."),
    ] = True,
    keep_checkpoints: Annotated[
        int, typer.Option(min=1, help="Newest checkpoints kept (new runs only).")
    ] = 2,
    threads: Annotated[int, typer.Option(min=0, help="torch CPU threads (0: default).")] = 0,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Train the digit GAN on mnist5k's 4,000 training digits (hub-prior experiments).

    A resumed run keeps the settings it was started with; only ``--steps`` extends it."""
    import shlex

    import torch

    from kexue.hubness.gan import GANTrainConfig, train_gan

    if threads:
        torch.set_num_threads(threads)
    command = f"kexue hubness train-gan {shlex.quote(str(out))} --steps {steps}" + (
        " --resume"
        if resume
        else f" --seed {seed} --d-channels {d_channels}"
        f" {'--deep-critic' if deep_critic else '--no-deep-critic'} --lr {lr:g}"
        f" {'--refine' if refine else '--no-refine'} --keep-checkpoints {keep_checkpoints}"
    )
    try:
        config = GANTrainConfig(
            steps=steps,
            seed=seed,
            d_channels=d_channels,
            d_deep=deep_critic,
            lr=lr,
            g_refine=refine,
            keep_checkpoints=keep_checkpoints,
        )
        generator = train_gan(
            out,
            None if resume else config,
            resume=resume,
            steps=steps if resume else None,
            progress=progress,
            command=command,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="OUT / --resume") from None
    typer.echo(f"trained to step {generator.training_info['step']}: {out / 'generator'}")
