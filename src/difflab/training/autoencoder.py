"""Train the KL autoencoder of latent diffusion (Rombach et al. 2022, appendix G), then fix its scaling factor.

Per step: a batch ``x``, ``z ~ q(z | x)``, ``x_rec = decode(z)``, and the loss (per pixel, see
:mod:`difflab.training.autoencoder_loss` for the terms and why a Laplacian-pyramid L1 stands in for LPIPS)

    L = mean|x - x_rec| + perceptual_weight * pyramid_l1(x, x_rec) + kl_weight * KL / (C H W)
        + [step >= gan_start] * disc_weight * lambda * (-E D(x_rec))

with ``lambda`` the adaptive weight of Esser et al. 2021 (eq. 7); from ``gan_start`` on, a patch
discriminator ``D`` is trained with the hinge loss. Both optimisers are Adam with betas (0.5, 0.9), as in
the LDM and taming-transformers code. Randomness is a pure function of (seed, step): batch indices and
posterior noise of step k come from generators seeded by (seed, k), so a resumed run repeats exactly
what an uninterrupted one does. After the last step, ``scaling_factor = 1 / std`` of the posterior means
of up to ``scale_images`` training images (seeded subset) is stored in the model folder's config.json.

>>> res = train_autoencoder("shapes", "runs/ae", {"base_channels": 32}, steps=2000, resolution=32)  # doctest: +SKIP
>>> AutoencoderKL.from_pretrained("runs/ae").scaling_factor                                     # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from difflab.data import build_dataset
from difflab.data.latents import encode_dataset
from difflab.errors import UserError
from difflab.nets.autoencoder import AutoencoderConfig, AutoencoderKL, check_latent_size
from difflab.nets.discriminator import PatchDiscriminator
from difflab.noise import seeded_generator
from difflab.pipelines.model_dir import ensure_writable_dir
from difflab.training import checkpoint as ckpt
from difflab.training.autoencoder_loss import adaptive_gan_weight, hinge_d_loss, hinge_g_loss, reconstruction_loss

BETAS = (0.5, 0.9)
RESUMABLE = ("steps", "checkpoint_every")  # settings a resumed run may change


@dataclass
class AutoencoderTrainResult:
    step: int
    loss: float  # exponential moving average of the total loss
    l1: float  # moving average of mean |x - x_rec|
    kl: float  # moving average of the per-sample KL
    scaling_factor: float
    out_dir: Path


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


class _Run:
    """The state of one training run: networks, optimisers, data and settings."""

    def __init__(self, ds: Any, settings: dict[str, Any], device: torch.device) -> None:
        self.ds, self.settings, self.device = ds, settings, device
        seed = settings["seed"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = AutoencoderKL(AutoencoderConfig.from_dict(settings["config"])).to(device).train()
            gan = settings["gan_start"] is not None
            self.disc = PatchDiscriminator(ds.channels, ds.resolution).to(device).train() if gan else None
        lr = settings["lr"]
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr, betas=BETAS)
        self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=lr, betas=BETAS) if self.disc else None
        self.step = 0
        self.averages: dict[str, float] = {}

    def batch(self, step: int) -> tuple[Tensor, torch.Generator]:
        """Images of ``step`` (indices with replacement) and the generator of its posterior noise."""
        idx = torch.randint(0, len(self.ds), (self.settings["batch_size"],), generator=seeded_generator(self.settings["seed"], 6, step))
        x = torch.stack([self.ds[int(i)]["image"] for i in idx]).to(self.device)
        return x, seeded_generator(self.settings["seed"], 7, step)

    def train_step(self, step: int) -> dict[str, float]:
        s = self.settings
        x, noise = self.batch(step)
        x_rec, posterior = self.model(x, noise)
        terms = reconstruction_loss(x, x_rec, s["perceptual_weight"])
        rec = (terms["l1"] + s["perceptual_weight"] * terms["perceptual"]).mean()
        kl = posterior.kl().mean()
        loss = rec + s["kl_weight"] * kl / x[0].numel()
        out = {"l1": terms["l1"].mean().item(), "perceptual": terms["perceptual"].mean().item(), "kl": kl.item()}
        gan_on = self.disc is not None and step >= s["gan_start"]
        if gan_on:
            g_loss = hinge_g_loss(self.disc(x_rec))
            weight = adaptive_gan_weight(rec, g_loss, self.model.decoder.last_layer)
            loss = loss + s["disc_weight"] * weight * g_loss
            out.update(g_loss=g_loss.item(), gan_weight=weight.item())
        if not math.isfinite(loss.item()):
            raise UserError(f"the autoencoder loss became {loss.item()} at step {step}; lower --lr (now {s['lr']})")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if gan_on:
            d_loss = hinge_d_loss(self.disc(x), self.disc(x_rec.detach()))
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_opt.step()
            out["d_loss"] = d_loss.item()
        out["loss"] = loss.item()
        return out

    def track(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.averages[k] = v if k not in self.averages else 0.98 * self.averages[k] + 0.02 * v

    # ----- checkpoints ------------------------------------------------------------------------
    def save(self, out_dir: Path) -> None:
        tensors: dict[str, dict[str, Tensor]] = {"model": self.model.state_dict()}
        opt_t, opt_meta = ckpt.optimizer_to_flat(self.opt.state_dict())
        tensors["optimizer"] = opt_t
        state: dict[str, Any] = {"step": self.step, "settings": self.settings, "optimizer": opt_meta,
                                 "averages": self.averages}
        if self.disc is not None:
            d_t, d_meta = ckpt.optimizer_to_flat(self.disc_opt.state_dict())
            tensors.update(disc=self.disc.state_dict(), disc_optimizer=d_t)
            state["disc_optimizer"] = d_meta
        ckpt.save_checkpoint(out_dir, tensors, state)

    def restore(self, tensors: dict[str, dict[str, Tensor]], state: dict[str, Any]) -> None:
        self.model.load_state_dict(tensors["model"])
        self.opt.load_state_dict(ckpt.optimizer_from_flat(tensors.get("optimizer", {}), state["optimizer"]))
        if self.disc is not None:
            self.disc.load_state_dict(tensors["disc"])
            self.disc_opt.load_state_dict(ckpt.optimizer_from_flat(tensors.get("disc_optimizer", {}), state["disc_optimizer"]))
        self.step, self.averages = state["step"], state["averages"]


def _resume_state(out_dir: Path, settings: dict[str, Any], resume: bool) -> tuple[dict, dict] | None:
    """The checkpoint to continue from, after checking that it trains the same thing."""
    existing = ckpt.find_checkpoint(out_dir) if out_dir.is_dir() else None
    if existing and not resume:
        raise UserError(f"{out_dir} already holds an autoencoder run; pass --resume to continue it or choose another --out")
    if resume and not existing:
        raise UserError(f"nothing to resume in {out_dir}: no checkpoint found; drop --resume to start a new run")
    if not existing:
        return None
    tensors, state = ckpt.load_checkpoint(existing)
    saved = state.get("settings", {})
    diff = sorted(k for k in set(saved) | set(settings) if k not in RESUMABLE and saved.get(k) != settings.get(k))
    if diff:
        raise UserError(f"cannot resume {out_dir} with different settings: {', '.join(diff)} differ; "
                        "resume with the original settings")
    return tensors, state


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
    ``checkpoint_every``: steps between checkpoints in ``out_dir/checkpoint`` (0: only at the end); with
    ``resume`` the run in ``out_dir`` continues (``steps`` may be raised). ``time_limit``: seconds after
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
    settings = {"config": cfg.to_dict(), "dataset": dataset if isinstance(dataset, str) else type(dataset).__name__,
                "resolution": ds.resolution, "num_images": len(ds), "seed": seed, "batch_size": batch_size, "lr": lr,
                "kl_weight": kl_weight, "perceptual_weight": perceptual_weight, "gan_start": gan_start,
                "disc_weight": disc_weight, "steps": steps, "checkpoint_every": checkpoint_every}
    out_dir = ensure_writable_dir(Path(out_dir))
    previous = _resume_state(out_dir, settings, resume)
    run = _Run(ds, settings, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if previous is not None:
        run.restore(*previous)
    _loop(run, out_dir, steps, checkpoint_every, time_limit, progress)
    run.save(out_dir)
    run.model.scaling_factor = latent_scaling_factor(run.model, ds, scale_images, seed)
    extra = {k: settings[k] for k in ("dataset", "resolution", "seed", "kl_weight", "perceptual_weight", "gan_start")}
    run.model.eval().save_pretrained(out_dir, {**extra, "steps": run.step, "losses": run.averages})
    a = run.averages
    return AutoencoderTrainResult(run.step, a.get("loss", math.nan), a.get("l1", math.nan), a.get("kl", math.nan),
                                  run.model.scaling_factor, out_dir)


def _loop(run: _Run, out_dir: Path, steps: int, checkpoint_every: int, time_limit: float | None,
          progress: bool) -> None:
    started = time.perf_counter()
    with tqdm(total=steps, initial=min(run.step, steps), disable=not progress, desc="train-autoencoder",
              unit="step") as bar, open(out_dir / "log.jsonl", "a") as log:
        while run.step < steps:
            if time_limit is not None and time.perf_counter() - started > time_limit:
                break
            values = run.train_step(run.step)
            run.step += 1
            run.track(values)
            log.write(json.dumps({"step": run.step, **values}) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{run.averages['loss']:.4f}", l1=f"{run.averages['l1']:.4f}")
            if checkpoint_every and run.step % checkpoint_every == 0 and run.step < steps:
                run.save(out_dir)
