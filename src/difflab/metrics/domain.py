"""Domain features for small greyscale datasets (28x28 digits), where Inception-v3 is a poor judge.

ImageNet features say little about 28x28 digits, so difflab trains a small CNN classifier on the dataset
itself (default: MNIST test images 0-7999; 8000-9999 are held out to report accuracy). Its 128-d
penultimate activations give a **domain FID** and its 10 logits a **domain IS**: the same formulas as
FID/IS (Heusel et al. 2017; Salimans et al. 2016) in another feature space. The numbers are comparable
only between runs that use the same classifier file, never with published FID/IS, and every output labels
them as such.

Protocol: images are quantised to uint8 (see ``preprocess``), converted to grey with PIL's ITU-R 601-2
luma (``L = 0.299 R + 0.587 G + 0.114 B``), resized to 28x28 with PIL bicubic on float32 if needed,
clipped to [0, 255] and scaled to [0, 1]. Saved as ``config.json`` plus ``model.safetensors``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from difflab.data.mnist import find_idx_file, read_idx
from difflab.errors import UserError
from difflab.metrics.preprocess import resize_bicubic


@dataclass
class DigitClassifierConfig:
    """Architecture and provenance of a domain classifier (written to ``config.json``)."""

    image_size: int = 28
    num_classes: int = 10
    channels: tuple[int, int] = (16, 32)
    feature_dim: int = 128
    dataset: str = "mnist-test[0:8000]"
    heldout_accuracy: float | None = None


class DigitClassifier(nn.Module):
    """conv3x3-ReLU-pool x2 -> 128-d ReLU features -> logits. ``forward`` returns ``(features, logits)``."""

    def __init__(self, config: DigitClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or DigitClassifierConfig()
        c1, c2 = self.config.channels
        side = self.config.image_size // 4
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.hidden = nn.Linear(c2 * side * side, self.config.feature_dim)
        self.head = nn.Linear(self.config.feature_dim, self.config.num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        features = F.relu(self.hidden(x.flatten(1)))
        return features, self.head(features)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> DigitClassifier:
        """Load a classifier written by ``save_pretrained``."""
        src = Path(directory)
        if not (src / "config.json").is_file() or not (src / "model.safetensors").is_file():
            raise UserError(f"{str(src)!r} has no config.json + model.safetensors; train one with "
                            "difflab.metrics.domain.train_digit_classifier(...).save_pretrained(dir)")
        raw = json.loads((src / "config.json").read_text())
        raw["channels"] = tuple(raw["channels"])
        model = cls(DigitClassifierConfig(**raw))
        model.load_state_dict(load_file(str(src / "model.safetensors")))
        return model.eval()


def load_mnist(directory: str | os.PathLike, split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """MNIST images uint8 (N, 28, 28) and labels (N,) from the IDX files of ``split`` ("t10k" | "train")."""
    root = Path(directory)
    img_path, lab_path = find_idx_file(root, split, "images"), find_idx_file(root, split, "labels")
    if img_path is None or lab_path is None:
        raise UserError(f"MNIST files not found in {str(root)!r}; expected {split}-images-idx3-ubyte.gz and "
                        f"{split}-labels-idx1-ubyte.gz there")
    return read_idx(img_path).copy(), read_idx(lab_path).astype(np.int64)


def train_digit_classifier(images: np.ndarray, labels: np.ndarray, *, heldout: int = 2000, epochs: int = 2,
                           batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
                           dataset: str = "mnist-test[0:8000]", num_threads: int | None = 1) -> DigitClassifier:
    """Train ``DigitClassifier`` with Adam on all but the last ``heldout`` images (seconds on one CPU core).

    ``images``: uint8 (N, 28, 28). The held-out accuracy is stored in the config. ``num_threads``: torch
    intra-op threads while training (restored after); these convolutions are too small to gain from
    threads, and on a busy machine 2 threads ran 8x slower than 1 (``None`` keeps the current setting).
    """
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(images, labels, heldout, epochs, batch_size, lr, seed, dataset)
    finally:
        torch.set_num_threads(previous)


def _train(images: np.ndarray, labels: np.ndarray, heldout: int, epochs: int, batch_size: int, lr: float,
           seed: int, dataset: str) -> DigitClassifier:
    if images.ndim != 3 or len(images) != len(labels) or len(images) <= heldout:
        raise UserError(f"need uint8 images (N, H, W) with N labels and N > heldout={heldout}, got "
                        f"{images.shape} images and {len(labels)} labels")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    y = torch.from_numpy(np.asarray(labels, np.int64))
    n_train = len(x) - heldout
    model = DigitClassifier(DigitClassifierConfig(image_size=images.shape[1], dataset=dataset,
                                                  num_classes=int(y.max()) + 1))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(n_train, generator=gen).split(batch_size):
            loss = F.cross_entropy(model(x[idx])[1], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(x[n_train:])[1].argmax(1)
    model.config.heldout_accuracy = float((pred == y[n_train:]).float().mean())
    return model


class DomainExtractor:
    """Extractor (see ``features.Extractor``) over a ``DigitClassifier``: grey, 28x28, [0, 1]."""

    has_logits = True

    def __init__(self, model: DigitClassifier) -> None:
        self.model = model.eval()
        self.feature_dim = model.config.feature_dim
        self.name = f"domain-{model.config.dataset.split('[')[0]}-{model.config.feature_dim}d"

    def to_input(self, images: list[np.ndarray]) -> Tensor:
        """uint8 HxWxC images -> float (N, 1, S, S) in [0, 1] (grey by ITU-R 601-2 luma, bicubic resize)."""
        size = self.model.config.image_size
        grey = []
        for img in images:
            if img.ndim == 3 and img.shape[2] >= 3:
                img = np.asarray(Image.fromarray(np.ascontiguousarray(img[:, :, :3])).convert("L"))
            grey.append(resize_bicubic(img.reshape(img.shape[0], img.shape[1], 1), size)[:, :, 0])
        return torch.from_numpy(np.stack(grey) / 255.0).float()[:, None]

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> tuple[Tensor, Tensor | None]:
        return self.model(self.to_input(images))


def train_mnist_classifier(mnist_dir: str | os.PathLike, **kwargs: object) -> DigitClassifier:
    """Train the default domain classifier on MNIST test images 0-7999 (8000-9999 held out)."""
    images, labels = load_mnist(mnist_dir)
    return train_digit_classifier(images, labels, **kwargs)
