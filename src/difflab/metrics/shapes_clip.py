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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from difflab.data.shapes import ShapesDataset
from difflab.errors import UserError
from difflab.nets.text_encoder import CachedTextEncoder, load_text_encoder
from difflab.pipelines.model_dir import load_weights, read_model_dir, save_model_dir

__all__ = ["ShapesCLIP", "contrastive_loss", "retrieval_accuracy", "train_shapes_clip"]

KIND = "shapes_clip"
MAX_LOGIT_SCALE = math.log(100.0)  # Radford et al. clip the temperature at 100


class ShapesCLIP(nn.Module):
    """Image CNN + projection of frozen text-encoder pooled vectors into one ``embed_dim`` space."""

    def __init__(self, resolution: int = 32, width: int = 16, embed_dim: int = 64,
                 text_encoder: str | dict[str, Any] = "minilm", text_dim: int | None = None) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"resolution": resolution, "width": width, "embed_dim": embed_dim}
        self._text = CachedTextEncoder(load_text_encoder(text_encoder))
        self.config["text_encoder"] = self._text.to_config()
        text_dim = text_dim or self._text.pooled_dim
        self.config["text_dim"] = text_dim
        layers: list[nn.Module] = []
        cin = 3
        for cout in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, stride=2, padding=1), nn.SiLU()]
            cin = cout
        self.image_net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * (resolution // 8) ** 2, embed_dim))
        self.text_proj = nn.Sequential(nn.Linear(text_dim, 2 * embed_dim), nn.SiLU(), nn.Linear(2 * embed_dim, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.report: dict[str, Any] = {}

    @property
    def resolution(self) -> int:
        return int(self.config["resolution"])

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

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` (architecture, text-encoder spec, report) and ``model.safetensors``."""
        save_model_dir(Path(path), {"kind": KIND, **self.config, "report": self.report}, self)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ShapesCLIP:
        """Read a folder written by :meth:`save_pretrained`."""
        config, weights = read_model_dir(Path(path))
        if config.get("kind") != KIND:
            raise UserError(f"{path} holds a {config.get('kind')!r} model, not a ShapesCLIP; "
                            "write one with train_shapes_clip(...).save_pretrained(DIR)")
        model = cls(config["resolution"], config["width"], config["embed_dim"], config["text_encoder"],
                    config["text_dim"])
        load_weights(model, weights, Path(path))
        model.report = config.get("report", {})
        return model.eval()


def contrastive_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, captions: Sequence[str]) -> Tensor:
    """Symmetric InfoNCE (Radford et al. 2021) with targets uniform over items sharing a caption."""
    i, t = F.normalize(image_emb, dim=1), F.normalize(text_emb, dim=1)
    logits = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * i @ t.T
    index = {c: k for k, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[c] for c in captions], device=logits.device)
    same = (ids[:, None] == ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


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
                      num_threads: int | None = 1, progress: bool = True) -> ShapesCLIP:
    """Train a ShapesCLIP on shapes of ``seed`` and store its held-out retrieval accuracy in ``model.report``.

    Test images come from ``seed + 1`` (disjoint draws); ``report["retrieval_top1"]`` is image -> caption
    top-1 accuracy among 32 distinct captions (chance 1/32), see :func:`retrieval_accuracy`.
    ``num_threads``: torch intra-op threads while training (restored after); these convolutions are too
    small to gain from threads, and on a busy 2-core machine 2 threads ran ~15x slower than 1.
    """
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        torch.manual_seed(seed)
        model = ShapesCLIP(resolution, width, embed_dim, text_encoder)
        train = ShapesDataset(num_images, resolution, seed=seed)
        loss = _train(model, train.images(), list(train.captions), steps, batch_size, lr, seed, progress)
        test = ShapesDataset(num_test, resolution, seed=seed + 1)
        model.report = {"retrieval_top1": retrieval_accuracy(model, test.images(), list(test.captions)),
                        "retrieval_candidates": 32, "num_test_images": num_test, "test_seed": seed + 1,
                        "train_images": num_images, "steps": steps, "batch_size": batch_size, "seed": seed,
                        "final_loss": loss}
        return model
    finally:
        torch.set_num_threads(previous)


def _train(model: ShapesCLIP, x: Tensor, captions: list[str], steps: int, batch_size: int, lr: float,
           seed: int, progress: bool) -> float:
    """AdamW + one-cycle schedule on random batches; the frozen text vectors are computed once per caption."""
    distinct = list(dict.fromkeys(captions))
    table = model.text_features(distinct)
    row = {c: k for k, c in enumerate(distinct)}
    caption_ids = torch.tensor([row[c] for c in captions])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.zeros(())
    for _ in tqdm(range(steps), desc="shapes CLIP", disable=not progress):
        idx = torch.randperm(len(x), generator=g)[:batch_size]
        text_emb = model.text_proj(table[caption_ids[idx]])
        loss = contrastive_loss(model.encode_images(x[idx]), text_emb, model.logit_scale,
                                [captions[k] for k in idx.tolist()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())
