"""The network registry: ``_class_name`` in a model folder's ``config.json`` names a registered class.

A registered network has a class attribute ``config_class`` (a dataclass with ``to_dict()`` and
``from_dict(d)``), is built as ``cls(config)`` and keeps ``self.config``::

    @register_network
    class UNet(PretrainedModel, nn.Module):
        config_class = UNetConfig

difflab's own networks are found without importing them first: their modules are listed in
``BUILTIN_MODULES`` and imported by name on the first lookup (so this module imports none of them).
"""

from __future__ import annotations

import importlib

from difflab.errors import UserError

__all__ = ["BUILTIN_MODULES", "network_class", "network_names", "register_network"]

# class name -> module that registers it (imported lazily by network_class / network_names)
BUILTIN_MODULES: dict[str, str] = {
    "UNet": "difflab.nets.unet",
    "AutoencoderKL": "difflab.nets.autoencoder",
    "NoisyClassifier": "difflab.nets.classifier",
    "PatchDiscriminator": "difflab.nets.discriminator",
    "DigitClassifier": "difflab.metrics.domain",
    "ShapesCLIP": "difflab.metrics.shapes_clip",
    "ShapesOracle": "difflab.metrics.shapes_oracle",
}
_NETWORKS: dict[str, type] = {}


def register_network(cls: type) -> type:
    """Class decorator: make ``cls`` loadable by its name (``_class_name`` in ``config.json``)."""
    config_class = getattr(cls, "config_class", None)
    if config_class is None or not hasattr(config_class, "from_dict") or not hasattr(config_class, "to_dict"):
        raise TypeError(f"{cls.__name__} needs a class attribute config_class with to_dict() and from_dict(d)")
    name = cls.__name__
    old = _NETWORKS.get(name)
    if old is not None and old is not cls and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"a network named {name} is already registered ({old.__module__}.{old.__qualname__}); "
                        "rename the class")
    _NETWORKS[name] = cls
    return cls


def network_class(name: str) -> type:
    """The registered class called ``name``; a one-line UserError listing the registered names if none is."""
    if name not in _NETWORKS and name in BUILTIN_MODULES:
        importlib.import_module(BUILTIN_MODULES[name])
    if name not in _NETWORKS:
        raise UserError(f"unknown network class {name!r}; registered networks are: {', '.join(network_names())} "
                        "(import the module that registers it first)")
    return _NETWORKS[name]


def network_names() -> list[str]:
    """Names of all registered networks (difflab's own ones included), sorted."""
    for module in dict.fromkeys(BUILTIN_MODULES.values()):
        try:
            importlib.import_module(module)
        except ImportError:  # an optional dependency is missing: list the others
            continue
    return sorted(_NETWORKS)
