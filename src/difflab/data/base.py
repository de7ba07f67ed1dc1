"""The common item format, and a dataset backed by an in-memory uint8 array.

Every difflab dataset yields dicts that the default DataLoader collate can batch:

    {"image": FloatTensor (C, H, W) in [-1, 1], "label": int (-1 if none), "caption": str ("" if none)}

and exposes ``channels``, ``resolution``, ``num_classes`` (None if unlabeled), ``class_names``
(list or None) and ``__len__``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from difflab.data.images import uint8_to_tensor
from difflab.errors import UserError

Item = dict[str, Any]


def check_num_images(num_images: int | None, available: int, source: str) -> int:
    """How many images to keep: all when ``num_images`` is None, else ``num_images`` (validated)."""
    if num_images is None:
        return available
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise UserError(f"num_images must be a positive integer or None, got {num_images!r}")
    if num_images > available:
        raise UserError(
            f"num_images={num_images} but {source} has only {available} images; pass num_images<={available}"
        )
    return int(num_images)


def make_item(image: torch.Tensor, label: int = -1, caption: str = "") -> Item:
    """Build one item in the common format."""
    return {"image": image, "label": int(label), "caption": caption}


class ImageDataset(Dataset):
    """Base class: holds the metadata every dataset exposes."""

    channels: int
    resolution: int
    class_names: list[str] | None

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or None when the dataset is unlabeled."""
        return None if self.class_names is None else len(self.class_names)


class ArrayDataset(ImageDataset):
    """Images held as one uint8 array ``(N, H, W, C)``, with optional labels and captions.

    ``captions`` is a list of strings, or None; when None and ``caption_template`` is given,
    the caption of item i is ``caption_template.format(label=..., name=class_names[label])``.
    """

    def __init__(
        self,
        pixels: np.ndarray,
        labels: Sequence[int] | np.ndarray | None = None,
        class_names: Sequence[str] | None = None,
        captions: Sequence[str] | None = None,
        caption_template: str | None = None,
    ) -> None:
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1] != pixels.shape[2]:
            raise ValueError(f"pixels must be uint8 (N, R, R, C), got {pixels.dtype} {pixels.shape}")
        n = pixels.shape[0]
        # Stored channels-first so __getitem__ is a view and one cast.
        self.pixels = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if self.labels is not None and self.labels.shape != (n,):
            raise ValueError(f"expected {n} labels, got shape {self.labels.shape}")
        if captions is not None and len(captions) != n:
            raise ValueError(f"expected {n} captions, got {len(captions)}")
        self.captions = None if captions is None else list(captions)
        self.caption_template = caption_template
        self.class_names = None if class_names is None else list(class_names)
        self.channels = int(pixels.shape[3])
        self.resolution = int(pixels.shape[1])

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def label(self, index: int) -> int:
        """Class label of item ``index`` (-1 when unlabeled)."""
        return -1 if self.labels is None else int(self.labels[index])

    def caption(self, index: int) -> str:
        """Caption of item ``index`` ("" when there is none)."""
        if self.captions is not None:
            return self.captions[index]
        label = self.label(index)
        if self.caption_template is None or label < 0:
            return ""
        name = self.class_names[label] if self.class_names else str(label)
        return self.caption_template.format(label=label, name=name)

    def __getitem__(self, index: int) -> Item:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        index = index % len(self)
        return make_item(uint8_to_tensor(self.pixels[index]), self.label(index), self.caption(index))

    def images(self) -> torch.Tensor:
        """All images as one float tensor ``(N, C, H, W)`` in [-1, 1] (for small in-memory training)."""
        return uint8_to_tensor(self.pixels)
