"""Training checkpoints: safetensors plus JSON, written atomically, verified when read, the last K kept.

Layout: ``OUT/checkpoints/step_0000400/`` holds ``model.safetensors`` (training weights),
``ema.safetensors``, ``optimizer.safetensors`` (every state tensor), ``rng.safetensors``,
``state.json`` (step, config, optimizer hyper-parameters, EMA counter, RNG states, ...) and
``manifest.json`` (size and SHA-256 of every other file). A checkpoint is written into a temporary
folder, flushed to disk, and only then renamed to its final name, so a crash, a kill or a full disk
at any moment leaves every earlier checkpoint complete. Reading verifies the manifest; a truncated or
corrupted checkpoint is skipped with a warning and the newest intact one is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from difflab.errors import UserError

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able rest."""
    tensors, meta = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.contiguous()
            else:
                meta["scalars"][f"{pid}.{key}"] = value
    return tensors, meta


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = flat.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda{i}"] = s
    np_state = np.random.get_state()
    meta = {"python": _jsonable(random.getstate()), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tupled(meta["python"]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x: Any) -> Any:
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(
    out_dir: Path, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any], *, keep: int = 3
) -> Path:
    """Write ``{name}.safetensors`` per entry of ``tensors``, ``state.json`` and the manifest, atomically.

    The checkpoint becomes ``OUT/checkpoints/step_N`` by one rename after everything is on disk; then
    all but the newest ``keep`` checkpoints are deleted. On any error the partial folder is removed and
    the earlier checkpoints are untouched.
    """
    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-write; one writer per run, so never in use
        shutil.rmtree(stale, ignore_errors=True)
    final = root / checkpoint_name(int(state["step"]))
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        for name, group in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, str(tmp / f"{name}.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        manifest = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. Ctrl-C right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoint folders in ``out_dir``, oldest first (by step); not verified."""
    root = out_dir / CHECKPOINTS
    return sorted(root.glob("step_*")) if root.is_dir() else []


def verify_checkpoint(path: Path) -> str | None:
    """``None`` if every file listed in the manifest is present with its size and SHA-256, else the problem."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return "its manifest.json is missing or unreadable"
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes instead of {expected['bytes']} (truncated)"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum (corrupted)"
    return None


def find_checkpoint(out_dir: Path) -> Path | None:
    """The newest intact checkpoint in ``out_dir``; broken newer ones are skipped with a warning."""
    found = list_checkpoints(out_dir)
    for path in reversed(found):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"checkpoint {path} is damaged ({problem}); falling back to the previous one", stacklevel=2)
    if found:
        raise UserError(f"no intact checkpoint in {out_dir / CHECKPOINTS} (all {len(found)} are damaged); "
                        "start a new run with another --out")
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    try:
        state = json.loads((path / "state.json").read_text())
        tensors = {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
    except (OSError, ValueError) as err:
        raise UserError(f"checkpoint {path} is unreadable ({err}); resume from another --out or start afresh") from None
    return tensors, state
