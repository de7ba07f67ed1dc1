"""How a model is conditioned: the container of its conditions, for training and for sampling alike.

A :class:`Conditioner` holds at most one label-like condition (``kind``: none, class or text) and an
optional :class:`~difflab.conditioning.concat.ConcatCondition`. It says which UNet fields the model
needs, prepares a training batch's conditions (dropout into the null condition, Ho & Salimans 2022;
noise-conditioning augmentation, Ho et al. 2021), turns them into network keyword arguments and, at
sampling time, builds the conditional / unconditional pair of classifier-free guidance. Its config is
stored in the model folder so a pipeline rebuilds it exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from difflab.conditioning.base import Condition
from difflab.conditioning.class_label import ClassCondition
from difflab.conditioning.concat import ConcatCondition
from difflab.conditioning.text import TextCondition
from difflab.errors import UserError

KINDS = ("none", "class", "text")


class Conditioner:
    """``kind`` is "none", "class" (``num_classes`` labels) or "text" (a text-encoder spec, or an encoder
    object); ``concat`` adds an image-like condition joined to the network input (combines with any kind)."""

    def __init__(self, kind: str = "none", *, num_classes: int | None = None, class_names: Sequence[str] | None = None,
                 text_encoder: Any = None, concat: ConcatCondition | dict[str, Any] | None = None) -> None:
        if kind not in KINDS:
            raise UserError(f"unknown conditioning {kind!r}; use one of {', '.join(KINDS)}")
        self.kind = kind
        self.label: ClassCondition | TextCondition | None = None
        if kind == "class":
            self.label = ClassCondition(num_classes, class_names)
        elif kind == "text":
            self.label = TextCondition(text_encoder)
        self.concat = ConcatCondition(**concat) if isinstance(concat, dict) else concat

    @property
    def conditions(self) -> list[Condition]:
        return [c for c in (self.label, self.concat) if c is not None]

    @property
    def num_classes(self) -> int | None:
        return self.label.num_classes if isinstance(self.label, ClassCondition) else None

    @property
    def class_names(self) -> list[str] | None:
        return self.label.class_names if isinstance(self.label, ClassCondition) else None

    @property
    def encoder(self) -> Any:
        return self.label.encoder if isinstance(self.label, TextCondition) else None

    # ----- persistence -------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"kind": self.kind, **(self.label.to_config() if self.label else {})}
        if self.concat is not None:
            config["concat"] = self.concat.to_config()
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> "Conditioner":
        """Rebuild from :meth:`to_config` (also the v1 form ``{"kind": ...}`` without a concat entry)."""
        config = dict(config or {"kind": "none"})
        return cls(config.pop("kind", "none"), **config)

    def unet_fields(self) -> dict[str, Any]:
        """The UNetConfig fields these conditions need."""
        return {k: v for c in self.conditions for k, v in c.unet_fields().items()}

    # ----- training ----------------------------------------------------------------------------
    def prepare(self, cond: Mapping[str, Any], drop: Tensor, generator: torch.Generator) -> dict[str, Any]:
        """A collated batch's conditions with training-time randomness applied, on the whole (CPU) batch.

        ``drop`` (B,) bools send the class / text condition of those rows to its null value; the concat
        condition draws its own dropout and augmentation level from ``generator``. Row i of the result
        depends only on row i of ``cond`` (and the draws), so it can be sliced per process.
        """
        prepared: dict[str, Any] = {}
        for condition in self.conditions:
            if condition.key not in cond:
                raise UserError(f"the model is conditioned on {condition.key!r} but the batch's conditions are "
                                f"{sorted(cond)}; use a dataset that provides it")
            prepared.update(condition.prepare(cond[condition.key], drop, generator))
        return prepared

    def network_kwargs(self, prepared: Mapping[str, Any], device: torch.device | str) -> dict[str, Tensor]:
        """Network keyword arguments for rows of :meth:`prepare`'s output (text is encoded here)."""
        return {k: v for c in self.conditions for k, v in c.network_kwargs(dict(prepared), device).items()}

    # ----- sampling ----------------------------------------------------------------------------
    def sampling_kwargs(self, batch: int, class_labels: Any = None, prompt: Any = None, negative_prompt: Any = None,
                        concat: Any = None, aug_level: float = 0.0,
                        noise: Any = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(conditional, unconditional) keyword arguments for ``batch`` samples.

        The unconditional branch is the null label, or the negative prompt (empty prompt by default).
        ``concat`` (a tensor, or ``{key: tensor}``) goes to both branches, augmented at ``aug_level``
        with ``noise`` (see :meth:`ConcatCondition.sampling_pair`).
        """
        self._check_arguments(class_labels, prompt, negative_prompt, concat)
        cond: dict[str, Tensor] = {}
        uncond: dict[str, Tensor] = {}
        if self.label is not None:
            value = class_labels if self.kind == "class" else prompt
            cond, uncond = self.label.sampling_pair(batch, value, negative_prompt=negative_prompt)
        if self.concat is not None:
            value = concat.get(self.concat.key) if isinstance(concat, Mapping) else concat
            c, u = self.concat.sampling_pair(batch, value, aug_level=aug_level, noise=noise)
            cond, uncond = {**cond, **c}, {**uncond, **u}
        return cond, uncond

    def _check_arguments(self, class_labels: Any, prompt: Any, negative_prompt: Any, concat: Any) -> None:
        if self.kind != "text" and (prompt is not None or negative_prompt is not None):
            raise UserError(f"this model was trained with conditioning '{self.kind}', not text; drop the prompt"
                            + (" and pass a class label" if self.kind == "class" else ""))
        if self.kind != "class" and class_labels is not None:
            raise UserError(f"this model was trained with conditioning '{self.kind}', not class labels; drop the class label"
                            + (" and pass a prompt" if self.kind == "text" else ""))
        if self.concat is None and concat is not None:
            raise UserError("this model takes no concatenated condition; drop concat=")
        if isinstance(concat, Mapping) and self.concat is not None and self.concat.key not in concat:
            raise UserError(f"concat names {sorted(concat)} but the model's condition is {self.concat.key!r}")
