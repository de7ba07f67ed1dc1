"""Training: configs, the Accelerate-based loop, EMA and atomic checkpoints."""

from __future__ import annotations

from pathlib import Path

from difflab.errors import UserError
from difflab.training.checkpoint import find_checkpoint
from difflab.training.config import TrainConfig, load_config
from difflab.training.trainer import Trainer, TrainingInterrupted, TrainResult

# Sections that fix what is being trained; a resumed run must match them exactly.
FROZEN_SECTIONS = ("data", "model", "schedule", "objective", "conditioning", "seed")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_differences(old: TrainConfig, new: TrainConfig) -> list[str]:
    """Dotted keys of the frozen sections whose values differ between two configs."""
    a = _flatten({k: v for k, v in old.to_dict().items() if k in FROZEN_SECTIONS})
    b = _flatten({k: v for k, v in new.to_dict().items() if k in FROZEN_SECTIONS})
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def train(config: TrainConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train into ``out_dir``; with ``resume`` continue the run found there exactly where it stopped.

    Refuses to start over an existing run (nothing is overwritten) and refuses to resume with a config
    that changes what is trained (the differing keys are listed).
    """
    out_dir = Path(out_dir)
    existing = find_checkpoint(out_dir) if out_dir.is_dir() else None
    if existing and not resume:
        raise UserError(f"{out_dir} already holds a training run; pass --resume to continue it or choose another --out")
    if resume and not existing:
        raise UserError(f"nothing to resume in {out_dir}: no checkpoint found; drop --resume to start a new run")
    if existing:
        from difflab.training.checkpoint import load_checkpoint

        _, state = load_checkpoint(existing)
        saved = TrainConfig.from_dict(state["config"])
        diff = config_differences(saved, config)
        if diff:
            raise UserError(f"cannot resume {out_dir} with a different config: {', '.join(diff)} differ; resume with the original settings")
    trainer = Trainer(config, out_dir, progress=progress)
    if existing:
        trainer.restore(existing)
    return trainer.run()


__all__ = ["TrainConfig", "Trainer", "TrainResult", "TrainingInterrupted", "load_config", "train", "config_differences"]
