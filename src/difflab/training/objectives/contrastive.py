"""CLIP's symmetric contrastive loss (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision", fig. 3) over a batch of (image, caption) pairs.

With unit image rows ``I``, text rows ``T`` and scale ``s = exp(logit_scale) <= max_scale``, the
similarity matrix is ``S = s I T^T``; sample i's loss is ``(CE(S_i, Y_i) + CE(S^T_i, Y_i)) / 2``, the mean
of its image->text and text->image rows, where ``Y_i`` spreads over the batch items sharing i's caption
(identical captions are not negatives). The batch mean is CLIP's loss. The matrix is over the rows one
process sees in one micro-batch (its negatives).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.training.objectives.base import Batch, Objective

MAX_LOGIT_SCALE = math.log(100.0)  # Radford et al. clip the temperature at 100


def contrastive_losses(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, captions: Sequence[str]) -> Tensor:
    """Per-sample symmetric InfoNCE ``(B,)``, targets uniform over the items that share a caption."""
    i, t = F.normalize(image_emb, dim=1), F.normalize(text_emb, dim=1)
    logits = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * i @ t.T
    index = {c: k for k, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[c] for c in captions], device=logits.device)
    same = (ids[:, None] == ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")) / 2


class ContrastiveObjective(Objective):
    """For a dual encoder with ``encode_images(x)``, ``text_proj(features)`` and ``logit_scale``; items carry
    ``cond["caption"]`` and the caption's frozen text features ``cond["text"]``. The model stays in memory."""

    name = "contrastive"

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        net = getattr(model, "module", model)
        image_emb = net.encode_images(batch["x"])
        text_emb = net.text_proj(batch["cond"]["text"].to(image_emb.device, image_emb.dtype))
        return contrastive_losses(image_emb, text_emb, net.logit_scale, batch["cond"]["caption"]), {}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Nothing: the caller keeps the trained network in memory."""
