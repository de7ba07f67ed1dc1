"""CIFAR-10 from a user-given directory (no download), in either of two layouts.

1. The python pickle batches (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html):
   ``cifar-10-batches-py/data_batch_1`` .. ``data_batch_5`` (train) and ``test_batch`` (test), in
   ``data_dir`` or directly as ``data_dir``. Each is a dict with ``b"data"`` (N x 3072 uint8, each
   row the R, G, B planes of a 32x32 image) and ``b"labels"`` (N ints).
2. Images per class, ``<split>/<class>/NNNN.jpg``, either inside a ``.zip`` in ``data_dir`` (or
   ``data_dir`` itself a zip) or extracted under ``data_dir``. Items are ordered by class, then
   file name (not the pickle order).

Pickles can run code when loaded, so batches are read with an unpickler that only admits the
numpy array constructors a CIFAR batch needs.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from difflab.data.base import ArrayDataset, check_num_images
from difflab.data.transforms import check_size, resize_array
from difflab.errors import UserError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CAPTIONS = tuple(f"a photo of {'an' if c[0] in 'aeiou' else 'a'} {c}" for c in CLASSES)
NATIVE_RESOLUTION = 32
PICKLE_DIR = "cifar-10-batches-py"
PICKLE_FILES = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}
_IMAGE_RE = re.compile(r"(?:^|.*/)(train|test)/([a-z]+)/[^/]+\.(?:jpe?g|png)$", re.IGNORECASE)
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy's array reconstruction."""

    def find_class(self, module: str, name: str) -> type:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def read_pickle_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 batch file into uint8 images ``(N, 32, 32, 3)`` and int64 labels ``(N,)``."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"{path} is not a CIFAR-10 python batch ({err}); re-download cifar-10-python.tar.gz"
        ) from err
    side = NATIVE_RESOLUTION
    if data.ndim != 2 or data.shape[1] != 3 * side * side or len(labels) != len(data):
        raise UserError(f"{path}: expected data (N, 3072) and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1), labels


def _pickle_files(data_dir: Path, split: str) -> list[Path] | None:
    """The batch files of ``split`` if all are present (in data_dir/cifar-10-batches-py or data_dir)."""
    for folder in (data_dir / PICKLE_DIR, data_dir):
        paths = [folder / name for name in PICKLE_FILES[split]]
        if all(p.is_file() for p in paths):
            return paths
    return None


def _image_sources(data_dir: Path) -> list[Path]:
    """Zip archives to look into: data_dir itself if it is a zip, else the zips directly inside it."""
    if data_dir.is_file() and zipfile.is_zipfile(data_dir):
        return [data_dir]
    return sorted(data_dir.glob("*.zip")) if data_dir.is_dir() else []


def _label_of(name: str, source: Path) -> int:
    if name.lower() not in CLASSES:
        raise UserError(
            f"unknown CIFAR-10 class folder {name!r} in {source}; expected one of {', '.join(CLASSES)}"
        )
    return CLASSES.index(name.lower())


def _image_entries(data_dir: Path, split: str) -> list[tuple[int, str, Path]]:
    """(label, member name or path, archive or folder) of every ``split/<class>/*.jpg`` image found."""
    entries = []
    for archive in _image_sources(data_dir):
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                m = _IMAGE_RE.match(member)
                if m and m.group(1).lower() == split:
                    entries.append((_label_of(m.group(2), archive), member, archive))
    if not entries and (data_dir / split).is_dir():
        for path in (data_dir / split).glob("*/*"):
            m = _IMAGE_RE.match(path.relative_to(data_dir).as_posix())
            if m:
                entries.append((_label_of(m.group(2), data_dir), str(path), data_dir))
    return sorted(entries, key=lambda e: (e[0], Path(e[1]).name))


def _decode_entries(entries: list[tuple[int, str, Path]]) -> np.ndarray:
    """Decode image entries (zip members or files) to uint8 RGB ``(N, 32, 32, 3)``."""
    out = np.empty((len(entries), NATIVE_RESOLUTION, NATIVE_RESOLUTION, 3), dtype=np.uint8)
    archives: dict[Path, zipfile.ZipFile] = {}
    try:
        for k, (_, name, source) in enumerate(entries):
            if source.is_file():
                if source not in archives:
                    archives[source] = zipfile.ZipFile(source)
                data = io.BytesIO(archives[source].read(name))
            else:
                data = name
            with Image.open(data) as im:
                rgb = im.convert("RGB")
            if rgb.size != (NATIVE_RESOLUTION, NATIVE_RESOLUTION):
                raise UserError(f"{name} in {source} is {rgb.size[0]}x{rgb.size[1]}, CIFAR-10 images are 32x32")
            out[k] = np.asarray(rgb)
    except (OSError, zipfile.BadZipFile) as err:
        raise UserError(f"cannot decode CIFAR-10 image {name} in {source}: {err}; re-download the data") from err
    finally:
        for z in archives.values():
            z.close()
    return out


def _missing_error(data_dir: Path, splits: list[str]) -> UserError:
    wanted = " or ".join(f"{', '.join(PICKLE_FILES[s])} ({s})" for s in splits)
    layouts = " or ".join(f"{s}/<class>/*.jpg" for s in splits)
    return UserError(
        f"CIFAR-10 data not found in {data_dir}: expected {wanted} in {data_dir / PICKLE_DIR}, "
        f"or a .zip or folder there with {layouts}; extract cifar-10-python.tar.gz into {data_dir} "
        f"or pass data_dir=<folder holding it>"
    )


def load_cifar10(data_dir: Path, split: str, num_images: int | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Load images ``(N, 32, 32, 3)`` uint8, labels and the split found ("auto": train first)."""
    if split not in ("train", "test", "auto"):
        raise UserError(f"CIFAR-10 split must be 'train', 'test' or 'auto', got {split!r}")
    splits = ["train", "test"] if split == "auto" else [split]
    for name in splits:
        files = _pickle_files(data_dir, name) if data_dir.is_dir() else None
        if files:
            batches = [read_pickle_batch(p) for p in files]
            images = np.concatenate([b[0] for b in batches])
            labels = np.concatenate([b[1] for b in batches])
            n = check_num_images(num_images, len(labels), f"CIFAR-10 {name} in {data_dir}")
            return images[:n], labels[:n], name
        entries = _image_entries(data_dir, name)
        if entries:
            n = check_num_images(num_images, len(entries), f"CIFAR-10 {name} in {data_dir}")
            entries = entries[:n]
            return _decode_entries(entries), np.array([e[0] for e in entries], dtype=np.int64), name
    raise _missing_error(data_dir, splits)


class CIFAR10Dataset(ArrayDataset):
    """CIFAR-10 from pickle batches or per-class JPEGs.

    3 channels, labels 0..9 in the standard class order, caption "a photo of a(n) <class>".
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "auto",
        resolution: int | tuple[int, int] = NATIVE_RESOLUTION,
        num_images: int | None = None,
    ) -> None:
        resolution = check_size(resolution)
        images, labels, self.split = load_cifar10(Path(data_dir).expanduser(), split, num_images)
        if labels.min() < 0 or labels.max() >= len(CLASSES):
            raise UserError(
                f"CIFAR-10 labels must lie in 0..9, found {labels.min()}..{labels.max()} in {data_dir}"
            )
        super().__init__(
            resize_array(images, resolution),
            labels=labels,
            class_names=list(CLASSES),
            captions=[CAPTIONS[k] for k in labels.tolist()],
        )
