"""Training: configs, the one Accelerate-based loop (:class:`Trainer`), objectives, EMA and atomic checkpoints.

``difflab.recipes.train`` (also ``difflab.train``) builds a diffusion training from a config.
"""

from __future__ import annotations

from difflab.training.config import TrainConfig, load_config
from difflab.training.objectives import DiffusionObjective, Objective
from difflab.training.trainer import Trainer, TrainingInterrupted, TrainResult

__all__ = ["DiffusionObjective", "Objective", "TrainConfig", "TrainResult", "Trainer", "TrainingInterrupted", "load_config"]
