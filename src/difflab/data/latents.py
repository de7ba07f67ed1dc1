"""Latent datasets: every sample of a dataset encoded once by a KL autoencoder (Rombach et al. 2022).

An item is the base dataset's item with ``"x"`` replaced by the scaled latent
``scaling_factor * mean(q(z | x))`` of shape ``(latent_channels, H / f, W / f)``; labels and captions
are kept. ``sample_shape`` is that of the latent, so a diffusion trainer can use the
dataset as it would an image dataset.

Why the posterior mean and not a sample: the LDM code draws a fresh ``z ~ q(z | x)`` at every step.
The mean makes the dataset deterministic, so it can be encoded once and cached, and it is the latent the
decoder reconstructs best (it was trained on samples spread around it). After long training with
``kl_weight = 1e-6`` the posterior std is small next to the spread of the means and the two choices
nearly agree; after a short training (std still near its initial 1) the mean spares the diffusion model
from learning the encoder's noise. The scaling factor is computed on the same means
(:func:`difflab.training.autoencoder.latent_scaling_factor`), so the latents have unit std.

The optional cache is one safetensors file holding the latents, keyed by a SHA-256 of the autoencoder
(config, including the scaling factor, and every weight) and of the dataset (class, length and the bytes
of every image). A cache with another key is re-encoded and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from difflab.data.base import DiffusionDataset, image_item
from difflab.errors import UserError
from difflab.nets.autoencoder import AutoencoderKL

CACHE_FORMAT = "difflab.latents/1"


def _batches(indices: Sequence[int], batch_size: int) -> Iterable[Sequence[int]]:
    for lo in range(0, len(indices), batch_size):
        yield indices[lo:lo + batch_size]


@torch.no_grad()
def encode_dataset(autoencoder: AutoencoderKL, dataset: Any, batch_size: int = 64,
                   indices: Sequence[int] | None = None) -> Tensor:
    """Posterior means (unscaled) of ``dataset[i]["x"]`` for ``i`` in ``indices`` (default all), on the CPU."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size={batch_size!r} is invalid; use a positive integer")
    indices = list(range(len(dataset))) if indices is None else list(indices)
    if not indices:
        raise UserError("nothing to encode: the dataset is empty; pass a dataset with at least one image")
    device = next(autoencoder.parameters()).device
    was_training = autoencoder.training
    autoencoder.eval()
    try:
        out = [autoencoder.encode(torch.stack([dataset[i]["x"] for i in chunk]).to(device)).mode().cpu()
               for chunk in _batches(indices, batch_size)]
    finally:
        autoencoder.train(was_training)
    return torch.cat(out)


def autoencoder_fingerprint(autoencoder: AutoencoderKL) -> str:
    """SHA-256 of the autoencoder's config (with its scaling factor) and of every weight's bytes."""
    h = hashlib.sha256(json.dumps(autoencoder.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(autoencoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _scan(dataset: Any) -> tuple[str, list[int], list[str]]:
    """One pass over ``dataset``: its fingerprint (class, length, image bytes), labels and captions."""
    h = hashlib.sha256(f"{type(dataset).__module__}.{type(dataset).__qualname__}:{len(dataset)}".encode())
    labels, captions = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        image = item["x"].detach().cpu().to(torch.float32).contiguous()
        h.update(f"{tuple(image.shape)}".encode())
        h.update(image.numpy().tobytes())
        labels.append(int(item["cond"].get("label", -1)))
        captions.append(str(item["cond"].get("caption", "")))
    return h.hexdigest(), labels, captions


def _read_cache(path: Path, key: str) -> Tensor | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") == CACHE_FORMAT and meta.get("key") == key:
                return f.get_tensor("latents")
    except (OSError, ValueError, RuntimeError) as err:
        warnings.warn(f"latent cache {path} is unreadable ({err}); encoding the dataset again", UserWarning, stacklevel=3)
        return None
    warnings.warn(f"latent cache {path} belongs to another autoencoder or dataset; encoding again and replacing it",
                  UserWarning, stacklevel=3)
    return None


def _write_cache(path: Path, latents: Tensor, key: str) -> None:
    from difflab.io.files import atomic_write, ensure_writable_dir

    ensure_writable_dir(path.parent)
    atomic_write(path, lambda p: save_file({"latents": latents.contiguous()}, str(p),
                                            metadata={"format": CACHE_FORMAT, "key": key}))


class LatentDataset(DiffusionDataset):
    """``dataset`` encoded by ``autoencoder``: items ``{"x": scaled latent, "cond": {"label", "caption"}}``.

    ``sample_shape`` is the latent's; ``image_shape`` the base dataset's. ``cache_path``: a ``.safetensors`` file to read the latents from, or to write them to.

    >>> from difflab.data import build_dataset
    >>> from difflab.nets.autoencoder import AutoencoderConfig
    >>> ae = AutoencoderKL(AutoencoderConfig(base_channels=8, norm_groups=4, scaling_factor=2.0))
    >>> ds = LatentDataset(build_dataset("shapes", 16, num_images=4), ae)
    >>> ds[0]["x"].shape, ds.sample_shape, ds.image_shape
    (torch.Size([4, 4, 4]), (4, 4, 4), (3, 16, 16))
    """

    def __init__(self, dataset: Any, autoencoder: AutoencoderKL, batch_size: int = 64,
                 cache_path: str | Path | None = None) -> None:
        key, self.labels, self.captions = _scan(dataset)
        key = hashlib.sha256(f"{autoencoder_fingerprint(autoencoder)}:{key}".encode()).hexdigest()
        path = None if cache_path is None else Path(cache_path).expanduser()
        latents = _read_cache(path, key) if path is not None else None
        self.from_cache = latents is not None
        if latents is None:
            latents = encode_dataset(autoencoder, dataset, batch_size) * autoencoder.scaling_factor
            if path is not None:
                _write_cache(path, latents, key)
        self.latents = latents
        self.key = key
        self.scaling_factor = autoencoder.scaling_factor
        self.downsample_factor = autoencoder.downsample_factor
        self.sample_shape = tuple(int(n) for n in latents.shape[1:])
        self.image_shape = tuple(int(n) for n in getattr(dataset, "sample_shape", dataset[0]["x"].shape))
        self.modality = getattr(dataset, "modality", "image")
        self.class_names = getattr(dataset, "class_names", None)

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} latents")
        index = index % len(self)
        return image_item(self.latents[index], self.labels[index], self.captions[index])

    def images(self) -> Tensor:
        """All scaled latents ``(N, *sample_shape)``."""
        return self.latents
