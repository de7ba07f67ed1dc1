"""Recipes: trainings that join data, networks, objectives and pipelines (above ``pipelines/`` and ``training/``).

``train(config, out_dir)`` is the diffusion training of ``difflab train``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from difflab.errors import UserError
from difflab.training.checkpoint import find_checkpoint, load_checkpoint
from difflab.training.config import TrainConfig
from difflab.training.runs import RUN_SETTINGS, fit
from difflab.training.trainer import TrainResult

# What a resumed run may change: how long and how it is optimised and logged, not what is trained
# (data, model, schedule, objective, conditioning, seed).
RESUMABLE = ("config.optim.", "config.log.", "config.posthoc_ema.")


def saved_config(out_dir: str | Path) -> dict[str, Any] | None:
    """The config of the run in ``out_dir``: its newest checkpoint's, else the one written at its start, else None."""
    out_dir = Path(out_dir)
    existing = find_checkpoint(out_dir) if out_dir.is_dir() else None
    if existing:
        return load_checkpoint(existing)[1]["config"]
    path = out_dir / RUN_SETTINGS
    if path.is_file():
        try:
            return json.loads(path.read_text())["config"]
        except (ValueError, KeyError):
            raise UserError(f"{path} is unreadable; delete it (the run has no checkpoint yet)") from None
    return None


def train(config: TrainConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train into ``out_dir``; with ``resume`` continue the run found there exactly where it stopped.

    Refuses to start over an existing run (nothing is overwritten) and to resume with a config that changes
    what is trained (the differing keys are listed). ``resume`` on a folder without a checkpoint (a run killed
    before its first one, or a new folder) starts from step 0 with a notice, as diffusers'
    ``--resume_from_checkpoint latest`` does; on a finished run it trains nothing and says so (``TrainResult.note``).
    """
    from difflab.recipes.diffusion import build_diffusion_training

    out_dir = Path(out_dir)
    settings = {"config": config.to_dict(), "objective": "diffusion"}
    _, result = fit(lambda: build_diffusion_training(config, out_dir, progress=progress), out_dir, settings,
                    resume=resume, what="a training run", resumable=RESUMABLE)
    return result


__all__ = ["RESUMABLE", "saved_config", "train"]
