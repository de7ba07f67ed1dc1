"""Plain tensors of any shape (tabular rows, 1-D signals without a media format): saved as ``.safetensors``
(``samples`` key) or ``.npy``."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from difflab.modalities.base import Modality, register_modality


@register_modality
class TensorModality(Modality):
    name = "tensor"
    ndim = None
    default_suffix = ".safetensors"

    def save(self, samples: Tensor, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix.lower() == ".npy":
            import numpy as np

            from difflab.io.files import atomic_write, ensure_writable_file

            array = samples.detach().cpu().numpy()

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as f:
                    np.save(f, array)

            atomic_write(ensure_writable_file(path), write)
            return path
        return super().save(samples, path)
