"""What every condition module answers: its null value, training-time dropout, CFG pair and config.

A condition reads one entry of a batch's collated ``cond`` dict (``"label"``, ``"caption"``, a concat
key such as ``"low_res"``), turns it into network keyword arguments and knows its "no condition"
value for classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from difflab.errors import UserError


class Condition:
    """Base of :class:`ClassCondition`, :class:`TextCondition` and :class:`ConcatCondition`.

    ``key`` names the condition in the batch's ``cond`` dict. Subclasses implement :meth:`prepare` (on the
    whole CPU batch, row i depending only on row i), :meth:`network_kwargs`, :meth:`sampling_pair`,
    :meth:`unet_fields` and :meth:`to_config`; :meth:`from_config` rebuilds them.
    """

    kind: ClassVar[str] = ""
    key: str = ""

    def prepare(self, values: Any, drop: Tensor, generator: torch.Generator) -> dict[str, Any]:
        raise NotImplementedError

    def network_kwargs(self, prepared: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
        raise NotImplementedError

    def sampling_pair(self, batch: int, value: Any, **options: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(conditional, unconditional) network keyword arguments for ``batch`` samples."""
        raise NotImplementedError

    def unet_fields(self) -> dict[str, Any]:
        return {}

    def to_config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Condition":
        return cls(**config)


def per_sample(value: Any, batch: int, what: str) -> list[str]:
    """One string per sample: a single string is repeated, a sequence must have ``batch`` entries."""
    values = [value] * batch if isinstance(value, str) else list(value)
    if len(values) != batch:
        raise UserError(f"got {len(values)} values for {what} and {batch} images; pass one or one per image")
    return values


def rows_where(drop: Tensor, null: Tensor, values: Tensor) -> Tensor:
    """``values`` with the rows flagged in ``drop`` (B,) replaced by ``null`` (one row, broadcast)."""
    rows = drop.to(values.device).reshape(-1, *([1] * (values.ndim - 1)))
    return torch.where(rows, null.to(values), values)
