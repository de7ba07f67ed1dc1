"""Supervised classification: cross-entropy of one or more classification heads against the items' conditions.

Per sample ``sum_h -log p_h(y_h | x)`` over the heads ``h`` of the network, ``y_h = cond[h]``. A network
returns logits (one head, named ``label``), ``(features, logits)``, or a dict ``{head: logits}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from difflab.training.objectives.base import Batch, Objective


def heads(output: Any) -> dict[str, Tensor]:
    """The logits of each head in a network's output (see the module docstring)."""
    if isinstance(output, dict):
        return output
    if isinstance(output, tuple):  # (features, logits) networks
        output = output[-1]
    return {"label": output}


class CrossEntropyObjective(Objective):
    """Cross-entropy summed over the network's heads; logs each head's accuracy (and loss, with several heads)."""

    name = "cross_entropy"

    def logits(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        return heads(model(batch["x"]))

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Nothing: the caller keeps the trained network in memory (subclasses write a model folder)."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.logits(model, batch)
        total, terms = 0.0, {}
        for head, z in logits.items():
            target = batch["cond"][head].to(z.device)
            ce = F.cross_entropy(z.float(), target, reduction="none")
            total = total + ce
            suffix = "" if len(logits) == 1 else f"_{head}"
            terms[f"accuracy{suffix}"] = (z.detach().argmax(1) == target).float()
            if suffix:
                terms[f"loss{suffix}"] = ce.detach()
        return total, terms
