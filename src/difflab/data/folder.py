"""Any folder of images (PNG/JPEG, searched recursively), resized and centre-cropped to a square.

Every image is decoded once up front, so unreadable or truncated files are found before
training starts: they are skipped with one warning listing them. When the decoded set is
small (estimated under ``max_cache_bytes``) it is kept in memory; otherwise images are decoded
again on access. With ``labels=True`` the first-level subfolder of each image is its class.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from difflab.data.base import ArrayDataset, ImageDataset, Item, check_num_images, image_item
from difflab.data.images import uint8_to_tensor
from difflab.data.transforms import check_size, pil_mode, pil_to_array
from difflab.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DEFAULT_MAX_CACHE_BYTES = 2 * 1024**3
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def find_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, extensions case-insensitive), sorted by path."""
    if not root.exists():
        raise UserError(f"image folder {root} does not exist; pass the path of a folder of PNG/JPEG images")
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; pass the folder that contains the images, not a file")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise UserError(
            f"no images (.png, .jpg, .jpeg) found under {root}; put images there or pass another folder"
        )
    return paths


def load_image(path: Path, resolution: int | tuple[int, int], channels: int) -> np.ndarray:
    """Decode one image file to uint8 ``(R, R, C)`` (resized shorter side, centre-cropped)."""
    with Image.open(path) as image:
        image.load()
        return pil_to_array(image, resolution, channels)


def _class_names(root: Path, paths: list[Path]) -> list[str]:
    """Sorted first-level subfolder names; every image must sit inside one."""
    loose = [p for p in paths if p.parent == root]
    if loose:
        raise UserError(
            f"labels=True needs every image in a class subfolder of {root}, but {loose[0]} is not "
            f"({len(loose)} such images); move them into subfolders or pass labels=False"
        )
    return sorted({p.relative_to(root).parts[0] for p in paths})


class ImageFolderDataset(ImageDataset):
    """Images found under ``root``; RGB (``channels=3``) or greyscale (``channels=1``)."""

    def __init__(
        self,
        root: str | Path,
        resolution: int | tuple[int, int] = 32,
        *,
        channels: int = 3,
        labels: bool = False,
        num_images: int | None = None,
        max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
    ) -> None:
        self.root = Path(root).expanduser()
        self.size = check_size(resolution)
        pil_mode(channels)  # validates
        self.sample_shape = (channels, *self.size)
        paths = find_images(self.root)
        self.class_names = _class_names(self.root, paths) if labels else None
        wanted = check_num_images(num_images, len(paths), f"image folder {self.root}")
        keep = wanted * self.size[0] * self.size[1] * channels <= max_cache_bytes
        self.paths, arrays = self._scan(paths, wanted, keep)
        self._cache = ArrayDataset(np.stack(arrays)) if keep else None
        if self.class_names is None:
            self.labels = None
        else:
            first = [p.relative_to(self.root).parts[0] for p in self.paths]
            self.labels = np.array([self.class_names.index(f) for f in first], dtype=np.int64)

    def _scan(self, paths: list[Path], wanted: int, keep: bool) -> tuple[list[Path], list[np.ndarray]]:
        """Decode images in order until ``wanted`` are good, keeping arrays if ``keep``; warn once about bad ones."""
        good: list[Path] = []
        arrays: list[np.ndarray] = []
        bad: list[str] = []
        for path in paths:
            if len(good) == wanted:
                break
            try:
                pixels = load_image(path, self.size, self.channels)
            except _DECODE_ERRORS as err:
                bad.append(f"{path} ({type(err).__name__})")
                continue
            good.append(path)
            if keep:
                arrays.append(pixels)
        if not good:
            raise UserError(
                f"none of the {len(bad)} image files under {self.root} could be decoded "
                f"(first: {bad[0]}); check the files or pass another folder"
            )
        if bad:
            warnings.warn(
                f"skipped {len(bad)} unreadable image(s) under {self.root}: {'; '.join(bad)}",
                stacklevel=3,
            )
        return good, arrays

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        index = index % len(self)
        label = -1 if self.labels is None else int(self.labels[index])
        if self._cache is not None:
            image = self._cache[index]["x"]
        else:
            pixels = load_image(self.paths[index], self.size, self.channels)
            image = uint8_to_tensor(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        return image_item(image, label, "")
