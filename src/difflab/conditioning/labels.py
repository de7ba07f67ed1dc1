"""Class labels: checked as a 1-D long tensor in ``0 .. num_classes - 1`` (``num_classes`` is the null label)."""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.errors import UserError


def check_labels(labels: Tensor | int, num_classes: int | None, batch: int | None = None, *,
                 allow_null: bool = False, what: str = "class_labels") -> Tensor:
    """Labels as a 1-D long tensor, checked to lie in ``0 .. num_classes - 1``.

    With ``batch``, a single label is repeated to shape (batch,) and any other count is an error.
    ``allow_null`` also accepts ``num_classes``, the UNet's learned "no class" label;
    ``num_classes=None`` skips the range check.
    """
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise UserError(f"{what} must be integers, got dtype {labels.dtype}; pass e.g. torch.tensor([3, 1])")
    labels = labels.long().reshape(-1)
    if batch is not None and labels.numel() == 1:
        labels = labels.expand(batch)
    if batch is not None and labels.numel() != batch:
        raise UserError(f"{what} has {labels.numel()} entries for a batch of {batch}; pass one label or one per sample")
    if num_classes is not None and labels.numel():
        top = num_classes if allow_null else num_classes - 1
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > top:
            null = f" (and {num_classes} for 'no class')" if allow_null else ""
            raise UserError(f"{what} out of range: got {lo}..{hi}, valid labels are 0..{num_classes - 1}{null}")
    return labels
