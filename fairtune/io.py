"""Atomic file writes: a reader (or a crash) never sees half a result."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from fairtune.errors import UserError


def _file_mode() -> int:
    """What ``open()`` would give a new file: 0666 less the umask (mkstemp's own 0600 would hide
    best.json, tables and teachers from the other users of a shared results folder)."""
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(folder: Path, flag: str = "--results-dir") -> None:
    """Refuse a folder that cannot be created or written in, before any training: a result found
    unwritable only at the end is a result lost. Probes with an unnamed temporary file."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:  # where mkdir(parents=True) would start
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, not a folder; pass a folder (it is created if missing)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UserError(f"{flag} {folder}: cannot write in {existing} ({exc.strerror}); fix its permissions or pass another {flag}") from None


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda handle: handle.write(data))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_torch(path: Path, obj: Any) -> None:
    _atomic(path, lambda handle: torch.save(obj, handle))


def load_torch(path: Path) -> Any:
    """Checkpoints are loaded with ``weights_only=True``: a file that smuggles code is refused."""
    return torch.load(path, map_location="cpu", weights_only=True)
