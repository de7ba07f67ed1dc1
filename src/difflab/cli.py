"""The ``difflab`` command line: ``difflab train``, ``difflab sample`` (``python -m difflab`` is the same).

Every bad input ends in one line ``error: ...`` on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from difflab.errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="difflab")
def cli() -> None:
    """difflab: train, sample and measure diffusion models."""


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config file (keys: seed, data, model, schedule, objective, optim, log).")
@click.option("--dataset", help="shapes | digits | mnist | cifar10 | a folder of images.  [default: shapes]")
@click.option("--resolution", type=int, help="Image size in pixels (square).  [default: the dataset's]")
@click.option("--num-images", type=int, help="How many training images to use or generate.")
@click.option("--data-dir", help="Folder with the MNIST / CIFAR-10 files.  [default: $DIFFLAB_DATA_DIR]")
@click.option("--steps", type=int, help="Optimizer steps in total.  [default: 2000]")
@click.option("--batch-size", type=int, help="Global batch size.  [default: 32]")
@click.option("--lr", type=float, help="AdamW learning rate (after warm-up).  [default: 2e-4]")
@click.option("--seed", type=int, help="Seed of everything random.  [default: 0]")
@click.option("--parameterization", type=click.Choice(["eps", "x0", "v", "edm"]), help="What the network predicts (edm: Karras et al. 2022 preconditioning).  [default: eps]")
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
@click.option("--weighting", type=click.Choice(["uniform", "min_snr"]), help="Loss weighting over noise levels.  [default: uniform]")
@click.option("--num-processes", type=int, default=None, help="Train on N local processes (GPUs, or CPU processes with gloo).")
@click.option("--accelerate-config", type=click.Path(dir_okay=False), default=None, help="An `accelerate config` file to launch with (multi-node, FSDP, DeepSpeed); needs --num-processes.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder: model, checkpoints, samples, log.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train(config_path: str | None, out_dir: str, resume: bool, no_progress: bool, num_processes: int | None,
          accelerate_config: str | None, **flags: Any) -> None:
    """Train a diffusion model; Ctrl-C saves a checkpoint first."""
    from difflab.training import load_config, train as run_training
    from difflab.training.checkpoint import find_checkpoint, load_checkpoint

    if num_processes is not None or accelerate_config is not None:
        _relaunch(click.get_current_context(), num_processes, accelerate_config)

    keys = {"dataset": "data.dataset", "resolution": "data.resolution", "num_images": "data.num_images",
            "data_dir": "data.data_dir", "steps": "optim.steps", "batch_size": "optim.batch_size", "lr": "optim.lr",
            "seed": "seed", "parameterization": "objective.parameterization", "mixed_precision": "optim.mixed_precision",
            "learn_variance": "objective.learn_variance", "loss": "objective.loss", "timestep_sampling": "objective.timestep_sampling",
            "conditioning": "conditioning.kind", "cond_dropout": "conditioning.dropout", "text_encoder": "conditioning.text_encoder",
            "sample_every": "log.sample_every", "checkpoint_every": "log.checkpoint_every",
            "keep_checkpoints": "log.keep_checkpoints", "grad_accum_steps": "optim.grad_accum_steps",
            "autoencoder": "data.autoencoder", "weighting": "objective.weighting"}
    overrides = {keys[k]: v for k, v in flags.items() if v is not None}
    base = None
    existing = find_checkpoint(Path(out_dir)) if resume and Path(out_dir).is_dir() else None
    if existing and config_path is None:
        base = load_checkpoint(existing)[1]["config"]
    config = load_config(config_path, overrides, base=base)
    started = time.perf_counter()
    result = run_training(config, out_dir, resume=resume, progress=not no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # one report per run, from the main process
        return
    click.echo(f"trained {result.step} steps in {time.perf_counter() - started:.0f} s "
               f"(final loss {result.loss:.4f}, {result.images_per_second:.1f} images/s)")
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


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(), help="A model folder written by `difflab train --out`, or a text-to-image folder with model_index.json (difflab or diffusers / Stable Diffusion format).")
@click.option("--sampler", default=None, help="Sampler name (see `difflab samplers`).  [default: the model's, ddim; dpmpp_2m for text-to-image folders]")
@click.option("--steps", type=int, default=50, show_default=True, help="Sampling steps.")
@click.option("--num-images", type=int, default=16, show_default=True, help="Images to generate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Image i uses seed SEED + i, whatever the batch.")
@click.option("--eta", type=float, default=None, help="DDIM stochasticity in [0, 1] (0: deterministic).")
@click.option("--class-label", default=None, help="Class of every image: an index or a class name (class-conditional models).")
@click.option("--prompt", default=None, help="Text prompt (text-conditional models).")
@click.option("--negative-prompt", default=None, help="What to steer away from (replaces the empty prompt in guidance).")
@click.option("--guidance-scale", type=float, default=None, help="Classifier-free guidance w (1: plain conditional).  [default: 1; 7.5 for text-to-image folders]")
@click.option("--guidance-rescale", type=float, default=0.0, show_default=True, help="Guidance rescale phi in [0, 1] (Lin et al. 2023).")
@click.option("--classifier", "classifier_dir", default=None, type=click.Path(), help="A noise-aware classifier folder (from `difflab train-classifier`) for classifier guidance.")
@click.option("--classifier-scale", type=float, default=1.0, show_default=True, help="Classifier-guidance gradient scale s.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per forward pass.")
@click.option("--out", "out_path", default="grid.png", show_default=True, type=click.Path(dir_okay=False), help="PNG grid to write.")
@click.option("--height", type=int, default=None, help="Image height in pixels (text-to-image folders).  [default: the model's]")
@click.option("--width", type=int, default=None, help="Image width in pixels (text-to-image folders).  [default: the model's]")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None, help="Network precision (text-to-image folders; float16 needs a GPU).  [default: float32]")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def sample(model_dir: str, sampler: str | None, steps: int, num_images: int, seed: int, eta: float | None,
           class_label: str | None, prompt: str | None, negative_prompt: str | None, guidance_scale: float | None,
           guidance_rescale: float, classifier_dir: str | None, classifier_scale: float, batch_size: int, out_path: str,
           height: int | None, width: int | None, dtype: str | None, device: str, no_progress: bool) -> None:
    """Sample images from a trained model into a PNG grid."""
    from difflab.pipelines.diffusion import DiffusionPipeline
    from difflab.pipelines.model_dir import ensure_writable_file

    if num_images < 1 or batch_size < 1:
        raise UserError(f"--num-images and --batch-size must be >= 1, got {num_images} and {batch_size}")
    out = ensure_writable_file(Path(out_path))
    if (Path(model_dir) / "model_index.json").is_file():
        if class_label is not None or classifier_dir is not None:
            raise UserError("--class-label and --classifier apply to difflab class-conditional models, not text-to-image folders")
        started = time.perf_counter()
        samples, nfe, sampler = _sample_text2image(model_dir, device, dtype, num_images, batch_size, seed=seed, prompt=prompt,
                                                   negative_prompt=negative_prompt, height=height, width=width, eta=eta,
                                                   num_inference_steps=steps, sampler=sampler or "dpmpp_2m",
                                                   guidance_scale=7.5 if guidance_scale is None else guidance_scale,
                                                   guidance_rescale=guidance_rescale, progress=not no_progress)
        _write_grid(samples, out, sampler, nfe, time.perf_counter() - started)
        return
    if height is not None or width is not None or dtype is not None:
        raise UserError("--height, --width and --dtype apply to text-to-image folders (with model_index.json); "
                        "a difflab model samples at its trained resolution in float32")
    guidance_scale = 1.0 if guidance_scale is None else guidance_scale
    pipe = DiffusionPipeline.from_pretrained(model_dir, device=device)
    classifier = None
    if classifier_dir is not None:
        from difflab.nets.classifier import NoisyClassifier

        classifier = NoisyClassifier.from_pretrained(classifier_dir, device=device)
    started = time.perf_counter()
    label = int(class_label) if class_label is not None and class_label.lstrip("-").isdigit() else class_label
    result = pipe.in_batches(num_images, batch_size, seed=seed, num_inference_steps=steps, sampler=sampler, eta=eta,
                             progress=not no_progress, class_labels=label, prompt=prompt, negative_prompt=negative_prompt,
                             guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, classifier=classifier,
                             classifier_scale=classifier_scale)
    _write_grid(result.samples, out, sampler or pipe.sampler, result.nfe, time.perf_counter() - started)


def _sample_text2image(model_dir: str, device: str, dtype: str | None, num_images: int, batch_size: int,
                       **kwargs: Any) -> tuple[Any, int, str]:
    """``difflab sample`` for a text-to-image folder: (samples in [-1, 1], NFE per image, sampler name)."""
    from difflab.pipelines.text2image import Text2ImagePipeline

    if kwargs["prompt"] is None:
        raise UserError("a text-to-image model needs --prompt \"...\" (use --prompt \"\" for unconditional samples)")
    pipe = Text2ImagePipeline.from_pretrained(model_dir, torch_dtype=dtype, device=device)
    result = pipe.in_batches(num_images, batch_size, **kwargs)
    return result.samples, result.nfe, kwargs["sampler"]


def _write_grid(samples: Any, out: Path, sampler: str, nfe: int, elapsed: float) -> None:
    from difflab.data.images import to_pil_grid

    num_images = len(samples)
    to_pil_grid(samples, nrow=math.ceil(math.sqrt(num_images))).save(out)
    click.echo(f"wrote {num_images} samples to {out} ({sampler}, {nfe} network evaluations per image, "
               f"{1000 * elapsed / num_images:.0f} ms per image)")


@cli.command("train-classifier")
@click.option("--dataset", default="shapes", show_default=True, help="A labelled dataset: shapes, digits, mnist, cifar10 or a folder with class subfolders.")
@click.option("--resolution", type=int, default=None, help="Image size (must match the diffusion model's).")
@click.option("--num-images", type=int, default=None, help="How many training images.")
@click.option("--data-dir", default=None, help="Folder with the MNIST / CIFAR-10 files.")
@click.option("--schedule", "schedule_kind", type=click.Choice(["linear", "cosine", "quadratic"]), default="linear", show_default=True, help="Noise schedule of the diffusion model to guide.")
@click.option("--num-timesteps", type=int, default=1000, show_default=True, help="T of that schedule.")
@click.option("--model", "model_dir", default=None, type=click.Path(), help="Take the schedule from this diffusion model folder instead.")
@click.option("--steps", type=int, default=2000, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Batch size.")
@click.option("--lr", type=float, default=3e-4, show_default=True, help="AdamW learning rate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of everything random.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder for the classifier.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_classifier_cmd(dataset: str, resolution: int | None, num_images: int | None, data_dir: str | None,
                         schedule_kind: str, num_timesteps: int, model_dir: str | None, steps: int, batch_size: int,
                         lr: float, seed: int, out_dir: str, no_progress: bool) -> None:
    """Train a noise-aware classifier p(y | x_t, t) for classifier guidance."""
    from difflab.pipelines.model_dir import read_model_dir
    from difflab.training.classifier import train_classifier

    schedule = {"kind": schedule_kind, "num_timesteps": num_timesteps}
    if model_dir is not None:
        schedule = read_model_dir(Path(model_dir))[0]["schedule"]
    result = train_classifier(dataset, schedule, out_dir, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                              resolution=resolution, data_dir=data_dir, num_images=num_images, progress=not no_progress)
    click.echo(f"trained the classifier for {result.step} steps (final loss {result.loss:.4f}); written to {result.out_dir}")


@cli.command()
def samplers() -> None:
    """List the samplers and their options."""
    from difflab.samplers import sampler_names, sampler_options

    for name in sampler_names():
        opts = ", ".join(f"{k}={v!r}" for k, v in sampler_options(name).items())
        click.echo(f"{name:16s} {opts}")


def _register_commands() -> None:
    from difflab.autoencoder_cli import train_autoencoder_command
    from difflab.demo import demo
    from difflab.ema_cli import ema_command
    from difflab.evaluate_cli import eval_command

    cli.add_command(demo)
    cli.add_command(train_autoencoder_command)
    cli.add_command(eval_command)
    cli.add_command(ema_command)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning user errors into one line and exit status 2."""
    from difflab.training import TrainingInterrupted

    try:
        cli.main(args=argv, prog_name="difflab", standalone_mode=False)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except TrainingInterrupted as err:
        click.echo(f"stopped: {err}", err=True)
        sys.exit(130)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
