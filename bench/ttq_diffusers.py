"""diffusers' recipe for ``bench_time_to_quality.py``: their unconditional-image example, re-written.

What ``examples/unconditional_image_generation/train_unconditional.py`` does at its documented defaults
(written here from those defaults, no code copied): ``UNet2DModel`` with plain ``DownBlock2D`` levels and
one ``AttnDownBlock2D`` level (the second-lowest resolution, as the example's 6-level 64 px layout),
``layers_per_block=2``; ``DDPMScheduler(1000, "linear", "epsilon")``; MSE on eps of images in [-1, 1];
AdamW(lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, eps 1e-8); ``get_scheduler("cosine")`` with 500
warm-up steps; gradient clipping at 1.0; ``EMAModel`` with warm-up (inv_gamma 1, power 3/4, max decay
0.9999); batch 16; no random flip (the example's ``--random_flip`` is off by default).

The example sets the cosine length from its epochs; here it is the number of steps the time budget
allows, estimated by a short throughput probe before training (on a copy, not counted in the budget).
Training stops when the budget is spent or the cosine schedule has run out, whichever comes first.
Sampling: ``DPMSolverMultistepScheduler`` (DPM-Solver++, order 2, from the DDPM scheduler's config) on the
EMA weights, image i from seed ``seed + i``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

EXAMPLE = {  # train_unconditional.py's defaults
    "train_batch_size": 16, "learning_rate": 1e-4, "adam_beta1": 0.95, "adam_beta2": 0.999,
    "adam_weight_decay": 1e-6, "adam_epsilon": 1e-8, "lr_scheduler": "cosine", "lr_warmup_steps": 500,
    "ema_inv_gamma": 1.0, "ema_power": 0.75, "ema_max_decay": 0.9999, "ddpm_num_steps": 1000,
    "ddpm_beta_schedule": "linear", "prediction_type": "epsilon", "max_grad_norm": 1.0, "layers_per_block": 2,
}
DOWN = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D")  # the example's layout cut to 3 levels for 32 px
UP = ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
# DPMSolverMultistepScheduler's own spacing (starts at t = 999); the DDPM config's "leading" would start at 950.
SAMPLER_SPACING = "linspace"


def unet_kwargs(channels: int, c: int, d: int, resolution: int = 32) -> dict[str, Any]:
    """UNet2DModel arguments with ``block_out_channels=(c, d, d)``; GroupNorm groups: the largest divisor
    of both widths up to the example's 32."""
    groups = max(g for g in range(1, 33) if c % g == 0 and d % g == 0)
    return dict(sample_size=resolution, in_channels=channels, out_channels=channels, block_out_channels=(c, d, d),
                layers_per_block=EXAMPLE["layers_per_block"], down_block_types=DOWN, up_block_types=UP,
                norm_num_groups=groups)


def count_params(kwargs: dict[str, Any]) -> int:
    from diffusers import UNet2DModel

    with torch.device("meta"):  # no memory, no initialisation: only the shapes
        return sum(p.numel() for p in UNet2DModel(**kwargs).parameters())


def size_unet(channels: int, target: int, resolution: int = 32) -> tuple[dict[str, Any], int]:
    """UNet2DModel arguments whose parameter count is nearest ``target``: widths (c, d, d), multiples of 8 (so
    GroupNorm keeps >= 8 groups and attention heads of 8 channels fit); among the matches within 3%, d is the
    one nearest 2c (the example's doubling)."""
    best_c = min(range(8, 257, 8), key=lambda c: abs(count_params(unet_kwargs(channels, c, 2 * c, resolution)) - target))
    cands = [(c, d, count_params(unet_kwargs(channels, c, d, resolution)))
             for c in (best_c - 8, best_c, best_c + 8) if c >= 8 for d in range(max(8, 2 * c - 24), 2 * c + 25, 8)]

    def key(cand: tuple[int, int, int]) -> tuple[bool, float, float]:  # within 3%: the most example-like widths
        c, d, n = cand
        err = abs(n / target - 1)
        return err > 0.03, abs(d / c - 2) if err <= 0.03 else 0.0, err

    c, d, n = min(cands, key=key)
    return unet_kwargs(channels, c, d, resolution), n


class Recipe:
    """The example's model, noise scheduler, optimizer, LR schedule and EMA, and its training step."""

    def __init__(self, model: torch.nn.Module, total_steps: int) -> None:
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        e = EXAMPLE
        self.model = model
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=e["ddpm_num_steps"], beta_schedule=e["ddpm_beta_schedule"],
                                             prediction_type=e["prediction_type"])
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=e["learning_rate"], betas=(e["adam_beta1"], e["adam_beta2"]),
                                           weight_decay=e["adam_weight_decay"], eps=e["adam_epsilon"])
        self.lr_scheduler = get_scheduler(e["lr_scheduler"], optimizer=self.optimizer, num_warmup_steps=e["lr_warmup_steps"],
                                          num_training_steps=total_steps)
        self.ema = EMAModel(model.parameters(), decay=e["ema_max_decay"], use_ema_warmup=True, inv_gamma=e["ema_inv_gamma"],
                            power=e["ema_power"], model_cls=type(model), model_config=model.config)

    def step(self, clean: Tensor, gen: torch.Generator) -> float:
        """One optimizer step on ``clean`` (B, C, H, W) in [-1, 1]: eps-MSE at uniform t, clip, AdamW, LR, EMA."""
        self.model.train()
        noise = torch.randn(clean.shape, generator=gen)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (clean.shape[0],), generator=gen)
        noisy = self.noise_scheduler.add_noise(clean, noise, t)
        loss = F.mse_loss(self.model(noisy, t).sample.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), EXAMPLE["max_grad_norm"])
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.ema.step(self.model.parameters())
        return float(loss)


