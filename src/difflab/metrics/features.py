"""Feature extractors and the streaming pass that turns an image stream into metric inputs.

An extractor maps a list of uint8 HxWxC images (any sizes, 1/3/4 channels) to ``(features, logits)``.
``extract_features`` runs it over a stream in batches, folding features into float64 running statistics
(FID) and keeping raw features / logits only when a metric needs them (precision/recall, IS).
Every image goes through the extractor on its own path (no batch statistics), so results do not depend
on the batch size beyond float32 rounding in the network.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from difflab.metrics.inception import FEATURE_DIM, FIDInceptionV3
from difflab.metrics.preprocess import ImageSource, batched, inception_input, iter_images
from difflab.metrics.stats import GaussianStats
from difflab.metrics.weights import find_inception_weights, load_fid_inception


class Extractor(Protocol):
    """What ``extract_features`` needs from a feature network."""

    name: str          # short id used in cache file names, e.g. "inception-v3-tf-2015-12-05"
    feature_dim: int
    has_logits: bool

    def __call__(self, images: list[np.ndarray]) -> tuple[Tensor, Tensor | None]: ...


class InceptionExtractor:
    """TF 2015-12-05 Inception-v3 (pool3 2048-d features, 1008 logits) on the clean-fid resize protocol."""

    name = "inception-v3-tf-2015-12-05"
    feature_dim = FEATURE_DIM
    input_size = 299

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 model: FIDInceptionV3 | None = None) -> None:
        """Load the weights (see ``weights.find_inception_weights``), or wrap an already loaded ``model``."""
        self.weights_path = find_inception_weights(weights) if model is None else None
        self.device = torch.device(device)
        self.model = (model or load_fid_inception(self.weights_path)).to(self.device).eval()
        self.has_logits = self.model.has_logits

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> tuple[Tensor, Tensor | None]:
        features, logits = self.model(inception_input(images, self.input_size).to(self.device))
        return features.cpu(), (logits.cpu() if logits is not None else None)


@dataclass
class FeatureSet:
    """Result of one pass over an image stream with one extractor."""

    extractor: str
    count: int
    stats: GaussianStats
    features: np.ndarray | None = None      # float32 (first ``keep_features`` images)
    logits: np.ndarray | None = None        # float32 (all images) when requested
    sizes: dict[str, int] = field(default_factory=dict)     # "HxW" -> number of images
    channels: dict[int, int] = field(default_factory=dict)  # channel count -> number of images


def _describe(batch: list[np.ndarray], sizes: Counter, channels: Counter) -> None:
    for img in batch:
        sizes[f"{img.shape[0]}x{img.shape[1]}"] += 1
        channels[1 if img.ndim == 2 else img.shape[2]] += 1


def extract_features(source: ImageSource, extractors: Sequence[Extractor], *, batch_size: int = 50,
                     value_range: tuple[float, float] = (0.0, 1.0), keep_features: int = 0,
                     keep_logits: bool = False, progress: bool = True,
                     desc: str = "features") -> list[FeatureSet]:
    """Stream ``source`` once through every extractor in batches; one ``FeatureSet`` per extractor.

    ``keep_features``: how many raw feature rows to keep (for precision/recall/density/coverage).
    ``keep_logits``: keep all logits (for the Inception Score) where the extractor has them.
    """
    stats = [GaussianStats(ex.feature_dim) for ex in extractors]
    kept_features: list[list[np.ndarray]] = [[] for _ in extractors]
    kept_logits: list[list[np.ndarray]] = [[] for _ in extractors]
    sizes: Counter = Counter()
    channels: Counter = Counter()
    seen = 0
    bar = tqdm(desc=desc, unit="img", disable=not progress)
    for batch in batched(iter_images(source, value_range), batch_size):
        _describe(batch, sizes, channels)
        for i, ex in enumerate(extractors):
            features, logits = ex(batch)
            stats[i].update(features)
            if seen < keep_features:
                kept_features[i].append(features[: keep_features - seen].numpy().astype(np.float32))
            if keep_logits and logits is not None:
                kept_logits[i].append(logits.numpy().astype(np.float32))
        seen += len(batch)
        bar.update(len(batch))
    bar.close()
    return [FeatureSet(extractor=ex.name, count=stats[i].count, stats=stats[i],
                       features=np.concatenate(kept_features[i]) if kept_features[i] else None,
                       logits=np.concatenate(kept_logits[i]) if kept_logits[i] else None,
                       sizes=dict(sizes), channels=dict(channels))
            for i, ex in enumerate(extractors)]
