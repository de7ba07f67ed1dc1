"""One component folder format, one writer and one reader for every registered network.

Layout (format 2)::

    config.json         {"_class_name": "UNet", "_difflab_format": 2, "config": {...}, ...extra keys}
    model.safetensors   the state dict

Both files are written atomically, weights first and config last, so a folder whose ``config.json``
exists is complete. v1 folders (``"format": "difflab.diffusion/1"``, a ``model_type`` and the
config under a section key) still load, with one :class:`V1FolderWarning`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from difflab.errors import UserError
from difflab.io.files import atomic_write, ensure_writable_dir, read_json
from difflab.io.registry import network_class

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "PretrainedModel", "V1FolderWarning", "WEIGHTS_NAME",
           "load_model", "load_weights", "read_model_config", "read_weights", "save_model"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 2
V1_FORMAT = "difflab.diffusion/1"
_RESERVED = ("_class_name", "_difflab_format", "config")
# v1 model_type -> (class name, key of its config section); "diffusion" folders had no model_type
_V1_TYPES = {"diffusion": ("UNet", "model"), "autoencoder_kl": ("AutoencoderKL", "autoencoder"),
             "noisy_classifier": ("NoisyClassifier", "classifier")}
_V1_SHAPES_CLIP = ("resolution", "width", "embed_dim", "text_encoder", "text_dim")


class V1FolderWarning(DeprecationWarning):
    """A difflab v1 model folder was read; it loads, but should be re-saved in the v2 format."""


warnings.filterwarnings("default", category=V1FolderWarning)  # shown once per folder, also outside __main__


def save_model(path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None) -> None:
    """Write ``model`` (a registered network) as a component folder; ``extra`` keys go into ``config.json``."""
    path = ensure_writable_dir(Path(path))
    extra = dict(extra or {})
    clash = [k for k in extra if k in _RESERVED]
    if clash:
        raise UserError(f"extra key {clash[0]!r} is reserved in {CONFIG_NAME}; rename it")
    name = type(model).__name__
    if network_class(name) is not type(model):
        raise UserError(f"{name} is not the registered network of that name; decorate it with @register_network")
    config = {"_class_name": name, "_difflab_format": FORMAT_VERSION, "config": model.config.to_dict(), **extra}
    text = json.dumps(config, indent=2)  # fails before anything is written if extra is not JSON
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"_class_name": name}))
    atomic_write(path / CONFIG_NAME, lambda p: p.write_text(text))


def read_model_config(path: str | Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(class name, network config dict, extra keys)`` of a component folder (v2 or v1, see module doc)."""
    name, config, extra = _read_checked(Path(path))
    return name, _require(config, Path(path), name), extra


