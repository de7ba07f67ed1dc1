"""``build_dataset``: one entry point from a name (or a folder path) to a dataset.

Names map to builders through a registry, so configs and the command line share one table.
MNIST and CIFAR-10 read from ``data_dir``; when it is not given they look in
``$DIFFLAB_DATA_DIR/<name>`` (or ``$DIFFLAB_DATA_DIR`` itself when that subfolder is absent),
else in ``~/.cache/difflab/data/<name>``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from difflab.data.base import ImageDataset
from difflab.errors import UserError

DATA_DIR_ENV = "DIFFLAB_DATA_DIR"
DEFAULT_CACHE_ROOT = Path("~/.cache/difflab/data")
DEFAULT_SHAPES_IMAGES = 10_000

Builder = Callable[..., ImageDataset]
_BUILDERS: dict[str, Builder] = {}


def register_dataset(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make ``build_dataset(name, ...)`` call the decorated builder."""

    def decorate(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"dataset {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder

    return decorate


def dataset_names() -> list[str]:
    """Registered dataset names (any existing folder path is accepted too)."""
    return sorted(_BUILDERS)


def default_data_dir(name: str) -> Path:
    """Where ``name``'s files are looked for when no ``data_dir`` is given."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        root = Path(env).expanduser()
        return root / name if (root / name).exists() else root
    return (DEFAULT_CACHE_ROOT / name).expanduser()


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


@register_dataset("shapes")
def _shapes(resolution: int | None, data_dir: Path | None, num_images: int | None, seed: int,
            **kw: Any) -> ImageDataset:
    from difflab.data.shapes import ShapesDataset

    return ShapesDataset(_or(num_images, DEFAULT_SHAPES_IMAGES), _or(resolution, 32), seed, **kw)


@register_dataset("digits")
def _digits(resolution: int | None, data_dir: Path | None, num_images: int | None, seed: int,
            **kw: Any) -> ImageDataset:
    from difflab.data.digits import DEFAULT_RESOLUTION, DigitsDataset

    return DigitsDataset(_or(resolution, DEFAULT_RESOLUTION), num_images, **kw)


@register_dataset("mnist")
def _mnist(resolution: int | None, data_dir: Path | None, num_images: int | None, seed: int,
           **kw: Any) -> ImageDataset:
    from difflab.data.mnist import NATIVE_RESOLUTION, MNISTDataset

    return MNISTDataset(data_dir or default_data_dir("mnist"),
                        resolution=_or(resolution, NATIVE_RESOLUTION), num_images=num_images, **kw)


@register_dataset("cifar10")
def _cifar10(resolution: int | None, data_dir: Path | None, num_images: int | None, seed: int,
             **kw: Any) -> ImageDataset:
    from difflab.data.cifar10 import NATIVE_RESOLUTION, CIFAR10Dataset

    return CIFAR10Dataset(data_dir or default_data_dir("cifar10"),
                          resolution=_or(resolution, NATIVE_RESOLUTION), num_images=num_images, **kw)


def build_dataset(
    name: str,
    resolution: int | tuple[int, int] | None = None,
    *,
    data_dir: str | Path | None = None,
    num_images: int | None = None,
    seed: int = 0,
    **kw: Any,
) -> ImageDataset:
    """Build a dataset by name ("shapes", "digits", "mnist", "cifar10") or from a folder path.

    ``resolution=None`` uses each dataset's default (shapes 32, digits 16, MNIST 28, CIFAR-10 32,
    folders 32). ``seed`` only affects generated data (shapes). Extra keywords go to the dataset
    class (e.g. ``split="test"``, ``exclude=[("circle", "red")]``, ``labels=True``).

    >>> ds = build_dataset("shapes", 16, num_images=8)
    >>> ds[0]["x"].shape
    torch.Size([3, 16, 16])
    """
    data_dir = None if data_dir is None else Path(data_dir).expanduser()
    if name in _BUILDERS:
        return _BUILDERS[name](resolution, data_dir, num_images, seed, **kw)
    if Path(name).expanduser().exists():
        from difflab.data.folder import ImageFolderDataset

        return ImageFolderDataset(name, _or(resolution, 32), num_images=num_images, **kw)
    raise UserError(
        f"unknown dataset {name!r}: not one of {', '.join(dataset_names())} and no such folder; "
        f"pass one of those names or the path of an image folder"
    )
