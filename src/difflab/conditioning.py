"""Conditions of a diffusion model: validate class labels, pair cond/uncond batches, drop conditions.

A condition is a keyword tensor sent to the network with ``x`` and ``t``: ``class_labels`` (B,) ints,
``context`` (B, L, D) token embeddings with an optional ``context_mask`` (B, L), ``pooled_context``
(B, D). Classifier-free guidance (Ho & Salimans 2022) needs the model to know "no condition" too:
training replaces each sample's condition by a null one with probability ``p`` (:func:`drop_conditions`,
:func:`drop_context`), and sampling runs the conditional and null branches as one doubled batch
(:func:`pair_conditions`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from difflab.errors import UserError

CONTEXT, CONTEXT_MASK = "context", "context_mask"


# ----- class labels --------------------------------------------------------------------------
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


# ----- pairing the conditional and unconditional branch ----------------------------------------
def _batched(name: str, value: Any, batch: int) -> Tensor:
    """A condition value as a tensor with leading dim ``batch`` (a scalar or leading dim 1 is repeated)."""
    value = torch.as_tensor(value)
    if value.ndim == 0:
        return value.expand(batch)
    if value.shape[0] == 1 and batch != 1:
        return value.expand(batch, *value.shape[1:])
    if value.shape[0] != batch:
        raise UserError(f"condition {name!r} has batch {value.shape[0]} but x has {batch}; pass 1 or {batch} rows")
    return value


def _pad_tokens(cond: dict[str, Tensor], length: int) -> dict[str, Tensor]:
    """Pad ``context`` (which has a ``context_mask``) with zero tokens to ``length``, masked out of attention."""
    ctx, mask = cond[CONTEXT], cond[CONTEXT_MASK].bool()
    pad = length - ctx.shape[1]
    zeros = ctx.new_zeros(ctx.shape[0], pad, ctx.shape[2])
    off = torch.zeros(ctx.shape[0], pad, dtype=torch.bool, device=mask.device)
    return {**cond, CONTEXT: torch.cat([ctx, zeros], 1), CONTEXT_MASK: torch.cat([mask, off], 1)}


def _align_context(cond: dict[str, Tensor], uncond: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Give both branches the same token count and, if either has a mask or they differ, a mask on both."""
    if CONTEXT not in cond or CONTEXT not in uncond:
        return cond, uncond
    lc, lu = cond[CONTEXT].shape[1], uncond[CONTEXT].shape[1]
    if lc == lu and CONTEXT_MASK not in cond and CONTEXT_MASK not in uncond:
        return cond, uncond

    def with_mask(c: dict[str, Tensor]) -> dict[str, Tensor]:
        ones = torch.ones(c[CONTEXT].shape[:2], dtype=torch.bool, device=c[CONTEXT].device)
        return {CONTEXT_MASK: ones, **c}

    length = max(lc, lu)
    return _pad_tokens(with_mask(cond), length), _pad_tokens(with_mask(uncond), length)


def expand_conditions(cond: Mapping[str, Any], batch: int) -> dict[str, Tensor]:
    """Conditions as tensors with leading dim ``batch`` (scalars and batch-1 values are repeated)."""
    return {k: _batched(k, v, batch) for k, v in cond.items()}


def pair_conditions(cond: Mapping[str, Any], uncond: Mapping[str, Any], batch: int) -> dict[str, Tensor]:
    """Concatenate the conditional and unconditional conditions along the batch: rows 0..B-1 are ``cond``.

    Both must name the same keys. Values with batch 1 (or scalars) are repeated to ``batch``; contexts of
    different token counts are zero-padded to the longer one with a ``context_mask`` that hides the padding.
    """
    cond, uncond = expand_conditions(cond, batch), expand_conditions(uncond, batch)
    cond, uncond = _align_context(cond, uncond)
    if set(cond) != set(uncond):
        only = sorted(set(cond) ^ set(uncond))
        raise UserError(f"cond and uncond must name the same conditions; {only} appear in only one of them")
    paired = {}
    for key, value in cond.items():
        other = uncond[key].to(device=value.device, dtype=value.dtype)
        if other.shape[1:] != value.shape[1:]:
            raise UserError(f"condition {key!r}: cond rows have shape {tuple(value.shape[1:])}, "
                            f"uncond rows {tuple(other.shape[1:])}; they must match")
        paired[key] = torch.cat([value, other])
    return paired


def repeat_conditions(cond: Mapping[str, Any], batch: int, times: int = 2) -> dict[str, Any]:
    """Repeat per-sample conditions ``times`` along the batch (non-tensors and None pass through)."""
    out = {}
    for key, value in cond.items():
        if isinstance(value, Tensor) and value.ndim and value.shape[0] == batch:
            value = value.repeat(times, *([1] * (value.ndim - 1)))
        out[key] = value
    return out


# ----- condition dropout for training ----------------------------------------------------------
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
