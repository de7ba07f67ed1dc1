"""CLIPScore: how well each image matches its prompt, as the cosine of CLIP image and text embeddings.

Hessel et al. 2021 ("CLIPScore: A Reference-free Evaluation Metric for Image Captioning") define
``CLIP-S(c, v) = w * max(cos(E_c, E_v), 0)`` with ``w = 2.5``. difflab reports
``CLIPScore = 100 * max(cos(E_img, E_txt), 0)`` (the ``w = 100`` scale used by text-to-image papers and
torchmetrics); divide by 40 for the paper's CLIP-S. A zero embedding has cosine 0 by convention.

``model`` is anything with ``encode_images(x) -> (N, D)`` (``x`` float ``(N, 3, H, W)`` in [-1, 1]) and
``encode_text(prompts) -> (N, D)``: :class:`HFCLIP` for a local transformers CLIP folder,
:class:`OpenCLIP` for an open_clip checkpoint (optional package), or difflab's
:class:`~difflab.metrics.shapes_clip.ShapesCLIP` trained offline on the built-in shapes.

Example:
    >>> model = load_clip("models/clip-vit-base-patch32")          # doctest: +SKIP
    >>> clip_score(images, prompts, model)["mean"]                 # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from difflab.errors import UserError
from difflab.metrics.preprocess import quantize, resize_bicubic
from difflab.nets.text_base import check_prompts

__all__ = ["HFCLIP", "LABEL", "CLIPLike", "OpenCLIP", "clip_score", "cosine_scores", "load_clip"]

LABEL = "CLIPScore (Hessel et al. 2021) = 100 * max(cos(E_img, E_txt), 0); the paper's CLIP-S = 2.5 * max(cos, 0)"
# OpenAI CLIP's normalisation (used when a model folder has no preprocessor_config.json).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@runtime_checkable
class CLIPLike(Protocol):
    """A joint image-text embedding model."""

    def encode_images(self, x: Tensor) -> Tensor:
        """Float ``(N, 3, H, W)`` in [-1, 1] -> ``(N, D)``."""

    def encode_text(self, prompts: list[str]) -> Tensor:
        """``N`` prompts -> ``(N, D)``."""


def cosine_scores(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """``100 * max(cos(a_i, b_i), 0)`` row by row in float64; a zero row gives 0."""
    a, b = image_emb.double(), text_emb.double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=torch.finfo(torch.float64).tiny)
    return 100.0 * cos.clamp(min=0.0)


def _as_float_images(images: Any) -> Tensor | list[Tensor]:
    """Tensor (N, C, H, W) float in [-1, 1] or uint8, or a list of PIL images / uint8 arrays -> float (N, 3, H, W)."""
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise UserError(f"images tensor has shape {tuple(images.shape)}; expected (N, C, H, W) in [-1, 1]")
        x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[1] == 1:
            return x.repeat(1, 3, 1, 1)
        if x.shape[1] in (3, 4):
            return x[:, :3]
        raise UserError(f"images have {x.shape[1]} channels; CLIPScore takes 1, 3 or 4 channels")
    out = []
    for im in images:
        arr = np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else np.asarray(im)
        if arr.dtype != np.uint8:
            raise UserError(f"image arrays must be uint8 HxWxC, got {arr.dtype}; pass floats as one tensor in [-1, 1]")
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        out.append(_as_float_images(torch.from_numpy(arr.copy()).permute(2, 0, 1)[None])[0])
    if not out:
        raise UserError("no images given; pass a tensor (N, C, H, W) or a list of PIL images")
    return out  # (3, H, W) each; sizes may differ


def _batches(images: Tensor | list[Tensor], batch_size: int) -> Iterator[tuple[int, int, Tensor]]:
    """Consecutive runs of at most ``batch_size`` same-sized images: ``(start, stop, batch)``."""
    n, start = len(images), 0
    while start < n:
        stop = start + 1
        while stop < n and stop - start < batch_size and images[stop].shape == images[start].shape:
            stop += 1
        chunk = images[start:stop]
        yield start, stop, chunk if isinstance(chunk, Tensor) else torch.stack(chunk)
        start = stop


@torch.no_grad()
def clip_score(images: Tensor | Sequence[Any], prompts: Sequence[str], model: CLIPLike, *,
               batch_size: int = 64) -> dict[str, Any]:
    """Mean, population std (ddof 0) and per-image ``100 * max(cos(E_img, E_txt), 0)`` (Hessel et al. 2021).

    ``images``: float tensor ``(N, C, H, W)`` in [-1, 1], a uint8 tensor, or a list of PIL images / uint8
    HxWxC arrays (any sizes); ``prompts``: one string per image. Scores do not depend on ``batch_size``.
    """
    prompts = check_prompts(prompts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(model, CLIPLike):
        raise UserError(f"model {type(model).__name__} lacks encode_images/encode_text; use load_clip(DIR)")
    x = _as_float_images(images)
    if len(x) != len(prompts):
        raise UserError(f"got {len(x)} images but {len(prompts)} prompts; pass exactly one prompt per image")
    scores = torch.empty(len(x), dtype=torch.float64)
    for start, stop, batch in _batches(x, batch_size):
        scores[start:stop] = cosine_scores(model.encode_images(batch), model.encode_text(prompts[start:stop]))
    return {"mean": scores.mean().item(), "std": scores.std(correction=0).item(), "per_image": scores.tolist(),
            "num_images": len(x), "label": LABEL}


def clip_pixels(x: Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """[-1, 1] images -> CLIP input: uint8 quantisation, centre square crop, PIL bicubic resize to ``size``
    (float32 planes, as the metrics protocol), scale to [0, 1], then ``(x - mean) / std``."""
    out = []
    for img in quantize(x, (-1.0, 1.0)).transpose(0, 2, 3, 1):
        h, w = img.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        out.append(resize_bicubic(np.ascontiguousarray(img[top:top + side, left:left + side]), size) / 255.0)
    pixels = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class HFCLIP:
    """A transformers ``CLIPModel`` from a local folder (``save_pretrained`` output with its tokenizer).

    Images: :func:`clip_pixels` to ``vision_config.image_size`` with the mean/std of the folder's
    ``preprocessor_config.json`` (OpenAI's when absent). Text: the folder's tokenizer, padded and
    truncated to the model's positions; embeddings are ``get_image_features`` / ``get_text_features``.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu") -> None:
        import transformers

        self.path = _check_dir(path)
        self.model = transformers.CLIPModel.from_pretrained(str(self.path)).to(device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.path))
        self.device = torch.device(device)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        proc = self.path / "preprocessor_config.json"
        cfg = json.loads(proc.read_text()) if proc.is_file() else {}
        self.mean = tuple(cfg.get("image_mean", OPENAI_MEAN))
        self.std = tuple(cfg.get("image_std", OPENAI_STD))

    @torch.no_grad()
    def encode_images(self, x: Tensor) -> Tensor:
        pixels = clip_pixels(x, self.image_size, self.mean, self.std).to(self.device)
        return _as_tensor(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        return _as_tensor(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                       attention_mask=tokens["attention_mask"]))


