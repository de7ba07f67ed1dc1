"""Text conditioning: captions encoded by a text encoder into cross-attention tokens and a pooled vector.

The null value is the empty prompt's encoding (Ho & Salimans 2022; Saharia et al. 2022); a negative
prompt replaces it in the unconditional branch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from difflab.conditioning.base import Condition, per_sample

NULL_PROMPT = ""


class TextCondition(Condition):
    """Captions (batch key ``"caption"``) -> ``context``, ``context_mask``, ``pooled_context``.

    ``text_encoder`` is a spec (``"minilm"``, ``"clip:/dir"``, ...), a config dict or an encoder object.
    """

    kind = "text"

    def __init__(self, text_encoder: Any = None, key: str = "caption") -> None:
        from difflab.nets.text_base import TextEncoder
        from difflab.nets.text_encoder import CachedTextEncoder, load_text_encoder

        if isinstance(text_encoder, CachedTextEncoder):
            self.encoder = text_encoder
        else:
            built = text_encoder if isinstance(text_encoder, TextEncoder) else load_text_encoder(text_encoder)
            self.encoder = CachedTextEncoder(built)
        self.key = key

    null_value = NULL_PROMPT

    def prepare(self, values: Any, drop: Tensor, generator: torch.Generator) -> dict[str, Any]:
        return {self.key: [self.null_value if d else c for c, d in zip(values, drop.tolist())]}

    def network_kwargs(self, prepared: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
        return self.encode(list(prepared[self.key]), device)

    def encode(self, prompts: list[str], device: torch.device | str = "cpu") -> dict[str, Tensor]:
        return {k: v.to(device) for k, v in self.encoder.encode(prompts).unet_kwargs().items()}

    def sampling_pair(self, batch: int, value: Any, negative_prompt: Any = None,
                      **options: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        prompts = per_sample(value if value is not None else self.null_value, batch, "prompt")
        negatives = per_sample(negative_prompt if negative_prompt is not None else self.null_value, batch, "negative_prompt")
        both = self.encode(prompts + negatives)  # one call: both halves padded to the same length
        return {k: v[:batch] for k, v in both.items()}, {k: v[batch:] for k, v in both.items()}

    def unet_fields(self) -> dict[str, Any]:
        return {"context_dim": self.encoder.dim, "pooled_context_dim": self.encoder.pooled_dim}

    def to_config(self) -> dict[str, Any]:
        return {"text_encoder": self.encoder.to_config()}
