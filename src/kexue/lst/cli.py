"""``kexue lst ...``: train a text classifier with Ladder Side-Tuning (or a baseline).

The command only turns its options into a :class:`kexue.lst.RunSpec`, runs it with
:func:`kexue.lst.run` (progress bars on stderr) and saves what it returns. Under
``accelerate launch`` / ``torchrun`` every process runs it; the main process alone draws the
bars, writes the files and prints the summary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

if TYPE_CHECKING:
    from kexue.lst.classifier import PooledClassifier
    from kexue.lst.model import LSTModel

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


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


@app.command()
def train(
    backbone: Annotated[
        Path, typer.Option(help="Local Hugging Face model folder (safetensors weights).")
    ],
    data: Annotated[Path, typer.Option(help="Training TSV: label<TAB>text (GLUE header ok).")],
    eval_path: Annotated[Path, typer.Option("--eval", help="Evaluation TSV, same format.")],
    out: Annotated[Path, typer.Option(help="Folder for the trained model and metrics.json.")],
    method: Annotated[str, typer.Option(help="lst, full (fine-tuning) or lora (peft).")] = "lst",
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training data.")] = 3,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per step.")] = 32,
    lr: Annotated[
        float | None,
        typer.Option(help="Peak learning rate (default: lst 3e-3, full 1e-4, lora 5e-4)."),
    ] = None,
    max_length: Annotated[int, typer.Option(min=2, help="Tokens per text (truncated).")] = 128,
    limit: Annotated[
        int | None,
        typer.Option(min=1, help="Train on this many examples (drawn with --subset-seed)."),
    ] = None,
    subset_seed: Annotated[int, typer.Option(help="Seed of the --limit subset.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the init, batch order and dropout.")] = 0,
    reduction_factor: Annotated[int, typer.Option(min=1, help="LST: side width = d / r.")] = 8,
    init: Annotated[str, typer.Option(help="LST: fisher, magnitude or random.")] = "fisher",
    fisher_samples: Annotated[
        int, typer.Option(min=1, help="LST: examples of the Fisher pass.")
    ] = 1024,
    side_layers: Annotated[
        str | None, typer.Option(help="LST: comma-separated backbone layers (default all).")
    ] = None,
    cache_backbone: Annotated[
        bool, typer.Option(help="LST: compute the backbone states once, reuse every epoch.")
    ] = False,
    dropout: Annotated[float, typer.Option(help="Dropout of what trains, in [0, 1).")] = 0.1,
    device: Annotated[
        str, typer.Option(help="auto (this process's GPU, else the CPU), cpu, cuda, cuda:N.")
    ] = "auto",
    mixed_precision: Annotated[
        str | None,
        typer.Option(
            help="LST: autocast dtype of the backbone forward: no, bf16 (CPU or GPU), fp16 "
            "(GPU). Default: accelerate launch's --mixed_precision for lst, else no."
        ),
    ] = None,
    checkpoint_every: Annotated[
        int,
        typer.Option(
            min=0, help="Write a training checkpoint to OUT/checkpoints every N steps (0: none)."
        ),
    ] = 0,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue from the latest checkpoint in --out (same options)."
        ),
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")] = False,
) -> None:
    """Train on --data, evaluate accuracy on --eval, save the trained parts to --out.

    --out then holds config.json and the safetensors of what trained (load it with
    kexue.lst.load_text_classifier(out, backbone)) and metrics.json (accuracy, timings and
    the run's options). With --checkpoint-every N, OUT/checkpoints holds crash-safe
    checkpoints; run the same command with --resume to continue after a crash (bit-exact).
    Under accelerate launch or torchrun, the processes share every batch.
    """
    if method not in ("lst", "full", "lora"):
        raise typer.BadParameter("choose one of lst, full, lora", param_hint="--method")
    if lr is not None and not lr > 0:
        raise typer.BadParameter(f"must be > 0, got {lr}", param_hint="--lr")
    if cache_backbone and method != "lst":
        raise typer.BadParameter("only with --method lst", param_hint="--cache-backbone")
    _existing_file(data, "--data")
    _existing_file(eval_path, "--eval")
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a folder", param_hint="--out")
    layers = _parse_layers(side_layers)
    if mixed_precision is None:  # accelerate's setting applies to LST's frozen backbone only
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        mixed_precision = launched if method == "lst" else "no"

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from kexue.distributed import barrier, is_main_process
    from kexue.exceptions import CheckpointError
    from kexue.io import write_json_atomic
    from kexue.lst.run import RunSpec, load_inputs, run

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        spec = RunSpec(
            backbone=str(backbone),
            train=str(data),
            eval=str(eval_path),
            method=method,
            reduction_factor=reduction_factor,
            side_layers=layers,
            init=init,
            fisher_samples=fisher_samples,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            max_length=max_length,
            train_size=limit,
            subset_seed=subset_seed,
            cache_backbone=cache_backbone,
            dropout=dropout,
            device=device,
            mixed_precision=mixed_precision,
        )
    except (TypeError, ValueError) as err:
        raise typer.BadParameter(_one_line(err)) from None
    try:
        inputs = load_inputs(spec)
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise typer.BadParameter(_one_line(err)) from None
    checkpoints: dict[str, Any] = {"checkpoint_every": checkpoint_every, "resume": resume}
    if checkpoint_every or resume:
        checkpoints["checkpoint_dir"] = out
    try:
        result = run(spec, inputs=inputs, progress=not no_progress, **checkpoints)
    except CheckpointError as err:
        raise typer.BadParameter(_one_line(err), param_hint="--resume") from None
    except ValueError as err:  # the backbone does not fit the options (widths, layers)
        hint = "--resume" if "checkpoints" in str(err) else "--backbone"
        raise typer.BadParameter(_one_line(err), param_hint=hint) from None
    if is_main_process():
        model = cast("LSTModel | PooledClassifier", result.model)  # run() sets it
        model.save_pretrained(out)
        metrics = result.to_dict()
        metrics.pop("losses")
        write_json_atomic(out / "metrics.json", metrics)
        _summary(result, metrics, out)
    barrier()


def _summary(result, metrics: dict, out: Path) -> None:
    stats = result.stats
    trainable, total = result.trainable_parameters, result.all_parameters
    epochs = stats.epoch_seconds
    resumed = (
        f" resumed_from_step={stats.resumed_from_step}"
        if stats.resumed_from_step is not None
        else ""
    )
    typer.echo(
        f"{result.spec.method}: eval_accuracy={result.accuracy:.4f} ({result.eval_examples} "
        f"examples) train_loss={metrics['final_loss']:.4f} trainable={trainable:,} "
        f"({100 * trainable / total:.2f}%) step={stats.median_step_ms:.1f} ms "
        f"epoch={sum(epochs) / len(epochs) if epochs else float('nan'):.1f} s "
        f"processes={stats.processes}{resumed} saved={out}"
    )
