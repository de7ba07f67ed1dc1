"""What a kind of data is: its sample layout, its media files, its preview, its default metrics.

A :class:`Modality` is registered under a name (``image`` here; ``audio``, ``video``, ``points`` and
``molecule`` by later modules through the same :func:`register_modality`). Datasets, pipelines and model
folders carry the name and a ``sample_shape``; everything above the denoiser asks the modality, never
the shape, how to turn samples into media.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from difflab.errors import UserError


class Modality:
    """Base class: ``name``, the rank of a sample (``ndim``, None = any), media IO and previews.

    Subclasses override :meth:`to_media` (one media object per sample), :meth:`save` (write samples to
    ``path``; the file suffix picks the format) and :meth:`preview` (one picture or file for a glance).
    """

    name: str = ""
    ndim: int | None = None  # axes of one sample (channels first), None: any
    default_suffix: str = ".safetensors"
    default_metrics: tuple[str, ...] = ()

    def check_shape(self, sample_shape: Sequence[int]) -> tuple[int, ...]:
        """``sample_shape`` as a tuple of positive ints of this modality's rank (one-line error otherwise)."""
        shape = tuple(int(n) for n in sample_shape)
        if not shape or min(shape) < 1:
            raise UserError(f"sample_shape {list(sample_shape)} is invalid: give positive sizes, channels first")
        if self.ndim is not None and len(shape) != self.ndim:
            raise UserError(f"a {self.name} sample has {self.ndim} axes (channels first), got sample_shape {list(shape)}")
        return shape

    def finalize(self, samples: Tensor) -> Tensor:
        """Final samples as the modality's value range wants them (unchanged here; images clamp to [-1, 1])."""
        return samples

    def to_media(self, samples: Tensor) -> list[Any]:
        """One media object per sample (the tensor rows themselves here)."""
        return list(samples.detach().cpu())

    def save(self, samples: Tensor, path: str | Path) -> Path:
        """Write ``samples`` to ``path`` (a ``.safetensors`` file of the batch here)."""
        from safetensors.torch import save_file

        from difflab.io.files import atomic_write, ensure_writable_file

        path = ensure_writable_file(Path(path))
        atomic_write(path, lambda p: save_file({"samples": samples.detach().cpu().contiguous()}, str(p)))
        return path

    def preview(self, samples: Tensor, path: str | Path) -> Path:
        """A file to look at during training (``samples/step_N`` of a run)."""
        return self.save(samples, Path(path).with_suffix(self.default_suffix))


def grid_rows(n: int) -> int:
    """Images per row of a near-square grid of ``n``."""
    return int(math.ceil(math.sqrt(n)))


_MODALITIES: dict[str, Modality] = {}


def register_modality(cls: type[Modality]) -> type[Modality]:
    """Class decorator: make ``get_modality(cls.name)`` return an instance of ``cls``."""
    if not cls.name or cls.name in _MODALITIES:
        raise ValueError(f"modality {cls.name!r} has no name or is registered twice")
    _MODALITIES[cls.name] = cls()
    return cls


def get_modality(name: str | Modality) -> Modality:
    """The registered modality called ``name`` (one-line error listing the names otherwise)."""
    if isinstance(name, Modality):
        return name
    if name not in _MODALITIES:
        raise UserError(f"unknown modality {name!r}; registered: {', '.join(sorted(_MODALITIES))}")
    return _MODALITIES[name]


def modality_names() -> list[str]:
    return sorted(_MODALITIES)

