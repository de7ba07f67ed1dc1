"""Writable-path checks and atomic file writes: the file-system half of every model folder."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from difflab.errors import UserError

__all__ = ["atomic_write", "ensure_writable_dir", "ensure_writable_file", "read_json"]


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and check that a file can be written there (one-line error if not)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".difflab-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to {path} ({err.strerror}); choose a writable output path") from None
    return path


def ensure_writable_file(path: Path) -> Path:
    """Check that ``path`` (a file to be created or replaced) can be written, creating its folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output path {path} is a directory; give a file name such as {path / 'grid.png'}")
    ensure_writable_dir(path.parent if str(path.parent) else Path("."))
    return path


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a hidden temporary file next to ``path``, fsync it, then rename it onto ``path``.

    Readers see the old file or the whole new one, never half of it; a failing ``write`` leaves ``path`` as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(folder: Path, name: str, missing: str) -> dict[str, Any]:
    """The JSON object in ``folder/name``; one-line errors for a missing folder, a missing file (``missing``
    says why and what to do) and unreadable JSON."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist; pass a folder with {name} written by save_pretrained "
                        "(or the --out folder of a training run)")
    file = folder / name
    if not file.is_file():
        raise UserError(f"model folder {folder} has no {name}; {missing}")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{file} is unreadable ({err}); save it again") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} is not a JSON object; save it again")
    return data
