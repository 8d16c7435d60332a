"""Crash-safe file writes shared by every capability.

A file is written to a temporary name beside its target, flushed to disk and renamed onto the
target (``os.replace``), so a kill at any moment leaves either the old file or the new one,
never a truncated one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

_UMASK_LOCK = threading.Lock()


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk, where the platform allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask (read without changing it where ``/proc`` allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore it at once
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, rename it onto ``path``.

    ``write`` receives the temporary file's name (e.g. ``lambda p: save_file(tensors, p)``);
    on any error the temporary file is removed and ``path`` is left as it was. The file gets
    the mode a plain ``open(path, "w")`` would give (``0o666`` less the umask), not the
    ``0o600`` of a temporary file, so runs can be shared.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` with :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON to ``path`` with :func:`atomic_write`."""
    text = json.dumps(payload, indent=2)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_verified(folder: Path, digests: Mapping[str, str], where: str) -> dict[str, bytes]:
    """The bytes of each file ``name`` in ``folder`` whose SHA-256 is ``digests[name]`` (as
    recorded when it was written); :class:`~kexue.exceptions.CheckpointError` naming ``where``
    for a missing file or one whose bytes do not match."""
    from kexue.exceptions import CheckpointError

    out = {}
    for name, digest in digests.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{where} is missing {name} (incomplete write?)")
        data = path.read_bytes()
        if sha256_bytes(data) != digest:
            raise CheckpointError(
                f"{where}: {name} does not match its recorded SHA-256 (truncated, altered or "
                "from another save); refusing to load it"
            )
        out[name] = data
    return out
