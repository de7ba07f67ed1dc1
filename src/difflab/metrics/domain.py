"""Domain features for small greyscale datasets (28x28 digits), where Inception-v3 is a poor judge.

ImageNet features say little about 28x28 digits, so difflab trains a small CNN classifier on the dataset
itself (default: MNIST test images 0-7999; 8000-9999 are held out to report accuracy). Its 128-d
penultimate activations give a **domain FID** and its 10 logits a **domain IS**: the same formulas as
FID/IS (Heusel et al. 2017; Salimans et al. 2016) in another feature space. The numbers are comparable
only between runs that use the same classifier file, never with published FID/IS, and every output labels
them as such.

Protocol: images are quantised to uint8 (see ``preprocess``), converted to grey with PIL's ITU-R 601-2
luma (``L = 0.299 R + 0.587 G + 0.114 B``), resized to 28x28 with PIL bicubic on float32 if needed,
clipped to [0, 255] and scaled to [0, 1]. Saved as a difflab model folder (docs/model_folders.md).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from difflab.data.mnist import find_idx_file, read_idx
from difflab.errors import UserError
from difflab.io.configs import JsonConfig
from difflab.io.model_folder import PretrainedModel
from difflab.io.registry import register_network
from difflab.metrics.preprocess import resize_bicubic


@dataclass
class DigitClassifierConfig(JsonConfig):
    """Architecture and provenance of a domain classifier (written to ``config.json``)."""

    image_size: int = 28
    num_classes: int = 10
    channels: tuple[int, int] = (16, 32)
    feature_dim: int = 128
    dataset: str = "mnist-test[0:8000]"
    heldout_accuracy: float | None = None


@register_network
class DigitClassifier(PretrainedModel, nn.Module):
    """conv3x3-ReLU-pool x2 -> 128-d ReLU features -> logits. ``forward`` returns ``(features, logits)``.

    Saved and loaded by ``save_pretrained`` / ``from_pretrained`` (docs/model_folders.md).
    """

    config_class = DigitClassifierConfig
    description = "a digit classifier (train one with difflab.metrics.domain.train_digit_classifier)"

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
                           dataset: str = "mnist-test[0:8000]", num_threads: int | None = 1,
                           out_dir: str | os.PathLike | None = None, resume: bool = False,
                           progress: bool = False) -> DigitClassifier:
    """Train ``DigitClassifier`` with Adam on all but the last ``heldout`` images (seconds on one CPU core).

    ``images``: uint8 (N, 28, 28). The held-out accuracy is stored in the config. ``num_threads``: torch
    intra-op threads while training (restored after); these convolutions are too small to gain from
    threads, and on a busy machine 2 threads ran 8x slower than 1 (``None`` keeps the current setting).
    One :class:`~difflab.training.Trainer` run of ``ceil(epochs * (N - heldout) / batch_size)`` steps;
    checkpoints go to ``out_dir`` (default: a temporary folder), and ``resume`` continues the run there.
    """
    from difflab.training.runs import torch_threads

    if images.ndim != 3 or len(images) != len(labels) or len(images) <= heldout:
        raise UserError(f"need uint8 images (N, H, W) with N labels and N > heldout={heldout}, got "
                        f"{images.shape} images and {len(labels)} labels")
    with torch_threads(num_threads):
        return _train(images, labels, heldout, epochs, batch_size, lr, seed, dataset, out_dir, resume, progress)


def _train(images: np.ndarray, labels: np.ndarray, heldout: int, epochs: int, batch_size: int, lr: float,
           seed: int, dataset: str, out_dir: str | os.PathLike | None, resume: bool, progress: bool) -> DigitClassifier:
    from difflab.data.tensors import TensorDataset
    from difflab.training.objectives.cross_entropy import CrossEntropyObjective
    from difflab.training.runs import fit_in_memory, run_config

    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    y = torch.from_numpy(np.asarray(labels, np.int64))
    n_train = len(x) - heldout
    steps = math.ceil(epochs * n_train / batch_size)
    config = run_config(seed=seed, steps=steps, batch_size=batch_size, lr=lr,
                        data={"dataset": dataset, "num_images": n_train, "resolution": int(images.shape[1])})
    torch.manual_seed(seed)
    model = DigitClassifier(DigitClassifierConfig(image_size=images.shape[1], dataset=dataset,
                                                  num_classes=int(y.max()) + 1))
    data = TensorDataset(x[:n_train], {"label": y[:n_train]})
    model, _ = fit_in_memory(model, data, CrossEntropyObjective(), config, out_dir, resume=resume, progress=progress,
                             what="a domain-classifier run")
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
