"""The training loop, on Hugging Face Accelerate (one process here, many with ``accelerate launch``).

Randomness is a pure function of (seed, step): the data order of every epoch, the timesteps and the
noise of every step are drawn from generators seeded by them, for the whole global batch, and each
process takes its slice. So a resumed run repeats exactly what an uninterrupted run would do, and N
processes see exactly the batch one process with N times the batch would see.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from difflab.conditioner import Conditioner
from difflab.conditioning import drop_mask
from difflab.data import build_dataset
from difflab.data.images import to_pil_grid
from difflab.errors import UserError
from difflab.losses import diffusion_loss
from difflab.noise import seeded_generator
from difflab.nets.unet import UNet
from difflab.nets.unet_config import UNetConfig
from difflab.pipelines.diffusion import DiffusionPipeline
from difflab.pipelines.model_dir import ensure_writable_dir
from difflab.schedules import NoiseSchedule
from difflab.training import checkpoint as ckpt
from difflab.training import posthoc_ema
from difflab.training.config import TrainConfig
from difflab.training.distributed import make_accelerator
from difflab.training.ema import EMA
from difflab.training.timesteps import make_timestep_sampler

MAX_BAD_STEPS = 3
PREVIEW_GUIDANCE = 3.0  # classifier-free guidance scale of the periodic sample grids


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C or SIGTERM once the checkpoint is safely on disk."""


@dataclass
class TrainResult:
    step: int
    loss: float
    images_per_second: float
    out_dir: Path


