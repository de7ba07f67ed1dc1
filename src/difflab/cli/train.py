"""``difflab train``: train a diffusion model from a config and flags (``--num-processes N`` relaunches itself
on N processes, see :mod:`difflab.training.distributed`)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import click

from difflab.errors import UserError

# Each flag's config key; the flags' "[default: X]" texts are TrainConfig's defaults (tests/test_cli.py checks).
FLAG_KEYS: dict[str, str] = {
    "dataset": "data.dataset", "resolution": "data.resolution", "num_images": "data.num_images",
    "data_dir": "data.data_dir", "autoencoder": "data.autoencoder", "seed": "seed", "task": "task",
    "scale": "data.low_res_factor", "noise_aug": "conditioning.concat_noise_aug",
    "steps": "optim.steps", "time_limit": "optim.time_limit_s", "batch_size": "optim.batch_size", "lr": "optim.lr",
    "mixed_precision": "optim.mixed_precision", "grad_accum_steps": "optim.grad_accum_steps",
    "parameterization": "objective.parameterization", "learn_variance": "objective.learn_variance",
    "loss": "objective.loss", "timestep_sampling": "objective.timestep_sampling", "weighting": "objective.weighting",
    "conditioning": "conditioning.kind", "cond_dropout": "conditioning.dropout", "text_encoder": "conditioning.text_encoder",
    "sample_every": "log.sample_every", "checkpoint_every": "log.checkpoint_every", "keep_checkpoints": "log.keep_checkpoints",
}


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config file (keys: seed, data, model, schedule, objective, optim, log).")
@click.option("--dataset", help="shapes | digits | mnist | cifar10 | a folder of images.  [default: shapes]")
@click.option("--resolution", type=int, help="Image size in pixels (square).  [default: the dataset's]")
@click.option("--num-images", type=int, help="How many training images to use or generate.")
@click.option("--data-dir", help="Folder with the MNIST / CIFAR-10 files.  [default: $DIFFLAB_DATA_DIR]")
@click.option("--steps", type=int, help="Optimizer steps in total.  [default: 2000]")
@click.option("--time-limit", type=float, metavar="SECONDS", help="Stop (and save) after this many seconds of training, even before --steps.  [default: none]")
@click.option("--batch-size", type=int, help="Global batch size.  [default: 32]")
@click.option("--lr", type=float, help="AdamW learning rate (after warm-up).  [default: 0.001]")
@click.option("--seed", type=int, help="Seed of everything random.  [default: 0]")
@click.option("--parameterization", type=click.Choice(["eps", "x0", "v", "edm"]), help="What the network predicts (edm: Karras et al. 2022 preconditioning).  [default: v]")
@click.option("--learn-variance/--fixed-variance", default=None, help="Also learn the reverse-process variance (Nichol & Dhariwal 2021).  [default: fixed]")
@click.option("--loss", type=click.Choice(["simple", "hybrid", "vlb"]), help="simple (Ho et al.), hybrid = simple + 0.001 VLB or vlb (learned variance for hybrid).  [default: simple]")
@click.option("--timestep-sampling", type=click.Choice(["uniform", "importance", "lognormal"]), help="Draw t uniformly, by VLB importance sampling (loss vlb or hybrid) or log-normal in noise level (EDM).  [default: uniform]")
@click.option("--conditioning", type=click.Choice(["none", "class", "text"]), help="Train unconditional, on class labels or on captions.  [default: none]")
@click.option("--cond-dropout", type=float, help="Probability of the null condition in training (for classifier-free guidance).  [default: 0.1]")
@click.option("--text-encoder", help="minilm (bundled), clip:/dir, t5:/dir, bert:/dir or a model folder.  [default: minilm]")
@click.option("--mixed-precision", type=click.Choice(["auto", "no", "fp16", "bf16"]), help="Autocast precision; auto is bf16 on a GPU that supports it, else none.  [default: auto]")
@click.option("--sample-every", type=int, help="Steps between sample grids in OUT/samples (0: never).  [default: 500]")
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints (0: only at the end).  [default: 500]")
@click.option("--autoencoder", help="A `difflab train-autoencoder` folder: train a latent diffusion model on its latents.")
@click.option("--grad-accum-steps", type=int, help="Micro-batches per optimizer step (same result, less memory).  [default: 1]")
@click.option("--keep-checkpoints", type=int, help="Newest checkpoints kept in OUT/checkpoints.  [default: 3]")
@click.option("--weighting", type=click.Choice(["uniform", "min_snr", "min_snr_v"]), help="Loss weighting over noise levels (auto: min_snr, or uniform with --loss vlb).  [default: auto]")
@click.option("--task", type=click.Choice(["generation", "super-resolution", "inpaint"]), help="What the model learns: plain generation, super-resolution (SR3) of --scale-times downsampled copies, or inpainting of randomly masked pictures (Palette).  [default: generation]")
@click.option("--scale", type=int, help="Super-resolution factor (2, 4, ...): the low-resolution input is the image area-downsampled by it.")
@click.option("--noise-aug", type=float, help="Largest noise-conditioning augmentation level of the low-resolution input in training, in [0, 1] (CDM; default 0.2 for super-resolution).")
@click.option("--num-processes", type=int, default=None, help="Train on N local processes (GPUs, or CPU processes with gloo).")
@click.option("--accelerate-config", type=click.Path(dir_okay=False), default=None, help="An `accelerate config` file to launch with (multi-node, FSDP, DeepSpeed); needs --num-processes.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder: model, checkpoints, samples, log.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train(config_path: str | None, out_dir: str, resume: bool, no_progress: bool, num_processes: int | None,
          accelerate_config: str | None, **flags: Any) -> None:
    """Train a diffusion model; Ctrl-C saves a checkpoint first."""
    from difflab.recipes import saved_config, train as run_training
    from difflab.training import load_config

    if num_processes is not None or accelerate_config is not None:
        _relaunch(click.get_current_context(), num_processes, accelerate_config)

    overrides = {FLAG_KEYS[k]: v for k, v in flags.items() if v is not None}
    base = saved_config(out_dir) if resume and config_path is None else None
    config = load_config(config_path, overrides, base=base)
    started = time.perf_counter()
    result = run_training(config, out_dir, resume=resume, progress=not no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # one report per run, from the main process
        return
    if result.note:  # resuming a finished run: nothing trained, nothing written
        click.echo(result.note)
        return
    click.echo(f"trained {result.step} steps in {time.perf_counter() - started:.0f} s "
               f"(final loss {result.loss:.4f}, {result.images_per_second:.1f} images/s)")
    if config.optim.time_limit_s is not None and result.step < config.optim.steps:
        click.echo(f"stopped by the time limit ({config.optim.time_limit_s:g} s) at step {result.step} of "
                   f"{config.optim.steps}; continue with --resume")
    click.echo(f"model written to {result.out_dir} (sample it with: difflab sample --model {result.out_dir})")


def _relaunch(ctx: click.Context, num_processes: int | None, accelerate_config: str | None) -> None:
    """Run this same ``train`` command on several processes (see :mod:`difflab.training.distributed`), then exit."""
    from difflab.training.distributed import launch

    if num_processes is None:
        raise UserError("--accelerate-config needs --num-processes N (the processes to start on this machine)")
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in ("num_processes", "accelerate_config") or value is None:
            continue
        if isinstance(param, click.Option) and param.is_flag:  # --flag, or --no-flag of an on/off pair
            args += [param.opts[-1]] if value else param.secondary_opts[-1:]
        else:
            args += [param.opts[-1], str(value)]
    sys.exit(launch(args, num_processes, accelerate_config))
