"""ShapesCLIP: a small CLIP trained offline on the built-in captioned shapes, for CLIPScore without downloads.

Image side: a small CNN (three stride-2 stages) and a linear projection. Text side: the frozen
pooled embedding of difflab's text encoder (MiniLM by default; each caption encoded once) and a
trainable two-layer projection. Trained with CLIP's symmetric InfoNCE loss and learnable temperature
(Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"):

    L = (CE(s * I T^T, Y) + CE(s * T I^T, Y)) / 2,   I, T unit rows,  s = exp(logit_scale) <= 100,

where the target ``Y`` spreads each row uniformly over the batch items that share its caption
(identical captions are not negatives). Scores from it are "ShapesCLIP CLIPScore": comparable only
between runs that use the same model folder, never with CLIPScores from OpenAI CLIP.

Example:
    >>> model = train_shapes_clip(resolution=32)            # doctest: +SKIP
    >>> model.report["retrieval_top1"]                       # doctest: +SKIP
    >>> model.save_pretrained("models/shapes_clip")          # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.data.shapes import ShapesDataset
from difflab.errors import UserError
from difflab.io.configs import JsonConfig
from difflab.io.model_folder import PretrainedModel
from difflab.io.registry import register_network
from difflab.nets.text_encoder import CachedTextEncoder, load_text_encoder

__all__ = ["ShapesCLIP", "contrastive_loss", "retrieval_accuracy", "train_shapes_clip"]

EMA_DECAY = 0.99  # with the warm-up, stands in for v1's one-cycle learning-rate decay


@dataclass
class ShapesCLIPConfig(JsonConfig):
    """Shape of a :class:`ShapesCLIP`; ``text_encoder`` is the text-encoder spec, ``text_dim`` its pooled width
    (``None``: that of the encoder)."""

    resolution: int = 32
    width: int = 16
    embed_dim: int = 64
    text_encoder: str | dict[str, Any] = "minilm"
    text_dim: int | None = None


@register_network
class ShapesCLIP(PretrainedModel, nn.Module):
    """Image CNN + projection of frozen text-encoder pooled vectors into one ``embed_dim`` space.

    Built from a :class:`ShapesCLIPConfig` or, as before, from its fields (``ShapesCLIP(32, width=16)``).
    ``report`` (held-out retrieval accuracy) is saved along with it.
    """

    config_class = ShapesCLIPConfig
    description = "a ShapesCLIP (write one with train_shapes_clip(...).save_pretrained(DIR))"

    def __init__(self, resolution: ShapesCLIPConfig | int = 32, width: int = 16, embed_dim: int = 64,
                 text_encoder: str | dict[str, Any] = "minilm", text_dim: int | None = None) -> None:
        super().__init__()
        config = resolution if isinstance(resolution, ShapesCLIPConfig) else \
            ShapesCLIPConfig(int(resolution), width, embed_dim, text_encoder, text_dim)
        self.config = config
        self._text = CachedTextEncoder(load_text_encoder(config.text_encoder))
        config.text_encoder = self._text.to_config()
        config.text_dim = text_dim = config.text_dim or self._text.pooled_dim
        width, embed_dim, resolution = config.width, config.embed_dim, config.resolution
        layers: list[nn.Module] = []
        cin = 3
        for cout in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, stride=2, padding=1), nn.SiLU()]
            cin = cout
        self.image_net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * (resolution // 8) ** 2, embed_dim))
        self.text_proj = nn.Sequential(nn.Linear(text_dim, 2 * embed_dim), nn.SiLU(), nn.Linear(2 * embed_dim, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def report(self) -> dict[str, Any]:
        """Held-out evaluation of the training run (kept in ``extra_config["report"]``)."""
        return self.extra_config.setdefault("report", {})

    @report.setter
    def report(self, value: dict[str, Any]) -> None:
        self.extra_config["report"] = dict(value)

    @property
    def resolution(self) -> int:
        return int(self.config.resolution)

    def encode_images(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W)`` in [-1, 1] (resized to ``resolution`` with antialiased bilinear if needed) -> ``(N, D)``."""
        x = x.to(self.logit_scale.device, torch.float32)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return self.image_net(x)

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """Frozen pooled text-encoder vectors ``(N, text_dim)`` (cached per prompt)."""
        return self._text.encode(list(prompts)).pooled.to(self.logit_scale.device, torch.float32)

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        return self.text_proj(self.text_features(prompts))