class Batches:
    """Shuffled batches of ``images``, a new permutation each epoch (the example's shuffled DataLoader)."""

    def __init__(self, images: Tensor, batch_size: int, gen: torch.Generator) -> None:
        self.images, self.batch_size, self.gen = images, batch_size, gen
        self.order, self.pos = torch.randperm(len(images), generator=gen), 0

    def next(self) -> Tensor:
        if self.pos >= len(self.images):
            self.order, self.pos = torch.randperm(len(self.images), generator=self.gen), 0
        idx = self.order[self.pos:self.pos + self.batch_size]  # the last batch of an epoch may be short, as there
        self.pos += self.batch_size
        return self.images[idx]


def probe_rate(model: torch.nn.Module, images: Tensor, warmup: int, iters: int) -> float:
    """Training steps per second of the whole recipe step, timed on a copy of the model."""
    recipe = Recipe(copy.deepcopy(model), total_steps=10**6)
    gen = torch.Generator().manual_seed(12345)
    batches = Batches(images, EXAMPLE["train_batch_size"], gen)
    for _ in range(warmup):
        recipe.step(batches.next(), gen)
    start = time.perf_counter()
    for _ in range(iters):
        recipe.step(batches.next(), gen)
    return iters / (time.perf_counter() - start)


def ema_state(recipe: Recipe, shadow: torch.nn.Module) -> dict[str, Tensor]:
    recipe.ema.copy_to(shadow.parameters())
    return {k: v.detach().clone().contiguous() for k, v in shadow.state_dict().items()}


def train(images: Tensor, target_params: int, budget: float, out_dir: Path, *, seed: int = 0,
          snapshot_every: int = 0, probe: tuple[int, int] = (3, 10)) -> dict[str, Any]:
    """Train the recipe for ``budget`` seconds; write ``unet_ema/`` (EMA weights), ``scheduler/`` and, every
    ``snapshot_every`` steps, ``snapshots/step_N.safetensors`` (EMA weights). Returns the run's figures."""
    from diffusers import UNet2DModel
    from safetensors.torch import save_file

    kwargs, params = size_unet(images.shape[1], target_params, images.shape[-1])
    torch.manual_seed(seed)
    model = UNet2DModel(**kwargs)
    rate = probe_rate(model, images, *probe)
    planned = max(1, int(rate * budget))
    recipe = Recipe(model, total_steps=planned)
    shadow = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(seed)
    batches = Batches(images, EXAMPLE["train_batch_size"], gen)
    snapshots, step, seen, loss = [], 0, 0, float("nan")
    (out_dir / "snapshots").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    while step < planned and time.perf_counter() - start < budget:
        batch = batches.next()
        loss = recipe.step(batch, gen)
        step, seen = step + 1, seen + len(batch)
        if snapshot_every and step % snapshot_every == 0:
            save_file(ema_state(recipe, shadow), str(out_dir / "snapshots" / f"step_{step:07d}.safetensors"))
            snapshots.append(step)
    elapsed = time.perf_counter() - start
    recipe.ema.copy_to(shadow.parameters())
    shadow.save_pretrained(out_dir / "unet_ema")
    recipe.noise_scheduler.save_pretrained(out_dir / "scheduler")
    return {"steps": step, "planned_steps": planned, "probe_steps_per_s": rate, "train_s": elapsed,
            "images_per_s": seen / elapsed, "stopped_by": "schedule" if step >= planned else "budget",
            "final_lr": recipe.lr_scheduler.get_last_lr()[0], "final_loss": loss, "params": params,
            "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}, "snapshots": snapshots}


@torch.no_grad()
def sample(run_dir: Path, num: int, nfe: int, *, seed: int = 0, batch: int = 250, step: int | None = None,
           device: str = "cpu") -> Tensor:
    """``num`` images in [-1, 1] from the run's EMA UNet (or its snapshot at ``step``) with DPM-Solver++(2M)."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
    from safetensors.torch import load_file

    unet = UNet2DModel.from_pretrained(run_dir / "unet_ema")
    if step is not None:
        unet.load_state_dict(load_file(str(run_dir / "snapshots" / f"step_{step:07d}.safetensors")))
    unet = unet.to(device).eval()
    ddpm = DDPMScheduler.from_pretrained(run_dir / "scheduler")
    sched = DPMSolverMultistepScheduler.from_config(ddpm.config, algorithm_type="dpmsolver++", solver_order=2,
                                                    timestep_spacing=SAMPLER_SPACING)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    out = []
    for first in range(0, num, batch):
        n = min(batch, num - first)
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + first + i)) for i in range(n)])
        x = x.to(device) * sched.init_noise_sigma
        sched.set_timesteps(nfe)
        for t in sched.timesteps:
            eps = unet(sched.scale_model_input(x, t), t).sample
            x = sched.step(eps, t, x).prev_sample
        out.append(x.clamp(-1, 1).float().cpu())
    return torch.cat(out)

