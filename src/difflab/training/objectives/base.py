"""What the one :class:`~difflab.training.trainer.Trainer` optimises: an :class:`Objective`.

An objective turns a batch into per-sample losses. The trainer owns everything else (data order,
optimiser, EMA, checkpoints, exact resume, NaN guard, Accelerate). Randomness is split in two so that a
run on N processes sees exactly what one process with the whole batch sees:

1. :meth:`Objective.prepare` runs on the whole global batch on the CPU, with the step's generator, and
   draws every random quantity (timesteps, noise, condition dropout, augmentation); row i of its output
   depends only on row i and the generator.
2. The trainer cuts this process's rows out of the prepared batch, moves them to the device, and calls
   :meth:`Objective.loss` on them: per-sample losses (B,) and named per-sample terms for logging.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

Batch = dict[str, Any]


@dataclass
class Preview:
    """What :meth:`Objective.preview` wrote (``path``) and scores of its samples (``metrics``, e.g. prompt
    adherence), which the trainer writes into log.jsonl with the step."""

    path: Path | None
    metrics: dict[str, float] = field(default_factory=dict)


class Objective:
    """Base class: override :meth:`loss` (and :meth:`prepare` when the loss needs randomness)."""

    #: name written into checkpoints; a resumed run must use the same objective
    name: str = "objective"

    def prepare(self, batch: Batch, generator: torch.Generator) -> Batch:
        """Draw the step's randomness for the whole global batch (CPU tensors, one row per sample)."""
        return batch

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-sample losses (B,) of ``model`` on this process's rows, and per-sample terms to log."""
        raise NotImplementedError

    def observe(self, batch: Batch, terms: dict[str, Tensor], gather: Callable[[Tensor], Tensor]) -> None:
        """After a good step: see the step's terms (``gather`` collects a tensor over all processes)."""

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors a resumed run needs (e.g. an importance sampler's loss history)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Write the trained (EMA) model as a model folder into ``out_dir`` (default: the network alone)."""
        from difflab.io.model_folder import save_model

        save_model(out_dir, model, self.export_extra())

    def export_extra(self) -> dict[str, Any]:
        """Extra keys for the exported ``config.json`` (provenance, schedule, ...)."""
        return {}

    def preview(self, model: nn.Module, path: Path) -> Preview | None:
        """Write a preview of what the model makes now to ``path`` (no suffix; the modality picks it) and score
        it (:class:`Preview`), or None."""
        return None

    def metrics(self, terms: dict[str, Tensor]) -> dict[str, float]:
        """Batch means of the terms, for the progress bar and log.jsonl."""
        return {k: float(v.detach().float().mean()) for k, v in terms.items()}
