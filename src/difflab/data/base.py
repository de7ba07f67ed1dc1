"""The dataset base class, and a dataset backed by an in-memory uint8 image array.

Every difflab dataset yields items in one format (:mod:`difflab.data.collate`)::

    {"x": FloatTensor (*sample_shape), "cond": {"label": int (-1 if none), "caption": str ("" if none), ...},
     "mask": Tensor | None}

and exposes ``sample_shape`` (e.g. ``(3, 32, 48)`` for images: channels first), ``modality`` (a name in
:mod:`difflab.modalities`), ``num_classes`` (None if unlabeled), ``class_names`` (list or None),
``collate`` (how a list of items becomes a batch) and ``__len__``. Image values lie in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from difflab.data.collate import Batch, Item, make_item, stack_collate
from difflab.data.images import uint8_to_tensor
from difflab.errors import UserError

__all__ = ["ArrayDataset", "DiffusionDataset", "ImageDataset", "Item", "check_num_images", "image_item", "make_item"]


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


def image_item(image: torch.Tensor, label: int = -1, caption: str = "") -> Item:
    """An item of a labelled / captioned dataset."""
    return make_item(image, {"label": int(label), "caption": caption})


class DiffusionDataset(Dataset):
    """Base class of every dataset: its sample layout, modality, labels and collate."""

    sample_shape: tuple[int, ...]
    modality: str = "image"
    class_names: list[str] | None = None

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or None when the dataset is unlabeled."""
        return None if self.class_names is None else len(self.class_names)

    @property
    def channels(self) -> int:
        """Channels (the first axis of ``sample_shape``)."""
        return int(self.sample_shape[0])

    @property
    def resolution(self) -> int | None:
        """The side of square 2-D samples, else None (use ``sample_shape``)."""
        spatial = tuple(self.sample_shape[1:])
        return int(spatial[0]) if len(spatial) == 2 and spatial[0] == spatial[1] else None

    def collate(self, items: Sequence[Item]) -> Batch:
        """A batch of items (:func:`difflab.data.collate.stack_collate`; ragged datasets override this)."""
        return stack_collate(items)


ImageDataset = DiffusionDataset  # the v1 name


class ArrayDataset(DiffusionDataset):
    """Images held as one uint8 array ``(N, H, W, C)`` (H and W may differ), with optional labels and captions.

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
        if pixels.dtype != np.uint8 or pixels.ndim != 4:
            raise ValueError(f"pixels must be uint8 (N, H, W, C), got {pixels.dtype} {pixels.shape}")
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
        self.sample_shape = (int(pixels.shape[3]), int(pixels.shape[1]), int(pixels.shape[2]))

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
        return image_item(uint8_to_tensor(self.pixels[index]), self.label(index), self.caption(index))

    def images(self) -> torch.Tensor:
        """All images as one float tensor ``(N, C, H, W)`` in [-1, 1] (for small in-memory training)."""
        return uint8_to_tensor(self.pixels)
