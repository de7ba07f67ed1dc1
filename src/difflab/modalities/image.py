"""Images: samples (C, H, W) in [-1, 1], C = 1 (grey) or 3 (RGB) for media; PNG files and grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from difflab.errors import UserError
from difflab.modalities.base import Modality, grid_rows, register_modality


@register_modality
class ImageModality(Modality):
    """``to_media``: PIL images; ``save``: one PNG grid (or a .safetensors of the raw batch); ``preview``: a grid."""

    name = "image"
    ndim = 3
    default_suffix = ".png"
    default_metrics = ("fid", "is", "precision_recall")

    def finalize(self, samples: Tensor) -> Tensor:
        return samples.clamp(-1, 1)

    def to_media(self, samples: Tensor) -> list[Any]:
        from difflab.data.images import tensor_to_pil

        return tensor_to_pil(samples.clamp(-1, 1))

    def save(self, samples: Tensor, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix.lower() == ".safetensors":
            return super().save(samples, path)
        from difflab.data.images import to_pil_grid
        from difflab.io.files import ensure_writable_file

        if samples.shape[1] not in (1, 3):
            raise UserError(f"images with {samples.shape[1]} channels cannot be written as {path.suffix or 'PNG'}; "
                            "use a .safetensors output (latent or multi-channel samples)")
        ensure_writable_file(path)
        to_pil_grid(samples.clamp(-1, 1), nrow=grid_rows(len(samples))).save(path)
        return path

    def preview(self, samples: Tensor, path: str | Path) -> Path:
        return self.save(samples, Path(path).with_suffix(".png") if samples.shape[1] in (1, 3) else Path(path).with_suffix(".safetensors"))