def _as_tensor(out: Any) -> Tensor:
    """Features as a tensor (some transformers versions wrap them in an output object)."""
    return out if isinstance(out, Tensor) else out.pooler_output


class OpenCLIP:
    """An open_clip model (optional package): ``OpenCLIP("ViT-B-32", "/path/weights.bin")``.

    Images go through :func:`clip_pixels` with the model's own ``image_size``, ``image_mean`` and ``image_std``.
    """

    def __init__(self, architecture: str, checkpoint: str | os.PathLike, device: str = "cpu") -> None:
        try:
            import open_clip
        except ImportError as err:
            raise UserError("OpenCLIP needs the open_clip_torch package (pip install open_clip_torch), "
                            "or save the model with transformers and use HFCLIP") from err
        if not Path(checkpoint).is_file():
            raise UserError(f"open_clip checkpoint {str(checkpoint)!r} does not exist; give a local weight file")
        self.model, _, _ = open_clip.create_model_and_transforms(architecture, pretrained=str(checkpoint),
                                                                 device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(architecture)
        self.device = torch.device(device)
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(getattr(self.model.visual, "image_mean", None) or OPENAI_MEAN)
        self.std = tuple(getattr(self.model.visual, "image_std", None) or OPENAI_STD)

    @torch.no_grad()
    def encode_images(self, x: Tensor) -> Tensor:
        return self.model.encode_image(clip_pixels(x, self.image_size, self.mean, self.std).to(self.device))

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(list(prompts)).to(self.device))


def _check_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"CLIP model directory {str(path)!r} does not exist; pass a local folder written by "
                        "transformers CLIPModel.save_pretrained (plus its tokenizer), or one saved by "
                        "train_shapes_clip(...).save_pretrained(DIR)")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json; point at the CLIP model folder itself")
    return path


def load_clip(path: str | os.PathLike, device: str = "cpu") -> CLIPLike:
    """A CLIP model from a local folder: difflab's ShapesCLIP or a transformers CLIP (by its config.json)."""
    folder = _check_dir(path)
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") == "ShapesCLIP" or config.get("kind") == "shapes_clip":  # v2, v1 folders
        from difflab.metrics.shapes_clip import ShapesCLIP

        return ShapesCLIP.from_pretrained(folder).to(device)
    if config.get("model_type") == "clip":
        return HFCLIP(folder, device)
    raise UserError(f"{folder / 'config.json'} is neither a transformers CLIP (model_type 'clip', got "
                    f"{config.get('model_type')!r}) nor a difflab ShapesCLIP; for open_clip use OpenCLIP(arch, file)")
