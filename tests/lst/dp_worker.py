"""Run one :class:`kexue.lst.RunSpec` through :func:`kexue.lst.run` in this process (or in each
process of ``accelerate launch`` / ``torchrun``) and save what the tests compare.

``python tests/lst/dp_worker.py '<spec json>' OUT [--checkpoint-every N] [--resume]`` writes,
from the main process only, ``OUT/result.safetensors`` (the trained weights under
``weights.<name>`` and the evaluation logits, gathered over processes, under ``logits``) and
``OUT/result.json`` (the loss of every step, the accuracy, the number of processes, the run
folder's file names).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers.utils import logging as hf_logging

from kexue.distributed import barrier, is_main_process, world_size
from kexue.lst import RunSpec, load_inputs, predict, run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("out", type=Path)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    spec = RunSpec.from_dict(json.loads(args.spec))
    inputs = load_inputs(spec)
    checkpoints = {}
    if args.checkpoint_every or args.resume:
        checkpoints = {
            "checkpoint_dir": args.out,
            "checkpoint_every": args.checkpoint_every,
            "resume": args.resume,
        }
    result = run(spec, inputs=inputs, progress=False, **checkpoints)
    logits = predict(result.model, inputs.eval_set, spec.eval_batch_size, inputs.pad_id,
                     progress=False)  # fmt: skip
    if is_main_process():
        args.out.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"weights.{n}": p.detach().cpu().contiguous()
            for n, p in result.model.named_parameters()
            if p.requires_grad
        }
        tensors["logits"] = logits.cpu().contiguous()
        save_file(tensors, str(args.out / "result.safetensors"))
        summary = {
            "losses": result.stats.losses,
            "accuracy": result.accuracy,
            "processes": world_size(),
            "resumed_from_step": result.stats.resumed_from_step,
        }
        (args.out / "result.json").write_text(json.dumps(summary))
    barrier()


if __name__ == "__main__":
    main()
