"""Datasets: built-in captioned shapes and digits, image folders, MNIST and CIFAR-10 from disk.

Every dataset yields ``{"image": (C,H,W) float in [-1,1], "label": int (-1 if none),
"caption": str ("" if none)}`` and exposes ``channels``, ``resolution``, ``num_classes``,
``class_names`` and ``len``. Use :func:`build_dataset` to get one by name.
"""

from difflab.data.base import ArrayDataset, ImageDataset
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
    "parse_caption",
    "register_dataset",
    "render_spec",
    "tensor_to_pil",
    "tensor_to_uint8",
    "to_pil_grid",
    "uint8_to_tensor",
]
