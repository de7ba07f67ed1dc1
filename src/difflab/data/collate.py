"""Batching of dataset items: ``collate(items) -> {"x", "cond", "mask"}``.

Every dataset item has one format, whatever the modality::

    {"x": Tensor (*sample_shape), "cond": {name: value}, "mask": Tensor | None}

``cond`` holds the item's conditions (``"label"``: int, -1 when none; ``"caption"``: str; a low-res image
for concatenation; ...). A batch has the same keys: ``x`` (B, *sample_shape), ``cond`` with each
condition batched (numbers and tensors stacked, strings kept as lists), and ``mask`` (B, ...) with 1 on
real entries and 0 on padding, or None when every entry is real. :func:`stack_collate` is the default;
ragged data (point sets, atoms, variable-length audio) uses :func:`pad_collate`, which pads along the
first axis of ``x`` and builds the mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from difflab.errors import UserError

Item = dict[str, Any]
Batch = dict[str, Any]


def make_item(x: Tensor, cond: dict[str, Any] | None = None, mask: Tensor | None = None) -> Item:
    """One item in the common format."""
    return {"x": x, "cond": dict(cond or {}), "mask": mask}


def collate_conditions(items: Sequence[Item]) -> dict[str, Any]:
    """The items' ``cond`` dicts batched: tensors stacked, ints/floats/bools as a tensor, anything else a list."""
    names = list(items[0]["cond"])
    for item in items[1:]:
        if list(item["cond"]) != names:
            raise UserError(f"items have different conditions ({names} vs {list(item['cond'])}); every item needs the same keys")
    out: dict[str, Any] = {}
    for name in names:
        values = [item["cond"][name] for item in items]
        if isinstance(values[0], Tensor):
            out[name] = torch.stack(values)
        elif isinstance(values[0], (bool, int, float)):
            out[name] = torch.tensor(values)
        else:
            out[name] = list(values)
    return out


def stack_collate(items: Sequence[Item]) -> Batch:
    """Items of one shape stacked into a batch (a mask only if the items carry one)."""
    if not items:
        raise UserError("cannot collate an empty list of items")
    shapes = {tuple(item["x"].shape) for item in items}
    if len(shapes) > 1:
        raise UserError(f"items have different shapes {sorted(shapes)}; use pad_collate for ragged data")
    masks = [item.get("mask") for item in items]
    mask = None if all(m is None for m in masks) else torch.stack([
        m if m is not None else torch.ones(item["x"].shape[:1]) for m, item in zip(masks, items)])
    return {"x": torch.stack([item["x"] for item in items]), "cond": collate_conditions(items), "mask": mask}


def pad_collate(items: Sequence[Item], pad_value: float = 0.0) -> Batch:
    """Ragged items (``x`` of shape (L_i, *rest)) padded along the first axis to the longest L.

    ``mask`` is (B, L_max) with 1 where an entry is real; an item's own mask (L_i,) is kept inside its
    length. Every loss, likelihood and bits/dim counts dimensions with this mask.
    """
    if not items:
        raise UserError("cannot collate an empty list of items")
    rest = {tuple(item["x"].shape[1:]) for item in items}
    if len(rest) > 1:
        raise UserError(f"ragged items must agree on every axis but the first, got {sorted(rest)}")
    longest = max(int(item["x"].shape[0]) for item in items)
    first = items[0]["x"]
    x = torch.full((len(items), longest, *first.shape[1:]), pad_value, dtype=first.dtype)
    mask = torch.zeros(len(items), longest, dtype=first.dtype)
    for i, item in enumerate(items):
        n = int(item["x"].shape[0])
        x[i, :n] = item["x"]
        own = item.get("mask")
        mask[i, :n] = 1.0 if own is None else own.to(first.dtype)
    return {"x": x, "cond": collate_conditions(items), "mask": mask}
