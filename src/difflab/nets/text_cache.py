"""A prompt-embedding cache: each distinct prompt goes through the text encoder once.

Training on a captioned dataset repeats the same few hundred captions every epoch; the cache keeps
each caption's trimmed embedding row and re-pads rows into batches. Because padded token positions
are exactly zero (see :class:`~difflab.nets.text_base.TextEmbedding`), a cached row comes back with the
same values every time it is served.

Example:
    >>> from difflab.nets.text_encoder import CachedTextEncoder, load_text_encoder
    >>> encoder = CachedTextEncoder(load_text_encoder("minilm"), max_size=10_000)  # doctest: +SKIP
    >>> emb = encoder.encode(["a red circle", "a red circle", ""])  # one model call, one prompt  # doctest: +SKIP
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from difflab.errors import UserError
from difflab.nets.text_base import TextEmbedding, TextEncoder, check_prompts

__all__ = ["CachedTextEncoder"]


class CachedTextEncoder(TextEncoder):
    """Memoise ``encoder.encode`` per prompt string, least-recently-used first out when full.

    Args:
        encoder: the encoder to wrap; its widths, limits and config are this one's.
        max_size: most prompts kept; ``None`` keeps every prompt seen.

    Attributes:
        hits: prompts served from the cache; misses: prompts sent to ``encoder``.
    """

    def __init__(self, encoder: TextEncoder, max_size: int | None = None) -> None:
        if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1):
            raise UserError(f"max_size={max_size!r} is invalid; use a positive int, or None for no bound")
        self.encoder = encoder
        self.max_size = max_size
        self.hits = 0
        self.misses = 0
        self._rows: OrderedDict[str, TextEmbedding] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, prompt: object) -> bool:
        return prompt in self._rows

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def pooled_dim(self) -> int:
        return self.encoder.pooled_dim

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    def to_config(self) -> dict[str, Any]:
        """The wrapped encoder's config: caching changes no result, so it is not recorded."""
        return self.encoder.to_config()

    def to(self, device: torch.device | str) -> CachedTextEncoder:
        self.encoder.to(device)
        for prompt, row in self._rows.items():
            self._rows[prompt] = row.to(device)
        return self

    def clear(self) -> None:
        """Forget every cached prompt (the hit and miss counts stay)."""
        self._rows.clear()

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        """Embed ``prompts``, sending only the distinct prompts not yet cached to the encoder, in one call."""
        prompts = check_prompts(prompts)
        unique = list(dict.fromkeys(prompts))
        rows = {p: self._rows[p] for p in unique if p in self._rows}
        for p in rows:
            self._rows.move_to_end(p)
        missing = [p for p in unique if p not in rows]
        if missing:
            fresh = self.encoder.encode(missing)
            for i, p in enumerate(missing):
                rows[p] = fresh.select([i]).trim()
                self._store(p, rows[p])
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        return TextEmbedding.cat([rows[p] for p in prompts])

    def _store(self, prompt: str, row: TextEmbedding) -> None:
        self._rows[prompt] = row
        if self.max_size is not None and len(self._rows) > self.max_size:
            self._rows.popitem(last=False)
