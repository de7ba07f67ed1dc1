"""Class-label conditioning: a learned embedding per class and one learned null label (index ``num_classes``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from difflab.conditioning.base import Condition, per_sample
from difflab.conditioning.dropout import drop_conditions
from difflab.conditioning.labels import check_labels
from difflab.errors import UserError


class ClassCondition(Condition):
    """Labels ``0 .. num_classes - 1`` (batch key ``"label"``), network keyword ``class_labels``; the null
    value is ``num_classes``, the UNet's learned "no class" label."""

    kind = "class"

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, key: str = "label") -> None:
        if not num_classes:
            raise UserError("class conditioning needs a labelled dataset (shapes, digits, mnist, cifar10 or class subfolders)")
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names else None
        self.key = key

    @property
    def null_value(self) -> int:
        return self.num_classes

    def prepare(self, values: Any, drop: Tensor, generator: torch.Generator) -> dict[str, Any]:
        labels = torch.as_tensor(values).long()
        return {self.key: drop_conditions(labels, 0.0, self.null_value, mask=drop)}

    def network_kwargs(self, prepared: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
        return {"class_labels": prepared[self.key].to(device)}

    def sampling_pair(self, batch: int, value: Any, **options: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        labels = self.labels(value, batch)
        return {"class_labels": labels}, {"class_labels": torch.full_like(labels, self.null_value)}

    def labels(self, class_labels: Any, batch: int) -> Tensor:
        """Indices or class names (one, or one per sample) as checked labels of shape (batch,)."""
        if class_labels is None:
            raise UserError(f"this model is class-conditional; pass a class label 0..{self.num_classes - 1}"
                            + (f" ({', '.join(self.class_names)})" if self.class_names else ""))
        if isinstance(class_labels, str) or (isinstance(class_labels, Sequence) and class_labels
                                             and isinstance(class_labels[0], str)):
            names = per_sample(class_labels, batch, "class label")
            unknown = [n for n in names if not self.class_names or n not in self.class_names]
            if unknown:
                raise UserError(f"unknown class label {unknown[0]!r}; valid labels: {', '.join(self.class_names or [])}")
            class_labels = [self.class_names.index(n) for n in names]
        return check_labels(class_labels, self.num_classes, batch, what="class label")

    def unet_fields(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def to_config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "class_names": self.class_names}
