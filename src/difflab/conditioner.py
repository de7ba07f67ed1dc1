"""How a model is conditioned (none, class labels or text), for training and for sampling alike.

One :class:`Conditioner` object says which UNet slots a model needs, builds the per-batch keyword
arguments the network receives during training (with condition dropout into the null condition,
Ho & Salimans 2022) and, at sampling time, the conditional / unconditional pair that classifier-free
guidance needs. Its config is stored in the model directory so a pipeline rebuilds it exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from difflab.conditioning import check_labels, drop_conditions
from difflab.errors import UserError

KINDS = ("none", "class", "text")


class Conditioner:
    """``kind`` is "none", "class" (``num_classes`` labels) or "text" (a text-encoder spec, or an encoder object)."""

    def __init__(self, kind: str = "none", *, num_classes: int | None = None, class_names: Sequence[str] | None = None,
                 text_encoder: Any = None) -> None:
        if kind not in KINDS:
            raise UserError(f"unknown conditioning {kind!r}; use one of {', '.join(KINDS)}")
        if kind == "class" and not num_classes:
            raise UserError("class conditioning needs a labelled dataset (shapes, digits, mnist, cifar10 or class subfolders)")
        self.kind = kind
        self.num_classes = num_classes if kind == "class" else None
        self.class_names = list(class_names) if (kind == "class" and class_names) else None
        self.encoder = None
        if kind == "text":
            from difflab.nets.text_base import TextEncoder
            from difflab.nets.text_encoder import CachedTextEncoder, load_text_encoder

            if isinstance(text_encoder, CachedTextEncoder):
                self.encoder = text_encoder
            else:
                built = text_encoder if isinstance(text_encoder, TextEncoder) else load_text_encoder(text_encoder)
                self.encoder = CachedTextEncoder(built)

    # ----- persistence -------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"kind": self.kind}
        if self.kind == "class":
            config.update(num_classes=self.num_classes, class_names=self.class_names)
        if self.kind == "text":
            config["text_encoder"] = self.encoder.to_config()
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> "Conditioner":
        config = dict(config or {"kind": "none"})
        return cls(config.pop("kind", "none"), **config)

    def unet_fields(self) -> dict[str, Any]:
        """The UNetConfig fields this conditioning needs."""
        if self.kind == "class":
            return {"num_classes": self.num_classes}
        if self.kind == "text":
            return {"context_dim": self.encoder.dim, "pooled_context_dim": self.encoder.pooled_dim}
        return {}

    # ----- training ----------------------------------------------------------------------------
    def training_kwargs(self, labels: Tensor, captions: Sequence[str], drop: Tensor, device: torch.device) -> dict[str, Tensor]:
        """Network keyword arguments for a batch; rows where ``drop`` is True get the null condition."""
        if self.kind == "class":
            return {"class_labels": drop_conditions(labels, 0.0, self.num_classes, mask=drop).to(device)}
        if self.kind == "text":
            prompts = ["" if d else c for c, d in zip(captions, drop.tolist())]
            return {k: v.to(device) for k, v in self.encoder.encode(prompts).unet_kwargs().items()}
        return {}

    # ----- sampling ----------------------------------------------------------------------------
    def sampling_kwargs(self, batch: int, class_labels: Any = None, prompt: Any = None,
                        negative_prompt: Any = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(conditional, unconditional) keyword arguments for ``batch`` samples.

        The unconditional branch is the null label, or the negative prompt (empty prompt by default).
        """
        if self.kind != "text" and (prompt is not None or negative_prompt is not None):
            raise UserError(f"this model was trained with conditioning '{self.kind}', not text; drop the prompt"
                            + (" and pass a class label" if self.kind == "class" else ""))
        if self.kind != "class" and class_labels is not None:
            raise UserError(f"this model was trained with conditioning '{self.kind}', not class labels; drop the class label"
                            + (" and pass a prompt" if self.kind == "text" else ""))
        if self.kind == "class":
            labels = self._labels(class_labels, batch)
            return {"class_labels": labels}, {"class_labels": torch.full_like(labels, self.num_classes)}
        if self.kind == "text":
            prompts = _per_sample(prompt if prompt is not None else "", batch, "prompt")
            negatives = _per_sample(negative_prompt if negative_prompt is not None else "", batch, "negative_prompt")
            emb = self.encoder.encode(prompts + negatives)  # one call: both halves padded to the same length
            both = emb.unet_kwargs()
            return ({k: v[:batch] for k, v in both.items()}, {k: v[batch:] for k, v in both.items()})
        return {}, {}

    def _labels(self, class_labels: Any, batch: int) -> Tensor:
        if class_labels is None:
            raise UserError(f"this model is class-conditional; pass a class label 0..{self.num_classes - 1}"
                            + (f" ({', '.join(self.class_names)})" if self.class_names else ""))
        if isinstance(class_labels, str) or (isinstance(class_labels, Sequence) and class_labels and isinstance(class_labels[0], str)):
            names = _per_sample(class_labels, batch, "class label")
            unknown = [n for n in names if not self.class_names or n not in self.class_names]
            if unknown:
                raise UserError(f"unknown class label {unknown[0]!r}; valid labels: {', '.join(self.class_names or [])}")
            class_labels = [self.class_names.index(n) for n in names]
        return check_labels(class_labels, self.num_classes, batch, what="class label")


def _per_sample(value: Any, batch: int, what: str) -> list[str]:
    values = [value] * batch if isinstance(value, str) else list(value)
    if len(values) != batch:
        raise UserError(f"got {len(values)} values for {what} and {batch} images; pass one or one per image")
    return values
