"""``kexue lst ...``: train a text classifier with Ladder Side-Tuning (or a baseline)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Ladder Side-Tuning of frozen Hugging Face transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _parse_layers(text: str | None) -> list[int] | None:
    if text is None or text.strip().lower() in ("", "all"):
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated layer indices, got {text!r}", param_hint="--side-layers"
        ) from None


def _existing_file(path: Path, hint: str) -> None:
    if not path.is_file():
        raise typer.BadParameter(f"{path} is not a file", param_hint=hint)


@app.command()
def train(
    backbone: Annotated[
        Path, typer.Option(help="Local Hugging Face model folder (safetensors weights).")
    ],
    data: Annotated[Path, typer.Option(help="Training TSV: label<TAB>text (GLUE header ok).")],
    eval_path: Annotated[Path, typer.Option("--eval", help="Evaluation TSV, same format.")],
    out: Annotated[Path, typer.Option(help="Folder for the checkpoint and metrics.json.")],
    method: Annotated[str, typer.Option(help="lst, full (fine-tuning) or lora (peft).")] = "lst",
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training data.")] = 3,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per step.")] = 32,
    lr: Annotated[
        float | None,
        typer.Option(help="Peak learning rate (default: lst 3e-3, full 1e-4, lora 5e-4)."),
    ] = None,
    max_length: Annotated[int, typer.Option(min=2, help="Tokens per text (truncated).")] = 128,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Train on this many examples (seeded subset).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the subset, init, order, dropout.")] = 0,
    reduction_factor: Annotated[int, typer.Option(min=1, help="LST: side width = d / r.")] = 8,
    init: Annotated[str, typer.Option(help="LST: fisher, magnitude or random.")] = "fisher",
    fisher_samples: Annotated[
        int, typer.Option(min=1, help="LST: examples of the Fisher pass.")
    ] = (1024),
    side_layers: Annotated[
        str | None, typer.Option(help="LST: comma-separated backbone layers (default all).")
    ] = None,
    cache_backbone: Annotated[
        bool, typer.Option(help="LST: compute the backbone states once, reuse every epoch.")
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")] = False,
) -> None:
    """Train on --data, evaluate accuracy on --eval, save the trained parts to --out."""
    import torch
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from kexue.io import write_json_atomic
    from kexue.lst.config import LSTConfig
    from kexue.lst.data import encode, read_tsv
    from kexue.lst.model import trainable_parameters
    from kexue.lst.train import (
        DEFAULT_LR,
        METHODS,
        TrainSettings,
        accuracy,
        build_model,
        load_backbone,
        save_classifier,
        train_classifier,
    )

    if method not in METHODS:
        raise typer.BadParameter(f"choose one of {', '.join(METHODS)}", param_hint="--method")
    if lr is not None and not lr > 0:
        raise typer.BadParameter(f"must be > 0, got {lr}", param_hint="--lr")
    if cache_backbone and method != "lst":
        raise typer.BadParameter("only with --method lst", param_hint="--cache-backbone")
    _existing_file(data, "--data")
    _existing_file(eval_path, "--eval")
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a folder", param_hint="--out")
    try:
        train_texts, train_labels = read_tsv(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise typer.BadParameter(str(err), param_hint="--data") from None
    try:
        eval_texts, eval_labels = read_tsv(eval_path)
    except (ValueError, UnicodeDecodeError) as err:
        raise typer.BadParameter(str(err), param_hint="--eval") from None
    num_labels = max(train_labels) + 1
    if num_labels < 2:
        raise typer.BadParameter("needs at least two classes (labels 0 and 1)", param_hint="--data")
    if max(eval_labels) >= num_labels:
        raise typer.BadParameter(
            f"label {max(eval_labels)} never occurs in --data (labels 0..{num_labels - 1})",
            param_hint="--eval",
        )
    try:
        config = LSTConfig(
            reduction_factor=reduction_factor,
            side_layers=_parse_layers(side_layers),
            init=init,
            fisher_samples=fisher_samples,
            num_labels=num_labels,
        )
    except (TypeError, ValueError) as err:
        raise typer.BadParameter(str(err)) from None

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model_backbone, tokenizer = load_backbone(backbone)
    except (ValueError, OSError) as err:
        raise typer.BadParameter(
            " ".join(str(err).split())[:300], param_hint="--backbone"
        ) from None

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_set = encode(tokenizer, train_texts, train_labels, max_length)
    if limit is not None and limit < len(train_set):
        train_set = train_set.subset(torch.randperm(len(train_set), generator=gen)[:limit].tolist())
    eval_set = encode(tokenizer, eval_texts, eval_labels, max_length)
    pad_id = tokenizer.pad_token_id or 0
    settings = TrainSettings(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr if lr is not None else DEFAULT_LR[method],
        seed=seed,
        cache_backbone=cache_backbone,
    )
    console = Console(stderr=True)
    t_start = time.perf_counter()
    try:
        model = build_model(
            method,
            model_backbone,
            num_labels,
            lst_config=config,
            init_data=train_set.batches(batch_size, generator=gen, pad_id=pad_id),
            generator=gen,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--backbone") from None
    trainable, total = trainable_parameters(model)
    steps_per_epoch = -(-len(train_set) // batch_size)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=no_progress) as bar:
        task = bar.add_task(f"{method}: epoch 1/{epochs}", total=steps_per_epoch, loss=float("nan"))

        def on_step(step: int, loss: float) -> None:
            bar.update(task, advance=1, loss=loss)

        def on_epoch(epoch: int) -> None:
            if epoch + 1 < epochs:
                bar.reset(task, total=steps_per_epoch)
                bar.update(task, description=f"{method}: epoch {epoch + 2}/{epochs}")

        stats = train_classifier(
            model, train_set, settings, pad_id=pad_id, on_step=on_step, on_epoch=on_epoch
        )
    acc = accuracy(model, eval_set, pad_id=pad_id)
    metrics = {
        "method": method,
        "eval_accuracy": acc,
        "eval_examples": len(eval_set),
        "train_examples": len(train_set),
        "num_labels": num_labels,
        "trainable_parameters": trainable,
        "all_parameters": total,
        "seconds": time.perf_counter() - t_start,
        "settings": vars(settings),
        **stats.summary(),
    }
    metrics.pop("losses")
    if method == "lst":
        metrics["lst_config"] = config.to_dict()
        metrics["gates"] = {k: v.tolist() for k, v in model.gate_values().items()}
    meta = {"num_labels": num_labels, "backbone": str(backbone), "max_length": max_length}
    save_classifier(model, method, out, meta)
    write_json_atomic(out / "metrics.json", metrics)
    typer.echo(
        f"{method}: eval_accuracy={acc:.4f} ({len(eval_set)} examples) "
        f"train_loss={metrics['final_loss']:.4f} trainable={trainable:,} "
        f"({100 * trainable / total:.2f}%) step={stats.median_step_ms:.1f} ms "
        f"epoch={sum(stats.epoch_seconds) / len(stats.epoch_seconds):.1f} s saved={out}"
    )
