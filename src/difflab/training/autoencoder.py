"""Train the KL autoencoder of latent diffusion (Rombach et al. 2022, appendix G), then fix its scaling factor.

Per step: a batch ``x``, ``z ~ q(z | x)``, ``x_rec = decode(z)``, and the loss (per pixel, see
:mod:`difflab.training.autoencoder_loss` for the terms and why a Laplacian-pyramid L1 stands in for LPIPS)

    L = mean|x - x_rec| + perceptual_weight * pyramid_l1(x, x_rec) + kl_weight * KL / (C H W)
        + [step >= gan_start] * disc_weight * lambda * (-E D(x_rec))

with ``lambda`` the adaptive weight of Esser et al. 2021 (eq. 7); from ``gan_start`` on, a patch
discriminator ``D`` is trained with the hinge loss (:class:`~difflab.training.objectives.autoencoder.AutoencoderObjective`).
The run is one :class:`~difflab.training.Trainer` run: checkpoints, exact resume, NaN guard, Accelerate.
Autoencoder and discriminator share one AdamW with weight decay 0 and betas (0.5, 0.9), per parameter
the two Adams of the LDM and taming-transformers code; no warm-up, clipping or EMA. Randomness is a
pure function of (seed, step): the data order (epoch-wise permutations) and the posterior noise. Every
export stores ``scaling_factor = 1 / std`` of the posterior means of up to ``scale_images`` training
images (seeded subset) in the model folder's config.json.

>>> res = train_autoencoder("shapes", "runs/ae", {"base_channels": 32}, steps=2000, resolution=32)  # doctest: +SKIP
>>> AutoencoderKL.from_pretrained("runs/ae").scaling_factor                                     # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflab.data import build_dataset
from difflab.data.latents import encode_dataset
from difflab.errors import UserError
from difflab.nets.autoencoder import AutoencoderConfig, AutoencoderKL, check_latent_size
from difflab.nets.discriminator import PatchDiscriminator
from difflab.noise import seeded_generator
from difflab.training.objectives.autoencoder import AutoencoderObjective, AutoencoderWithDiscriminator
from difflab.training.runs import fit, run_accelerator, run_config, trained_model
from difflab.training.trainer import Trainer

BETAS = (0.5, 0.9)


@dataclass
class AutoencoderTrainResult:
    step: int
    loss: float  # exponential moving average of the autoencoder's loss (without the discriminator's)
    l1: float  # moving average of mean |x - x_rec|
    kl: float  # moving average of the per-sample KL
    scaling_factor: float
    out_dir: Path
    note: str | None = None  # set when nothing was trained (resuming a finished run)


def _check_number(name: str, value: Any, positive: bool = True, integer: bool = False) -> None:
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or \
            (value <= 0 if positive else value < 0):
        what = ("positive" if positive else "non-negative") + (" integer" if integer else " number")
        raise UserError(f"{name}={value!r} is invalid; use a {what}")


@torch.no_grad()
def latent_scaling_factor(autoencoder: AutoencoderKL, dataset: Any, num_images: int = 1024, seed: int = 0,
                          batch_size: int = 64) -> float:
    """``1 / std`` of the posterior means of ``num_images`` images of ``dataset`` (seeded subset).

    The std is over every latent element, as in the LDM code (``1 / z.flatten().std()``), in float64.
    """
    n = min(num_images, len(dataset))
    indices = torch.randperm(len(dataset), generator=seeded_generator(seed, 8))[:n].sort().values.tolist()
    std = encode_dataset(autoencoder, dataset, batch_size, indices).double().std().item()
    if not std > 0:
        raise UserError(f"the latents of {n} images have std {std}; cannot scale them (is the dataset constant?)")
    return 1.0 / std


def _model_config(ds: Any, config: AutoencoderConfig | dict[str, Any] | None) -> AutoencoderConfig:
    if isinstance(config, AutoencoderConfig):
        cfg = AutoencoderConfig.from_dict(config.to_dict())
    else:
        cfg = AutoencoderConfig.from_dict({"in_channels": ds.channels, **(config or {})})
    if cfg.in_channels != ds.channels:
        raise UserError(f"the autoencoder has in_channels={cfg.in_channels} but the dataset has {ds.channels} "
                        "channels; remove the key or use another dataset")
    check_latent_size(ds.resolution, ds.resolution, cfg.downsample_factor)
    cfg.scaling_factor = 1.0
    return cfg


def train_autoencoder(
    dataset: str | Any,
    out_dir: str | Path,
    config: AutoencoderConfig | dict[str, Any] | None = None,
    steps: int = 2000,
    batch_size: int = 16,
    lr: float = 1e-4,
    kl_weight: float = 1e-6,
    *,
    perceptual_weight: float = 1.0,
    gan_start: int | None = None,
    disc_weight: float = 0.5,
    seed: int = 0,
    resolution: int | None = None,
    data_dir: str | Path | None = None,
    num_images: int | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    scale_images: int = 1024,
    time_limit: float | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> AutoencoderTrainResult:
    """Train an :class:`AutoencoderKL` and save it (config.json with its scaling factor + model.safetensors) in ``out_dir``.

    ``dataset``: a name or folder for :func:`difflab.data.build_dataset` (with ``resolution``, ``data_dir``,
    ``num_images``, ``seed``) or a dataset object. ``config``: :class:`AutoencoderConfig` or its keys
    (``in_channels`` from the dataset). ``gan_start``: the step from which the patch GAN is on (None: never).
    ``checkpoint_every``: steps between checkpoints in ``out_dir/checkpoints`` (0: only at the end); with
    ``resume`` the run in ``out_dir`` continues (``steps`` may be raised; a finished run is left as it is, see ``note``). ``time_limit``: seconds after
    which training stops early (the model is still saved; the result says at which step).
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("scale_images", scale_images)):
        _check_number(name, value, integer=True)
    for name, value in (("lr", lr), ("kl_weight", kl_weight), ("perceptual_weight", perceptual_weight),
                        ("disc_weight", disc_weight)):
        _check_number(name, value, positive=name == "lr")
    _check_number("checkpoint_every", checkpoint_every, positive=False, integer=True)
    if gan_start is not None:
        _check_number("gan_start", gan_start, positive=False, integer=True)
    ds = dataset
    if isinstance(dataset, str):
        ds = build_dataset(dataset, resolution, data_dir=data_dir, num_images=num_images, seed=seed)
    cfg = _model_config(ds, config)
    name = dataset if isinstance(dataset, str) else type(dataset).__name__
    run = run_config(seed=seed, steps=steps, batch_size=batch_size, lr=lr, betas=BETAS, checkpoint_every=checkpoint_every,
                     data={"dataset": name, "resolution": ds.resolution, "num_images": len(ds)}, model=cfg.to_dict())
    weights = {"kl_weight": kl_weight, "perceptual_weight": perceptual_weight, "gan_start": gan_start,
               "disc_weight": disc_weight}
    extra = {"dataset": name, "resolution": ds.resolution, "seed": seed, "kl_weight": kl_weight,
             "perceptual_weight": perceptual_weight, "gan_start": gan_start}
    f = cfg.downsample_factor
    latent_shape = (cfg.latent_channels, *(n // f for n in ds.sample_shape[1:]))
    objective = AutoencoderObjective(**weights, latent_shape=latent_shape, scale=(ds, scale_images, seed), extra=extra)

    def build() -> Trainer:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoencoderKL(cfg)
            disc = PatchDiscriminator(ds.channels, ds.resolution) if gan_start is not None else None
        return Trainer(AutoencoderWithDiscriminator(model, disc), ds, objective, run, out_dir, progress=progress,
                       accelerator=run_accelerator(device), time_limit=time_limit)

    out_dir = Path(out_dir)
    trainer, result = fit(build, out_dir, {"config": run.to_dict(), "objective": weights}, resume=resume,
                          what="an autoencoder run")
    autoencoder = trained_model(trainer).autoencoder
    m = result.metrics or {}
    if result.note is None:  # the final export again, now with the run's step count and losses
        objective.extra.update(steps=result.step, losses=m)
        objective.export(trained_model(trainer), out_dir)
    else:
        autoencoder.scaling_factor = type(autoencoder).from_pretrained(out_dir).scaling_factor
    return AutoencoderTrainResult(result.step, m.get("ae_loss", math.nan), m.get("l1", math.nan), m.get("kl", math.nan),
                                  autoencoder.scaling_factor, out_dir, result.note)