def load_model(path: str | Path, expected: type | tuple[type, ...] | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """The network saved in ``path``, built from its ``_class_name``, in eval mode on ``device``.

    ``expected``: a class (or tuple) the folder must hold, else a one-line UserError. The other keys of
    ``config.json`` are in ``model.extra_config``.
    """
    path = Path(path)
    name, config, extra = _read_checked(path)
    cls = network_class(name)
    if expected is not None:
        allowed = expected if isinstance(expected, tuple) else (expected,)
        if not issubclass(cls, allowed):
            wanted = " or ".join(_describe(c) for c in allowed)
            raise UserError(f"{path} holds {_describe(cls)} ({name}), not {wanted}; pass a folder saved from one")
    model = cls(cls.config_class.from_dict(_require(config, path, name)))
    load_weights(model, read_weights(path), path)
    model.extra_config = extra
    return model.to(device).eval()


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path/model.safetensors``, with a one-line error if it is missing or corrupt."""
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise UserError(f"model folder {path} is missing {WEIGHTS_NAME}; save it again with save_pretrained")
    try:
        return load_file(str(file))
    except (OSError, ValueError, SafetensorError) as err:
        raise UserError(f"{file} is unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                        "re-export the model from its training run") from None


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Load a state dict, turning an architecture mismatch into a one-line error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        detail = (missing and f"missing {missing[0]}") or (unexpected and f"unexpected {unexpected[0]}") or f"shape of {wrong[0]}"
        raise UserError(
            f"weights in {source} do not fit the architecture in its config.json ({detail}; "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped); the folder holds a checkpoint of another model"
        )
    model.load_state_dict(weights)


def _describe(cls: type) -> str:
    """``cls.description`` (e.g. "an autoencoder") or "a <class name>"."""
    return getattr(cls, "description", None) or f"a {cls.__name__}"


def _require(config: dict[str, Any] | None, path: Path, name: str) -> dict[str, Any]:
    if config is None:
        raise UserError(f"{path / CONFIG_NAME} lacks the config of its {name}; re-export the model from its training run")
    return config


def _read_checked(path: Path) -> tuple[str, dict[str, Any] | None, dict[str, Any]]:
    name, config, extra, v1 = _read_config(path)
    if v1:
        warn_v1(path)
    return name, config, extra


def warn_v1(path: Path) -> None:
    """The one deprecation line for a v1 folder."""
    warnings.warn(f"{path} is a difflab v1 model folder; it loads, but re-save it with save_pretrained "
                  "to get the v2 format", V1FolderWarning, stacklevel=3)


def _read_config(path: Path) -> tuple[str, dict[str, Any] | None, dict[str, Any], bool]:
    raw = read_json(path, CONFIG_NAME, "it was not saved completely, save it again")
    file = path / CONFIG_NAME
    if "_class_name" in raw:
        if raw.get("_difflab_format") != FORMAT_VERSION or not isinstance(raw.get("config"), dict):
            raise UserError(f"{file} is not a difflab v{FORMAT_VERSION} model config (_difflab_format "
                            f"{raw.get('_difflab_format')!r}); it may be a diffusers folder or from a newer difflab")
        extra = {k: v for k, v in raw.items() if k not in _RESERVED}
        return raw["_class_name"], raw["config"], extra, False
    if raw.get("format") == V1_FORMAT:
        return (*_from_v1(raw, file), True)
    raise UserError(f"{file} is not a difflab model config (no _class_name, format {raw.get('format')!r})")


def _from_v1(raw: dict[str, Any], file: Path) -> tuple[str, dict[str, Any] | None, dict[str, Any]]:
    """A v1 config mapped to (class name, network config or None if absent, extra keys)."""
    if raw.get("kind") == "shapes_clip":
        config = {k: raw[k] for k in _V1_SHAPES_CLIP if k in raw}
        return "ShapesCLIP", config, {k: v for k, v in raw.items() if k not in (*_V1_SHAPES_CLIP, "format", "kind")}
    model_type = raw.get("model_type", "diffusion")
    if model_type not in _V1_TYPES:
        raise UserError(f"{file} holds a v1 model of type {model_type!r}, which difflab no longer reads")
    name, section = _V1_TYPES[model_type]
    config = raw[section] if isinstance(raw.get(section), dict) else None
    return name, config, {k: v for k, v in raw.items() if k not in ("format", "model_type", section)}


class PretrainedModel:
    """Mixin giving a registered network ``save_pretrained`` / ``from_pretrained`` in the one folder format.

    ``description`` (a class attribute, e.g. "an autoencoder") names the kind in error messages.
    ``extra_config`` holds the extra keys of ``config.json`` (a classifier's schedule, for instance);
    ``save_pretrained`` writes them again, updated by its ``extra`` argument.
    """

    config_class: type

    @property
    def extra_config(self) -> dict[str, Any]:
        if "_extra_config" not in self.__dict__:
            self.__dict__["_extra_config"] = {}
        return self.__dict__["_extra_config"]

    @extra_config.setter
    def extra_config(self, value: dict[str, Any]) -> None:
        self.__dict__["_extra_config"] = dict(value)

    def save_pretrained(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` (class, config, ``extra_config`` updated by ``extra``) and ``model.safetensors``."""
        save_model(path, self, {**self.extra_config, **(extra or {})})
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> Any:
        """Load a folder written by :meth:`save_pretrained` (or a v1 folder of this class), in eval mode."""
        return load_model(path, expected=cls, device=device)
