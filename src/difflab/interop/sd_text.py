"""Stable Diffusion's prompt encoding: CLIP tokens padded to ``max_length``, every position kept.

Stable Diffusion (Rombach et al. 2022) pads each prompt with the padding token to the tokenizer's
``model_max_length`` (77), runs ``CLIPTextModel`` on all 77 positions and feeds the whole
``last_hidden_state`` (after the final layer norm) to the UNet's cross-attention; the empty prompt of
the unconditional branch is encoded the same way. difflab's own :class:`~difflab.nets.text_hf.CLIPEncoder`
instead masks and zeroes the padding and gives the empty prompt a null row, which a model trained the
SD way has never seen, so SD weights need this encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from difflab.nets.text_base import TextEmbedding, check_prompts
from difflab.nets.text_hf import CLIPEncoder


class PaddedCLIPEncoder(CLIPEncoder):
    """CLIP text encoding exactly as Stable Diffusion does it (module docstring).

    ``tokens`` is the full ``(B, max_length, D)`` hidden state with ``mask`` all true; ``pooled`` is CLIP's
    ``pooler_output`` (the end-of-text state), which SD's UNet does not read. The attention mask is passed
    to the text model only when its config sets ``use_attention_mask`` (as diffusers does).
    """

    kind = "clip_padded"

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        prompts = check_prompts(prompts)
        for prompt, ids in zip(prompts, self.tokenizer(prompts, verbose=False)["input_ids"]):
            if len(ids) > self.max_length:
                self._warn_truncated(prompt, len(ids))
        batch = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        use_mask = bool(getattr(self.model.config, "use_attention_mask", False))
        mask = batch["attention_mask"].to(self.device) if use_mask else None
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask)
        hidden = out.last_hidden_state
        every = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        is_null = torch.zeros(len(prompts), dtype=torch.bool, device=hidden.device)
        return TextEmbedding(hidden, every, out.pooler_output, is_null)

    def to_config(self) -> dict[str, Any]:
        return {**super().to_config(), "kind": self.kind}
