"""Pairing the conditional and unconditional branch of classifier-free guidance in one batch.

Sampling runs both branches as one doubled batch (Ho & Salimans 2022): rows ``0 .. B-1`` are the
conditional ones. Contexts of different token counts are zero-padded with a ``context_mask``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from difflab.errors import UserError

CONTEXT, CONTEXT_MASK = "context", "context_mask"


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
