"""One save/load convention for every saveable object: ``save_pretrained`` / ``from_pretrained``.

As in diffusers and PEFT, an object is saved to a folder as safetensors files plus one plain
``config.json``. kexue adds four keys to that JSON:

- ``_kexue_class``: what the folder holds (``"kexue.diffusion.UNet"``, ...); loading a folder
  into the wrong class is an error naming both;
- ``_kexue_format_version``: the layout version of that class, checked on load;
- ``_kexue_version``: the kexue version that wrote it (information only);
- ``_sha256``: the SHA-256 of each safetensors file, computed from the bytes written (no second
  read), so a truncated, altered or half-replaced folder is refused instead of loaded.

Every file is written atomically (temporary file + rename, see :mod:`kexue.io`), the tensors
first and the config last: a kill leaves the old folder or a folder whose hashes do not match,
never a silently mixed one. Loading never unpickles. A *name* (``"mnist5k"``) resolves to a
folder shipped inside the package, anything else to a folder on disk (:func:`resolve_pretrained`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from torch import Tensor

from kexue.exceptions import CheckpointError
from kexue.extras import require
from kexue.io import read_verified, sha256_bytes, write_bytes_atomic, write_json_atomic

__all__ = [
    "CONFIG_NAME",
    "PretrainedMixin",
    "load_folder",
    "resolve_pretrained",
    "save_folder",
    "shipped_names",
]

CONFIG_NAME = "config.json"
_META = ("_kexue_class", "_kexue_format_version", "_kexue_version", "_sha256")

P = TypeVar("P", bound="PretrainedMixin")


def shipped_names(assets: Path | None) -> list[str]:
    """Names of the folders shipped in ``assets`` (those holding a ``config.json``)."""
    if assets is None or not assets.is_dir():
        return []
    return sorted(p.name for p in assets.iterdir() if (p / CONFIG_NAME).is_file())


def resolve_pretrained(name_or_path: str | os.PathLike, *, assets: Path | None, what: str) -> Path:
    """The folder for ``name_or_path``: a name shipped in ``assets`` first, else a folder.

    Raises ``ValueError`` naming the shipped names when neither exists, ``TypeError`` for
    anything but a string or path.
    """
    if not isinstance(name_or_path, str | os.PathLike):
        raise TypeError(
            f"name_or_path must be a shipped {what} name or a folder, got "
            f"{type(name_or_path).__name__}"
        )
    text = os.fspath(name_or_path)
    if assets is not None and isinstance(name_or_path, str) and "/" not in text and text:
        shipped = assets / text
        if (shipped / CONFIG_NAME).is_file():
            return shipped
    path = Path(text)
    if path.is_dir():
        return path
    raise ValueError(
        f"{text!r} is neither a shipped {what} ({', '.join(shipped_names(assets)) or 'none'}) "
        "nor an existing folder"
    )


def save_folder(
    folder: str | os.PathLike,
    *,
    kind: str,
    version: int,
    config: Mapping[str, Any],
    tensors: Mapping[str, Mapping[str, Tensor]],
    extra: str,
) -> Path:
    """Write ``tensors`` (file stem -> {key: tensor}) as safetensors and ``config`` as
    ``config.json`` with the ``_kexue_*`` keys; returns the folder."""
    st = require("safetensors.torch", extra)
    from kexue import __version__

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_directory {str(folder)!r} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    digests = {}
    for stem, group in tensors.items():
        payload = {k: v.detach().contiguous().cpu() for k, v in group.items()}
        data = st.save(payload, metadata={"format": "pt"})
        name = f"{stem}.safetensors"
        write_bytes_atomic(folder / name, data)
        digests[name] = sha256_bytes(data)
    clash = sorted(set(config) & set(_META))
    if clash:
        raise ValueError(f"config keys {clash} are reserved for kexue's metadata")
    meta = {
        "_kexue_class": kind,
        "_kexue_format_version": version,
        "_kexue_version": __version__,
        "_sha256": digests,
    }
    write_json_atomic(folder / CONFIG_NAME, {**meta, **config})
    return folder


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The raw ``config.json`` of a saved folder (with the ``_kexue_*`` keys)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{Path(folder)} has no {CONFIG_NAME}: not a saved kexue folder")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupted: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return config


def load_folder(
    folder: str | os.PathLike, *, kind: str, version: int, extra: str
) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """Read a folder written by :func:`save_folder`: ``(config, tensors by file stem)``.

    Raises :class:`~kexue.exceptions.CheckpointError` when the folder holds another class, a
    newer format, or a file that is missing or does not match its recorded SHA-256.
    """
    st = require("safetensors.torch", extra)
    folder = Path(folder)
    config = read_config(folder)
    found = config.get("_kexue_class")
    if found != kind:
        raise CheckpointError(f"{folder} holds {found or 'no kexue object'}, not a {kind}")
    saved = config.get("_kexue_format_version")
    if not isinstance(saved, int) or saved > version or saved < 1:
        raise CheckpointError(
            f"{folder} was written in format {saved!r} of {kind}; this kexue reads formats "
            f"1..{version}: upgrade kexue"
        )
    files = read_verified(folder, dict(config.get("_sha256", {})), str(folder))
    tensors = {name.removesuffix(".safetensors"): st.load(data) for name, data in files.items()}
    return {k: v for k, v in config.items() if k not in _META}, tensors


class PretrainedMixin:
    """``save_pretrained(folder)`` / ``from_pretrained(name_or_path)`` for a kexue object.

    A subclass sets the class variables and implements :meth:`pretrained_state` (what to
    write) and :meth:`from_pretrained_state` (how to rebuild); the mixin does files, hashes,
    formats and the name-or-folder resolution.
    """

    pretrained_kind: ClassVar[str]  # e.g. "kexue.diffusion.UNet"
    pretrained_version: ClassVar[int] = 1
    pretrained_extra: ClassVar[str]  # the extra that provides safetensors for this class
    pretrained_assets: ClassVar[Path | None] = None  # folder of shipped names, if any

    def pretrained_state(self) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
        """``(config, tensors by file stem)`` to save; the config must be JSON-serialisable."""
        raise NotImplementedError

    @classmethod
    def from_pretrained_state(
        cls: type[P], config: dict[str, Any], tensors: dict[str, dict[str, Tensor]], **kwargs: Any
    ) -> P:
        """Rebuild an object from what :meth:`pretrained_state` returned."""
        raise NotImplementedError

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write this object to ``save_directory`` (safetensors + ``config.json``)."""
        config, tensors = self.pretrained_state()
        return save_folder(
            save_directory,
            kind=self.pretrained_kind,
            version=self.pretrained_version,
            config=config,
            tensors=tensors,
            extra=self.pretrained_extra,
        )

    @classmethod
    def from_pretrained(cls: type[P], name_or_path: str | os.PathLike, **kwargs: Any) -> P:
        """Load a shipped name or a folder written by :meth:`save_pretrained`."""
        folder = resolve_pretrained(
            name_or_path, assets=cls.pretrained_assets, what=cls.pretrained_kind
        )
        config, tensors = load_folder(
            folder, kind=cls.pretrained_kind, version=cls.pretrained_version,
            extra=cls.pretrained_extra,
        )  # fmt: skip
        return cls.from_pretrained_state(config, tensors, **kwargs)
