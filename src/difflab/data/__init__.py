"""Datasets: built-in captioned shapes and digits, image folders, MNIST and CIFAR-10 from disk.

Every dataset yields ``{"x": Tensor (*sample_shape), "cond": {"label": int (-1 if none), "caption": str},
"mask": Tensor | None}`` (images: (C, H, W) in [-1, 1]) and exposes ``sample_shape``, ``modality``,
``num_classes``, ``class_names``, ``collate`` and ``len``. Use :func:`build_dataset` to get one by name.
"""

from difflab.data.base import ArrayDataset, DiffusionDataset, ImageDataset
from difflab.data.collate import make_item, pad_collate, stack_collate
from difflab.data.cifar10 import CIFAR10Dataset
from difflab.data.digits import DigitsDataset
from difflab.data.folder import ImageFolderDataset
from difflab.data.images import tensor_to_pil, tensor_to_uint8, to_pil_grid, uint8_to_tensor
from difflab.data.mnist import MNISTDataset
from difflab.data.registry import build_dataset, dataset_names, default_data_dir, register_dataset
from difflab.data.shapes import ShapesDataset, ShapeSpec, caption, parse_caption, render_spec

__all__ = [
    "ArrayDataset",
    "CIFAR10Dataset",
    "DiffusionDataset",
    "DigitsDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "MNISTDataset",
    "ShapeSpec",
    "ShapesDataset",
    "build_dataset",
    "caption",
    "dataset_names",
    "default_data_dir",
    "make_item",
    "pad_collate",
    "stack_collate",
    "parse_caption",
    "register_dataset",
    "render_spec",
    "tensor_to_pil",
    "tensor_to_uint8",
    "to_pil_grid",
    "uint8_to_tensor",
]
