"""(low-resolution, high-resolution) pairs for super-resolution and cascades (SR3, Saharia et al. 2021;
CDM, Ho et al. 2021): each item keeps its ``x`` and gains ``cond["low_res"]``, ``x`` downsampled by
``factor`` with area averaging (each low-res pixel is the mean of a ``factor x factor`` block)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from difflab.data.base import DiffusionDataset
from difflab.data.collate import Item
from difflab.errors import UserError


class LowResolutionPairs(DiffusionDataset):
    """``dataset`` with ``cond[key]`` = its samples downsampled by ``factor`` (the spatial sizes must divide)."""

    def __init__(self, dataset: Any, factor: int, key: str = "low_res") -> None:
        spatial = tuple(dataset.sample_shape[1:])
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2 or any(n % factor for n in spatial):
            raise UserError(f"low_res_factor={factor!r} must be an int >= 2 dividing the sample size {list(spatial)}")
        self.dataset, self.factor, self.key = dataset, factor, key
        self.sample_shape = tuple(dataset.sample_shape)
        self.modality = getattr(dataset, "modality", "image")
        self.class_names = getattr(dataset, "class_names", None)
        self.low_res_shape = (self.sample_shape[0], *(n // factor for n in spatial))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Item:
        item = self.dataset[index]
        low = F.avg_pool2d(item["x"][None], self.factor)[0] if item["x"].ndim == 3 else \
            F.avg_pool1d(item["x"][None], self.factor)[0]
        return {**item, "cond": {**item["cond"], self.key: low}}


class PictureCondition(DiffusionDataset):
    """``dataset`` whose items also carry their own ``x`` as ``cond[key]``: the clean picture from which an
    inpainting model's condition (masked picture and mask, drawn per training step) is made."""

    def __init__(self, dataset: Any, key: str = "image") -> None:
        self.dataset, self.key = dataset, key
        self.sample_shape = tuple(dataset.sample_shape)
        self.modality = getattr(dataset, "modality", "image")
        self.class_names = getattr(dataset, "class_names", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Item:
        item = self.dataset[index]
        return {**item, "cond": {**item["cond"], self.key: item["x"]}}