class Trainer:
    """Train a UNet diffusion model described by a :class:`TrainConfig` into ``out_dir``."""

    def __init__(self, config: TrainConfig, out_dir: str | Path, *, progress: bool = True) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.accelerator = make_accelerator(config.optim.mixed_precision)
        if self.accelerator.is_main_process:
            ensure_writable_dir(self.out_dir)
        d = config.data
        held_out = {"exclude": [tuple(pair) for pair in d.exclude]} if d.exclude else {}
        self.dataset = build_dataset(d.dataset, d.resolution, data_dir=d.data_dir, num_images=d.num_images,
                                     seed=config.seed, **held_out)
        self.vae = self._latent_dataset(d.autoencoder) if d.autoencoder else None
        c = config.conditioning
        self.conditioner = Conditioner(c.kind, num_classes=self.dataset.num_classes,
                                       class_names=self.dataset.class_names, text_encoder=c.text_encoder)
        model_cfg = {"in_channels": self.dataset.channels, **self.conditioner.unet_fields(), **config.model}
        if model_cfg["in_channels"] != self.dataset.channels:
            raise UserError(f"model.in_channels={model_cfg['in_channels']} but the dataset has {self.dataset.channels} channels; remove the key")
        if config.objective.learn_variance:  # prediction and variance interpolation (Nichol & Dhariwal 2021)
            if model_cfg.get("out_channels") not in (None, 2 * self.dataset.channels):
                raise UserError(f"model.out_channels={model_cfg['out_channels']} but learn_variance needs "
                                f"{2 * self.dataset.channels} (twice the data's channels); remove the key")
            model_cfg["out_channels"] = 2 * self.dataset.channels
        torch.manual_seed(config.seed)
        self.model = UNet(UNetConfig.from_dict(model_cfg))
        self.schedule = NoiseSchedule.from_config(config.schedule)
        self.timestep_sampler = make_timestep_sampler(config.objective.timestep_sampling, self.schedule)
        if config.objective.parameterization == "eps" and self.schedule.alphas_cumprod[-1] < 1e-6:
            warnings.warn(f"eps-prediction on a schedule whose alpha_bar_T is {self.schedule.alphas_cumprod[-1]:.1e}: "
                          "x0 = (x - sigma eps) / alpha multiplies eps errors by up to 1/alpha_T at the first sampling "
                          "step, which few-step samplers carry into the image; v-prediction avoids it (--parameterization v)")
        self.ema = EMA(self.model, config.optim.ema_decay)
        o = config.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay, foreach=True)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / max(o.warmup_steps, 1)))
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.ema.model.to(self.accelerator.device)
        ph = config.posthoc_ema  # power-function EMA trackers (main process only: only it writes snapshots)
        self.posthoc_ema = ([posthoc_ema.PowerEMA(self.accelerator.unwrap_model(self.model), s) for s in ph.sigma_rels]
                            if ph.snapshot_every and self.accelerator.is_main_process else [])
        self.step = 0
        self.bad_steps = 0  # non-finite steps in a row
        self.skipped_steps = 0  # non-finite steps in total
        self._order: tuple[int, torch.Tensor | None] = (-1, None)  # (epoch, its data order), see _epoch_order

    def _latent_dataset(self, autoencoder_dir: str) -> torch.nn.Module:
        """Latent diffusion (Rombach et al. 2022): replace the images by the autoencoder's scaled latents, encoded
        once (cached in OUT/latents.safetensors by a single process); returns the autoencoder for decoding."""
        from difflab.data.latents import LatentDataset
        from difflab.nets.autoencoder import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(autoencoder_dir).to(self.accelerator.device).eval()
        cache = self.out_dir / "latents.safetensors" if self.accelerator.num_processes == 1 else None
        self.dataset = LatentDataset(self.dataset, vae, cache_path=cache)
        return vae

    # ----- randomness as a function of (seed, step) -------------------------------------------
    def _generator(self, *keys: int) -> torch.Generator:
        return seeded_generator(self.config.seed, *keys)

    def _batch_indices(self, step: int) -> torch.Tensor:
        """Dataset indices of the global batch at ``step`` (epoch-wise permutations, no repeats within an epoch)."""
        n, bs = len(self.dataset), self.config.optim.batch_size
        positions = torch.arange(step * bs, (step + 1) * bs)
        epochs = positions // n
        out = torch.empty(bs, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._epoch_order(epoch)[positions[mask] % n]
        return out

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The data order of ``epoch``, drawn once per epoch rather than once per step."""
        if self._order[0] != epoch:
            self._order = (epoch, torch.randperm(len(self.dataset), generator=self._generator(1, epoch)))
        return self._order[1]

    def _local_batch(
        self, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """This process's slice of the global (images, timesteps, noise, network conditions, timestep weights)
        at ``step``; t and its weight 1 / (T p_t) come from :attr:`timestep_sampler`."""
        items = [self.dataset[int(i)] for i in self._batch_indices(step)]
        g = self._generator(2, step)
        x0 = torch.stack([item["image"] for item in items])
        t, weights = self.timestep_sampler.sample(len(items), g)
        noise = torch.randn(x0.shape, generator=g)
        drop = drop_mask(len(items), self.config.conditioning.dropout, g)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        dev = self.accelerator.device
        mine = slice(rank, None, world)
        labels = torch.tensor([item["label"] for item in items])[mine]
        cond = self.conditioner.training_kwargs(labels, [item["caption"] for item in items][mine], drop[mine], dev)
        return x0[mine].to(dev), t[mine], noise[mine].to(dev), cond, weights[mine].to(dev)

    # ----- one optimisation step --------------------------------------------------------------
    def train_step(self, step: int) -> float:
        x0, t, noise, cond, weights = self._local_batch(step)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        parts: dict[str, list[torch.Tensor]] = {}  # per-sample loss terms of every micro-batch
        loss = torch.zeros((), device=x0.device)
        chunks = torch.arange(len(x0)).tensor_split(min(self.config.optim.grad_accum_steps, len(x0)))
        for i, idx in enumerate(chunks):  # gradient accumulation: the gradient of the mean over the whole batch
            last = i == len(chunks) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):  # all-reduce once
                part = self._micro_batch_loss(x0[idx], t[idx], noise[idx], {k: v[idx] for k, v in cond.items()},
                                              weights[idx], parts) * (len(idx) / len(x0))
                self.accelerator.backward(part)
            loss += part.detach()
        parts_all = {k: torch.cat(v) for k, v in parts.items()}
        clip = self.config.optim.grad_clip if self.config.optim.grad_clip > 0 else math.inf
        grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), clip))  # gradients are already averaged
        loss_value = self.accelerator.reduce(loss.detach(), reduction="mean").item()
        # fp16: the gradient scaler itself skips steps with overflowing gradients while it calibrates.
        grads_ok = math.isfinite(grad_norm) or self.accelerator.mixed_precision == "fp16"
        if not (math.isfinite(loss_value) and grads_ok):
            return self._skip_bad_step(step)
        self.bad_steps = 0
        if "vlb" in parts_all:  # every process records the whole global batch, so their samplers stay identical
            gathered_t = self.accelerator.gather(t.to(self.accelerator.device))
            self.timestep_sampler.update(gathered_t, self.accelerator.gather(parts_all["vlb"]))
        self.optimizer.step()
        self.lr_schedule.step()
        self.ema.update(self.accelerator.unwrap_model(self.model))
        return loss_value

    def _micro_batch_loss(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: dict[str, torch.Tensor],
                          weights: torch.Tensor, parts: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """Mean weighted loss of one micro-batch (weights 1 / (T p_t) keep it unbiased under any p_t)."""
        ob, terms = self.config.objective, {}
        with self.accelerator.autocast():
            losses = diffusion_loss(self.model, x0, self.schedule, t, noise, parameterization=ob.parameterization,
                                    weighting=ob.weighting, min_snr_gamma=ob.min_snr_gamma, cond=cond,
                                    loss=ob.loss, learn_variance=ob.learn_variance, parts=terms)
        for key, value in terms.items():
            parts.setdefault(key, []).append(value)
        return (losses * weights.to(losses.dtype)).mean()

    def _update_posthoc_ema(self) -> None:
        """Power-function EMAs after every step (skipped ones too), snapshots every ``snapshot_every`` steps and at the end."""
        model, every = self.accelerator.unwrap_model(self.model), self.config.posthoc_ema.snapshot_every
        for tracker in self.posthoc_ema:
            tracker.update(model, self.step)
            if self.step % every == 0 or self.step == self.config.optim.steps:
                posthoc_ema.save_snapshot(self.out_dir, tracker)

    def _skip_bad_step(self, step: int) -> float:
        """Drop this step's update (a NaN/Inf loss or gradient); stop after ``MAX_BAD_STEPS`` in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        self.skipped_steps += 1
        if self.bad_steps >= MAX_BAD_STEPS:
            raise UserError(
                f"the loss or its gradient was NaN/Inf for {MAX_BAD_STEPS} steps in a row (last at step {step}); lower optim.lr or use "
                f"mixed_precision bf16/no instead of fp16; the last good checkpoint in {self.out_dir} is kept"
            )
        return float("nan")

    # ----- checkpoints and exports ------------------------------------------------------------
    def pipeline(self) -> DiffusionPipeline:
        """The EMA model as a sampling pipeline."""
        return DiffusionPipeline(self.ema.model, self.schedule, self.config.objective.parameterization,
                                 resolution=self.dataset.resolution, sampler=self.config.log.sampler,
                                 conditioner=self.conditioner, extra_config={"dataset": self.config.data.dataset},
                                 vae=self.vae)

    def save(self) -> None:
        """Checkpoint (everything needed to continue) and export the EMA model, on the main process only."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        model = self.accelerator.unwrap_model(self.model)
        opt_tensors, opt_meta = ckpt.optimizer_to_flat(self.optimizer.state_dict())
        rng_tensors, rng_meta = ckpt.rng_state()
        state = {"step": self.step, "config": self.config.to_dict(), "optimizer": opt_meta, "rng": rng_meta,
                 "ema_updates": self.ema.num_updates, "lr_schedule": self.lr_schedule.state_dict(), "bad_steps": self.bad_steps,
                 "skipped_steps": self.skipped_steps}
        tensors = {"model": model.state_dict(), "ema": self.ema.model.state_dict(), "optimizer": opt_tensors, "rng": rng_tensors}
        tensors["timestep_sampler"] = self.timestep_sampler.state_dict()
        ph_tensors, state["posthoc_ema"] = posthoc_ema.checkpoint_entries(self.posthoc_ema)
        tensors.update(ph_tensors)
        ckpt.save_checkpoint(self.out_dir, tensors, state, keep=self.config.log.keep_checkpoints)
        self.pipeline().save_pretrained(self.out_dir)

    def restore(self, path: Path) -> None:
        tensors, state = ckpt.load_checkpoint(path)
        self.accelerator.unwrap_model(self.model).load_state_dict(tensors["model"])
        self.ema.model.load_state_dict(tensors["ema"])
        self.ema.num_updates = state["ema_updates"]
        self.optimizer.load_state_dict(ckpt.optimizer_from_flat(tensors["optimizer"], state["optimizer"]))
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        ckpt.set_rng_state(tensors["rng"], state["rng"])
        posthoc_ema.load_checkpoint_entries(self.posthoc_ema, tensors, state["posthoc_ema"])
        self.timestep_sampler.load_state_dict(tensors["timestep_sampler"])
        self.step, self.bad_steps, self.skipped_steps = state["step"], state["bad_steps"], state["skipped_steps"]

    def save_samples(self) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        log = self.config.log
        out = self.pipeline()(num_images=log.num_samples, num_inference_steps=log.sample_steps, seed=0, progress=False,
                              **self._preview_conditions(log.num_samples))
        path = self.out_dir / "samples" / f"step_{self.step:07d}.png"
        path.parent.mkdir(exist_ok=True)
        to_pil_grid(out.samples, nrow=int(math.ceil(math.sqrt(log.num_samples)))).save(path)
        return path

    def _preview_conditions(self, n: int) -> dict[str, Any]:
        """Conditions for the periodic sample grid: cycling labels, or the first training captions."""
        kind = self.conditioner.kind
        if kind == "class":
            return {"class_labels": [i % self.conditioner.num_classes for i in range(n)], "guidance_scale": PREVIEW_GUIDANCE}
        if kind == "text":
            return {"prompt": [self.dataset[i % len(self.dataset)]["caption"] for i in range(n)], "guidance_scale": PREVIEW_GUIDANCE}
        return {}

    # ----- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        o, log = self.config.optim, self.config.log
        bar = tqdm(total=o.steps, initial=self.step, disable=not (self.progress and self.accelerator.is_main_process),
                   desc="train", unit="step", dynamic_ncols=True)
        smoothed, started, start_step = float("nan"), time.perf_counter(), self.step
        previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
        try:
            while self.step < o.steps:
                loss = self.train_step(self.step)
                self.step += 1
                self._update_posthoc_ema()
                if math.isfinite(loss):
                    smoothed = loss if not math.isfinite(smoothed) else 0.98 * smoothed + 0.02 * loss
                rate = (self.step - start_step) * o.batch_size / (time.perf_counter() - started)
                bar.update(1)
                bar.set_postfix(loss=f"{smoothed:.4f}", img_s=f"{rate:.1f}")
                self._log_line({"step": self.step, "loss": loss, "images_per_second": rate, "skipped_steps": self.skipped_steps})
                if log.checkpoint_every and self.step % log.checkpoint_every == 0 and self.step < o.steps:
                    self.save()
                if log.sample_every and self.step % log.sample_every == 0:
                    self.save_samples()
        except KeyboardInterrupt:
            bar.close()
            self.save()
            raise TrainingInterrupted(f"interrupted at step {self.step}; checkpoint saved in {self.out_dir}; continue with --resume") from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        bar.close()
        self.save()
        rate = (self.step - start_step) * o.batch_size / max(time.perf_counter() - started, 1e-9)
        return TrainResult(self.step, smoothed, rate, self.out_dir)

    def _log_line(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
