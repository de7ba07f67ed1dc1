"""MNIST from the standard IDX files in a user-given directory (no download).

Expected files (gzip or raw), in ``data_dir`` or its ``raw/`` or ``MNIST/raw/`` subfolder:
``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]`` (split "train") and
``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]`` (split "test").

IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code
(0x08 = uint8), the number of dimensions d, then d big-endian uint32 sizes, then the data.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from difflab.data.base import ArrayDataset, check_num_images
from difflab.data.transforms import check_size, resize_array
from difflab.errors import UserError

NATIVE_RESOLUTION = 28
PREFIXES = {"train": "train", "test": "t10k"}
_SUBDIRS = (".", "raw", "MNIST/raw")


def _candidates(data_dir: Path, prefix: str, kind: str) -> list[Path]:
    """Every path where the IDX file for ``prefix`` (train|t10k) and ``kind`` may lie."""
    ndim = 3 if kind == "images" else 1
    names = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
    return [data_dir / sub / (name + gz) for sub in _SUBDIRS for name in names for gz in (".gz", "")]


def find_idx_file(data_dir: Path, prefix: str, kind: str) -> Path | None:
    """The first existing IDX file for ``prefix`` and ``kind`` ("images" | "labels"), or None."""
    return next((p for p in _candidates(data_dir, prefix, kind) if p.is_file()), None)


def read_idx(path: Path) -> np.ndarray:
    """Read a uint8 IDX file (optionally gzip-compressed) into an array of its stated shape."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise UserError(f"cannot read MNIST file {path}: {err}; re-download it") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not a uint8 IDX file (bad magic number); re-download it")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(data) != offset + int(np.prod(shape)):
        raise UserError(
            f"{path} holds {len(data) - offset} bytes of data, its header says {shape}; re-download it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _resolve_split(data_dir: Path, split: str) -> str:
    """Pick the split: "train"/"test" as asked, or for "auto" whichever is present (train first)."""
    if split not in ("train", "test", "auto"):
        raise UserError(f"MNIST split must be 'train', 'test' or 'auto', got {split!r}")
    order = ["train", "test"] if split == "auto" else [split]
    for name in order:
        prefix = PREFIXES[name]
        if find_idx_file(data_dir, prefix, "images") and find_idx_file(data_dir, prefix, "labels"):
            return name
    wanted = " or ".join(
        f"{PREFIXES[s]}-images-idx3-ubyte[.gz] + {PREFIXES[s]}-labels-idx1-ubyte[.gz]" for s in order
    )
    raise UserError(
        f"MNIST files not found in {data_dir} (or its raw/ or MNIST/raw/ subfolders): expected {wanted}; "
        f"download them there or pass data_dir=<folder holding them>"
    )


class MNISTDataset(ArrayDataset):
    """MNIST digits from IDX files; 1 channel, labels 0..9, caption "a handwritten digit N".

    ``resolution`` defaults to the native 28; other sizes are bilinear resizes.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "auto",
        resolution: int | tuple[int, int] = NATIVE_RESOLUTION,
        num_images: int | None = None,
    ) -> None:
        data_dir = Path(data_dir).expanduser()
        resolution = check_size(resolution)
        self.split = _resolve_split(data_dir, split)
        prefix = PREFIXES[self.split]
        image_path = find_idx_file(data_dir, prefix, "images")
        label_path = find_idx_file(data_dir, prefix, "labels")
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(
                f"{image_path} has shape {images.shape} and {label_path} has {labels.shape}: they do not "
                f"match (expected (N, 28, 28) and (N,)); re-download both"
            )
        n = check_num_images(num_images, len(labels), f"MNIST {self.split} in {data_dir}")
        super().__init__(
            resize_array(images[:n, :, :, None], resolution),
            labels=labels[:n],
            class_names=[str(d) for d in range(10)],
            caption_template="a handwritten digit {name}",
        )
