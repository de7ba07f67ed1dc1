"""Pipeline folders: ``model_index.json`` plus one component folder per network (diffusers' layout).

::

    model_index.json  {"_class_name": "DiffusionPipeline", "_difflab_format": 2,
                       "unet": ["difflab", "UNet"], "vae": [null, null], ...settings}
    unet/             a component folder (:func:`~difflab.io.model_folder.save_model`)
    vae/              likewise, when present

Settings are the pipeline's own JSON values (schedule, parameterization, sample_shape, ...) at the top
level. The index is written last, atomically, so a folder with ``model_index.json`` is complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from difflab.errors import UserError
from difflab.io.files import atomic_write, ensure_writable_dir, read_json
from difflab.io.model_folder import FORMAT_VERSION, save_model

__all__ = ["INDEX_NAME", "ComponentSpec", "component_entry", "read_index", "read_pipeline_folder",
           "save_pipeline_folder", "write_index"]

INDEX_NAME = "model_index.json"
LIBRARY = "difflab"


@dataclass(frozen=True)
class ComponentSpec:
    """One component of a pipeline folder: its subfolder and the ``(library, class)`` the index names."""

    name: str
    library: str
    class_name: str
    path: Path


def component_entry(model: nn.Module | None) -> list[str | None]:
    """The index entry of a difflab network: ``["difflab", class name]``, ``[None, None]`` for none."""
    return [None, None] if model is None else [LIBRARY, type(model).__name__]


def save_pipeline_folder(path: str | Path, class_name: str, components: dict[str, nn.Module | None],
                         settings: dict[str, Any]) -> None:
    """Write each difflab network into ``path/<name>`` and then ``model_index.json`` naming them."""
    path = ensure_writable_dir(Path(path))
    for name, model in components.items():
        if model is not None:
            save_model(path / name, model)
    write_index(path, class_name, {name: component_entry(m) for name, m in components.items()}, settings)


def write_index(path: Path, class_name: str, entries: dict[str, list[str | None]], settings: dict[str, Any]) -> None:
    """Write ``model_index.json`` atomically (call it after every component is on disk)."""
    clash = [k for k in settings if k in entries or k.startswith("_")]
    if clash:
        raise UserError(f"pipeline setting {clash[0]!r} clashes with a component or reserved name; rename it")
    index = {"_class_name": class_name, "_difflab_format": FORMAT_VERSION, **entries, **settings}
    text = json.dumps(index, indent=2)
    atomic_write(Path(path) / INDEX_NAME, lambda p: p.write_text(text))


def read_index(path: str | Path) -> dict[str, Any]:
    """``model_index.json`` of ``path`` with one-line errors for a missing folder or file."""
    index = read_json(Path(path), INDEX_NAME, "it is not a pipeline folder, or it was not saved completely")
    if "_class_name" not in index:
        raise UserError(f"{Path(path) / INDEX_NAME} has no _class_name; it is not a pipeline index")
    return index


def read_pipeline_folder(path: str | Path) -> tuple[str, dict[str, Any], dict[str, ComponentSpec]]:
    """``(pipeline class name, settings, {name: ComponentSpec})`` of a pipeline folder.

    Components are the entries ``[library, class]``; a named component whose subfolder is missing is a
    one-line error. Settings are all other keys not starting with ``_``.
    """
    path = Path(path)
    index = read_index(path)
    specs: dict[str, ComponentSpec] = {}
    settings: dict[str, Any] = {}
    for key, value in index.items():
        if key.startswith("_"):
            continue
        if _is_entry(value):
            if value[0] is None:
                continue
            if not (path / key).is_dir():
                raise UserError(f"the {key} component is missing: {path / key} does not exist")
            specs[key] = ComponentSpec(key, value[0], value[1], path / key)
        else:
            settings[key] = value
    return index["_class_name"], settings, specs


def _is_entry(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(v is None or isinstance(v, str) for v in value) and (value[0] is None) == (value[1] is None))
