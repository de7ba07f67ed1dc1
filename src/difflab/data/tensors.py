"""A dataset over in-memory tensors, for small trainings whose samples are already one tensor (metric networks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from difflab.data.base import DiffusionDataset
from difflab.data.collate import Item, make_item
from difflab.errors import UserError


class TensorDataset(DiffusionDataset):
    """Item i is ``{"x": x[i], "cond": {name: values[i]}, "mask": None}``; ``cond`` values are tensors or lists of N."""

    def __init__(self, x: Tensor, cond: dict[str, Tensor | Sequence[Any]] | None = None,
                 class_names: Sequence[str] | None = None) -> None:
        self.x = x
        self.cond = dict(cond or {})
        for name, values in self.cond.items():
            if len(values) != len(x):
                raise UserError(f"condition {name!r} has {len(values)} values for {len(x)} samples; give one per sample")
        self.sample_shape = tuple(int(n) for n in x.shape[1:])
        self.class_names = None if class_names is None else list(class_names)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> Item:
        return make_item(self.x[index], {name: values[index] for name, values in self.cond.items()})
