"""The noise-aware classifier of classifier guidance (Dhariwal & Nichol 2021, sec. 4).

Per sample: ``t ~ Uniform{0, ..., T-1}``, ``eps ~ N(0, I)``, ``x_t = alpha_t x_0 + sigma_t eps``
(:func:`difflab.process.q_sample`) and the cross-entropy ``-log p_phi(y | x_t, t)`` of its label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.process import q_sample
from difflab.schedules import NoiseSchedule
from difflab.training.objectives.base import Batch
from difflab.training.objectives.cross_entropy import CrossEntropyObjective


class NoisyClassifierObjective(CrossEntropyObjective):
    """``extra``: keys for the exported folder's config.json (the schedule is always among them)."""

    name = "noisy_classifier"

    def __init__(self, schedule: NoiseSchedule, extra: dict[str, Any] | None = None) -> None:
        self.schedule = schedule
        self.extra = {"schedule": schedule.to_config(), **(extra or {})}

    def prepare(self, batch: Batch, generator: torch.Generator) -> Batch:
        x0 = batch["x"]
        t = torch.randint(0, self.schedule.T, (len(x0),), generator=generator)
        return {**batch, "t": t, "noise": torch.randn(x0.shape, generator=generator)}

    def logits(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        t = batch["t"]
        x_t = q_sample(self.schedule, batch["x"], t.cpu(), batch["noise"])
        return {"label": model(x_t, t.float())}

    def export_extra(self) -> dict[str, Any]:
        return self.extra

    def export(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir, self.export_extra())
