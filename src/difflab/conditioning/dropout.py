"""Training-time condition dropout into the null condition (Ho & Salimans 2022, Alg. 1)."""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.errors import UserError


def drop_mask(batch: int, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Bernoulli(p) flags of shape (batch,), drawn on the CPU: True = drop this sample's condition."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise UserError(f"condition dropout must lie in [0, 1], got {p!r}; 0.1 is usual (Ho & Salimans 2022)")
    return torch.rand(batch, generator=generator, dtype=torch.float64) < float(p)


def drop_conditions(
    labels: Tensor, p: float, null_label: int, generator: torch.Generator | None = None, *, mask: Tensor | None = None
) -> Tensor:
    """Replace each label by ``null_label`` with probability ``p`` (Ho & Salimans 2022, Alg. 1).

    Pass ``mask`` (from :func:`drop_mask`) to drop the same samples in several conditions.
    """
    mask = drop_mask(labels.shape[0], p, generator) if mask is None else mask
    return torch.where(mask.to(labels.device), torch.full_like(labels, int(null_label)), labels)


def drop_context(
    context: Tensor,
    p: float,
    generator: torch.Generator | None = None,
    *,
    context_mask: Tensor | None = None,
    null_context: Tensor | None = None,
    null_mask: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Replace each sample's embedding by the null one with probability ``p``; returns (context, context_mask).

    Works for token embeddings (B, L, D) and pooled vectors (B, D). The null embedding is ``null_context``
    (one row, broadcast; e.g. the encoding of the empty prompt) or zeros. Dropped rows of ``context_mask``
    become ``null_mask`` (default: all tokens visible; with all-zero tokens every visible token gives the
    same attention output, so the null condition does not depend on the mask).
    """
    mask = drop_mask(context.shape[0], p, generator) if mask is None else mask
    rows = mask.to(context.device).reshape(-1, *([1] * (context.ndim - 1)))
    null = torch.zeros_like(context[:1]) if null_context is None else null_context.to(context).reshape(1, *context.shape[1:])
    dropped = torch.where(rows, null, context)
    if context_mask is None:
        return dropped, None
    keep = torch.ones_like(context_mask[:1], dtype=torch.bool) if null_mask is None else null_mask.bool().reshape(1, -1)
    return dropped, torch.where(mask.to(context_mask.device)[:, None], keep.to(context_mask.device), context_mask.bool())
