"""Crash-safe training checkpoints shared by every capability: safetensors tensors + a JSON
manifest, never pickle.

Layout of a run folder ``OUT``::

    OUT/checkpoints/step-00001000/<group>.safetensors ..., state.json
    OUT/checkpoints/latest.json      -> {"step": 1000, "dir": "step-00001000"}

A checkpoint is written into a temporary folder, flushed, renamed into place, and only then
does ``latest.json`` move to it (temp file + ``os.replace``): a kill at any moment leaves the
previous checkpoint intact and pointed to. ``state.json`` holds the SHA-256 of every tensor
file, computed from the bytes written (no second read), so a truncated or altered file is
reported instead of loaded.

A checkpoint holds what a run needs to resume (weights, optimiser state, the step); what a
user loads to predict is written with ``save_pretrained`` (:mod:`kexue.pretrained`).
``extra`` names the optional dependency group that provides safetensors for the caller
(``"diffusion"``, ``"lst"``), so a missing package is reported with the right install line.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from kexue.exceptions import CheckpointError
from kexue.extras import require
from kexue.io import fsync_dir, read_verified, sha256_bytes, write_json_atomic

__all__ = [
    "CheckpointError",
    "latest_checkpoint",
    "load_checkpoint",
    "optimizer_from_flat",
    "optimizer_to_flat",
    "save_checkpoint",
]


def optimizer_to_flat(state: dict) -> tuple[dict[str, Tensor], dict]:
    """Split a torch optimizer ``state_dict`` into tensors (for safetensors) and JSON."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, Tensor], meta: dict) -> dict:
    """The inverse of :func:`optimizer_to_flat`: a ``state_dict`` for ``load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    tensors: Mapping[str, Mapping[str, Tensor]],
    state: dict[str, Any],
    *,
    keep: int = 2,
    extra: str,
) -> Path:
    """Write ``tensors`` (file name -> {key: tensor}) and ``state`` as checkpoint ``step``
    of ``run_dir``; keep the ``keep`` newest checkpoints (all with ``keep=0``)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    st = require("safetensors.torch", extra)
    files = {}
    for file_stem, group in tensors.items():
        path = tmp / f"{file_stem}.safetensors"
        data = st.save({k: v.detach().contiguous().cpu() for k, v in group.items()})
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        files[path.name] = sha256_bytes(data)
    write_json_atomic(tmp / "state.json", {"step": step, "files": files, **state})
    final = root / name
    if final.exists():  # a previous attempt at this very step: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    write_json_atomic(root / "latest.json", {"step": step, "dir": name})
    _prune(root, keep, current=name)
    return final


def _prune(root: Path, keep: int, current: str) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The folder ``latest.json`` points to, or None when the run has no checkpoint yet."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest.json"
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["dir"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{pointer} is unreadable ({err}); the run cannot resume") from err
    return root / name


def load_checkpoint(
    path: str | Path, *, extra: str
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Load and verify a checkpoint folder (or a run folder: its latest checkpoint).

    Returns ``(tensors, state)``; raises :class:`CheckpointError` naming the problem when a
    file is missing, truncated or does not match its recorded checksum.
    """
    path = Path(path)
    if (path / "checkpoints").is_dir() or not (path / "state.json").exists():
        found = latest_checkpoint(path) if (path / "checkpoints").is_dir() else None
        if found is None:
            raise CheckpointError(f"no checkpoint found in {path}")
        path = found
    manifest = path / "state.json"
    if not manifest.exists():
        raise CheckpointError(f"checkpoint {path} has no state.json (incomplete write?)")
    try:
        state = json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest} is corrupted: {err}") from err
    st = require("safetensors.torch", extra)
    files = read_verified(path, state.get("files", {}), f"checkpoint {path}")
    tensors = {name.removesuffix(".safetensors"): st.load(data) for name, data in files.items()}
    return tensors, state
