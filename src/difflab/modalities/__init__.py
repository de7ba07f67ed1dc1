"""Modalities: the kinds of data difflab generates (``image``, ``tensor``; later ``audio``, ``video``, ``points``,
``molecule``), each a registered :class:`Modality`."""

from difflab.modalities import image, tensor  # noqa: F401  (registers the built-in modalities)
from difflab.modalities.base import Modality, get_modality, modality_names, register_modality

__all__ = ["Modality", "get_modality", "modality_names", "register_modality"]
