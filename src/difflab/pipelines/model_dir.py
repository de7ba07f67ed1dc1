"""A model directory on disk: ``config.json`` plus ``model.safetensors``, written atomically.

The trainer exports one of these at every checkpoint, and :class:`DiffusionPipeline` reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from difflab.errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "difflab.diffusion/1"


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


def atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model_dir(path: Path, config: dict[str, Any], model: nn.Module) -> None:
    """Write ``config.json`` and ``model.safetensors`` (each by rename, so readers never see half a file)."""
    path = ensure_writable_dir(Path(path))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    atomic_write(path / CONFIG_NAME, lambda p: p.write_text(json.dumps({"format": FORMAT, **config}, indent=2)))


def read_model_dir(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a model directory, with one-line errors for a missing folder or file."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model directory {path} does not exist; pass the --out folder of a training run")
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).is_file()]
    if missing:
        raise UserError(f"model directory {path} is missing {', '.join(missing)}; train into it with `difflab train --out {path}` first")
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
        weights = load_file(str(path / WEIGHTS_NAME))
    except (OSError, ValueError, SafetensorError) as err:
        raise UserError(f"model directory {path} is unreadable ({err}); re-export it from a training run") from None
    if config.get("format") != FORMAT:
        raise UserError(f"{path / CONFIG_NAME} is not a difflab model config (format {config.get('format')!r}, expected {FORMAT!r})")
    return config, weights


def save_typed_model(path: Path, model_type: str, section: str, model: nn.Module, extra: dict[str, Any] | None = None) -> None:
    """Save a model whose ``config.json`` holds ``model_type``, its own config under ``section`` and ``extra`` keys."""
    save_model_dir(Path(path), {"model_type": model_type, section: model.config.to_dict(), **(extra or {})}, model)


def read_typed_model(path: Path, model_type: str, section: str, what: str, hint: str
                     ) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(the config under ``section``, the other keys, the weights) of a folder from :func:`save_typed_model`;
    a folder of another model type is a one-line error naming ``what`` was expected and ``hint`` (how to make one)."""
    config, weights = read_model_dir(Path(path))
    if config.get("model_type") != model_type:
        raise UserError(f"{path} holds a {config.get('model_type', 'diffusion')!r} model, not {what}; {hint}")
    extra = {k: v for k, v in config.items() if k not in ("format", "model_type", section)}
    return config[section], extra, weights


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Load a state dict, turning an architecture mismatch into a one-line error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        detail = (missing and f"missing {missing[0]}") or (unexpected and f"unexpected {unexpected[0]}") or f"shape of {wrong[0]}"
        raise UserError(
            f"weights in {source} do not fit the architecture in its config.json ({detail}; "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped); the folder holds a checkpoint of another model"
        )
    model.load_state_dict(weights)