def contrastive_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, captions: Sequence[str]) -> Tensor:
    """Symmetric InfoNCE (Radford et al. 2021) with targets uniform over items sharing a caption (batch mean)."""
    from difflab.training.objectives.contrastive import contrastive_losses

    return contrastive_losses(image_emb, text_emb, logit_scale, captions).mean()


@torch.no_grad()
def retrieval_accuracy(model: ShapesCLIP, images: Tensor, captions: Sequence[str], group: int = 32) -> float:
    """Image -> caption top-1 accuracy within groups of ``group`` images with distinct captions.

    Only the first image of each caption is kept; chance is ``1 / group`` (less for a short last group).
    """
    first = list({c: k for k, c in reversed(list(enumerate(captions)))}.values())[::-1]
    if len(first) < 2:
        raise UserError("retrieval accuracy needs at least 2 distinct captions")
    hits = 0
    for s in range(0, len(first), group):
        idx = first[s:s + group]
        i = F.normalize(model.encode_images(images[idx]), dim=1)
        t = F.normalize(model.encode_text([captions[k] for k in idx]), dim=1)
        hits += int(((i @ t.T).argmax(1) == torch.arange(len(idx))).sum())
    return hits / len(first)


def train_shapes_clip(resolution: int = 32, steps: int = 400, seed: int = 0, *, num_images: int = 4000,
                      batch_size: int = 128, lr: float = 2e-3, width: int = 16, embed_dim: int = 64,
                      text_encoder: str | dict[str, Any] = "minilm", num_test: int = 1000,
                      num_threads: int | None = 1, progress: bool = True, out_dir: str | os.PathLike | None = None,
                      resume: bool = False) -> ShapesCLIP:
    """Train a ShapesCLIP on shapes of ``seed`` and store its held-out retrieval accuracy in ``model.report``.

    Test images come from ``seed + 1`` (disjoint draws); ``report["retrieval_top1"]`` is image -> caption
    top-1 accuracy among 32 distinct captions (chance 1/32), see :func:`retrieval_accuracy`.
    ``num_threads``: torch intra-op threads while training (restored after); these convolutions are too
    small to gain from threads, and on a busy 2-core machine 2 threads ran ~15x slower than 1.
    One :class:`~difflab.training.Trainer` run (AdamW, weight decay 0.01, warm-up over the first quarter,
    the EMA of the weights is returned); checkpoints go to ``out_dir`` (default: a temporary folder), and
    ``resume`` continues the run there.
    """
    from difflab.training.runs import torch_threads

    with torch_threads(num_threads):
        torch.manual_seed(seed)
        model = ShapesCLIP(resolution, width, embed_dim, text_encoder)
        train = ShapesDataset(num_images, resolution, seed=seed)
        model, loss = _train(model, train, steps, batch_size, lr, seed, progress, out_dir, resume)
        test = ShapesDataset(num_test, resolution, seed=seed + 1)
        model.report = {"retrieval_top1": retrieval_accuracy(model, test.images(), list(test.captions)),
                        "retrieval_candidates": 32, "num_test_images": num_test, "test_seed": seed + 1,
                        "train_images": num_images, "steps": steps, "batch_size": batch_size, "seed": seed,
                        "final_loss": loss}
        return model


def _train(model: ShapesCLIP, train: ShapesDataset, steps: int, batch_size: int, lr: float, seed: int,
           progress: bool, out_dir: str | os.PathLike | None, resume: bool) -> tuple[ShapesCLIP, float]:
    """The trained (EMA) model and its last batch loss; the frozen text vectors are computed once per caption."""
    from difflab.data.tensors import TensorDataset
    from difflab.training.objectives.contrastive import ContrastiveObjective
    from difflab.training.runs import fit_in_memory, run_config

    captions = list(train.captions)
    distinct = list(dict.fromkeys(captions))
    table = model.text_features(distinct).cpu()
    row = {c: k for k, c in enumerate(distinct)}
    data = TensorDataset(train.images(), {"caption": captions, "text": table[torch.tensor([row[c] for c in captions])]})
    config = run_config(seed=seed, steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.01,
                        warmup_steps=max(steps // 4, 1), ema_decay=EMA_DECAY,
                        data={"dataset": "shapes", "resolution": model.resolution, "num_images": len(train)},
                        model=model.config.to_dict())
    model, last = fit_in_memory(model, data, ContrastiveObjective(), config, out_dir, resume=resume, progress=progress,
                                what="a ShapesCLIP run")
    return model, float(last.get("loss", math.nan))  # the last step's batch loss
