"""``difflab inpaint``, ``difflab outpaint`` and ``difflab img2img``: edit pictures with a trained model folder
(:mod:`difflab.pipelines.edit`). Masks: white = fill, black = keep."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from difflab.errors import UserError


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--model", "model_dir", required=True, type=click.Path(), help="A model folder written by `difflab train --out`."),
        click.option("--image", "image_path", required=True, type=click.Path(), help="The input picture (PNG or JPEG)."),
        click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Output PNG."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noise."),
        click.option("--class-label", default=None, help="Class (index or name) for a class-conditional model."),
        click.option("--prompt", default=None, help="Text prompt for a text-conditional model."),
        click.option("--guidance-scale", type=float, default=1.0, show_default=True, help="Classifier-free guidance w."),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _inpaint_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--method", type=click.Choice(["repaint", "replacement", "trained"]), default=None,
                     help="RePaint (Lugmayr et al. 2022), plain replacement, or a --task inpaint model's own conditional "
                     "sampling.  [default: trained for an inpainting model, else repaint]"),
        click.option("--steps", type=int, default=250, show_default=True, help="Sampling steps (the paper: 250)."),
        click.option("--jump", type=int, default=10, show_default=True, help="RePaint jump length j."),
        click.option("--resample", type=int, default=10, show_default=True, help="RePaint resamplings r (1: none)."),
        click.option("--sampler", default=None, help="ddpm or ddim for RePaint; any sampler otherwise.  [default: ddpm; the model's for trained]"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _text2image(model_dir: str, prompt: str | None) -> Any:
    """A Text2ImagePipeline for a text-to-image folder (difflab or Stable-Diffusion diffusers), else None."""
    from difflab.io.pipeline_folder import INDEX_NAME, read_index

    if not (Path(model_dir) / INDEX_NAME).is_file() or read_index(model_dir)["_class_name"] == "DiffusionPipeline":
        return None
    if prompt is None:
        raise UserError('a text-to-image model needs --prompt "..." (use --prompt "" for none)')
    from difflab.pipelines.text2image import Text2ImagePipeline

    return Text2ImagePipeline.from_pretrained(model_dir)


def _load(kind: str, model_dir: str) -> Any:
    from difflab.pipelines.edit import Img2ImgPipeline, InpaintPipeline

    return {"inpaint": InpaintPipeline, "img2img": Img2ImgPipeline}[kind].from_pretrained(model_dir)


def _conditions(class_label: str | None, prompt: str | None, guidance_scale: float) -> dict[str, Any]:
    from difflab.cli.sample import parse_class_label

    return {"class_labels": parse_class_label(class_label), "prompt": prompt, "guidance_scale": guidance_scale}


def _write(out: Any, out_path: str, what: str, started: float) -> None:
    from difflab.io.files import ensure_writable_file

    path = ensure_writable_file(Path(out_path))
    out.images[0].save(path)
    click.echo(f"{what}: {out.nfe} network evaluations in {time.perf_counter() - started:.1f} s; wrote {path}")


@click.command()
@_common
@click.option("--mask", "mask_path", required=True, type=click.Path(), help="Mask PNG of the image's size: white = fill, black = keep.")
@_inpaint_options
def inpaint_command(model_dir: str, image_path: str, out_path: str, seed: int, class_label: str | None, prompt: str | None,
                    guidance_scale: float, no_progress: bool, mask_path: str, method: str | None, steps: int, jump: int,
                    resample: int, sampler: str | None) -> None:
    """Fill the white part of a mask in a picture with a trained model (RePaint or replacement)."""
    started = time.perf_counter()
    sd = _text2image(model_dir, prompt)
    if sd is not None:
        out = sd.inpaint(image_path, mask_path, prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                         method=method or "repaint", jump=jump, resample=resample, sampler=sampler or "ddpm",
                         generator=[_seeded(seed)], progress=not no_progress)
        return _write(out, out_path, f"inpainted ({method or 'repaint'})", started)
    pipe = _load("inpaint", model_dir)
    method = method or pipe.default_method
    out = pipe(image_path, mask_path, steps, method, jump, resample, sampler, seed=seed, progress=not no_progress,
               **_conditions(class_label, prompt, guidance_scale))
    _write(out, out_path, f"inpainted ({method})", started)


def _seeded(seed: int) -> Any:
    import torch

    return torch.Generator().manual_seed(seed)


@click.command()
@_common
@click.option("--pad", required=True, help="Pixels to add: ALL, or H,V, or L,T,R,B (e.g. 0,0,16,0 extends to the right).")
@click.option("--tile", is_flag=True, help="Extend by repeated windows of the model's size (any length; the other side must be the model's).")
@_inpaint_options
def outpaint_command(model_dir: str, image_path: str, out_path: str, seed: int, class_label: str | None, prompt: str | None,
                     guidance_scale: float, no_progress: bool, pad: str, tile: bool, method: str | None, steps: int, jump: int,
                     resample: int, sampler: str | None) -> None:
    """Extend a picture by a border that a trained model fills (outpainting)."""
    try:
        sides = [int(p) for p in pad.split(",")]
    except ValueError:
        raise UserError(f"--pad {pad!r} is invalid; give ALL, or H,V, or L,T,R,B in pixels, e.g. 0,0,16,0") from None
    started = time.perf_counter()
    pipe = _load("inpaint", model_dir)
    method = method or pipe.default_method
    out = pipe.outpaint(image_path, sides, tile=tile, num_inference_steps=steps, method=method, jump=jump, resample=resample,
                        sampler=sampler, seed=seed, progress=not no_progress, **_conditions(class_label, prompt, guidance_scale))
    _write(out, out_path, f"outpainted ({method})", started)


@click.command()
@_common
@click.option("--strength", type=float, default=0.6, show_default=True, help="How far to noise the input, in (0, 1] (1: ignore it).")
@click.option("--steps", type=int, default=50, show_default=True, help="Steps of the full grid; round(strength * steps) run.")
@click.option("--sampler", default=None, help="Any sampler (see `difflab samplers`).  [default: the model's]")
def img2img_command(model_dir: str, image_path: str, out_path: str, seed: int, class_label: str | None, prompt: str | None,
                    guidance_scale: float, no_progress: bool, strength: float, steps: int, sampler: str | None) -> None:
    """Redraw a picture with a trained model: SDEdit image-to-image (Meng et al. 2022)."""
    started = time.perf_counter()
    sd = _text2image(model_dir, prompt)
    if sd is not None:
        out = sd.img2img(image_path, prompt, strength, num_inference_steps=steps, guidance_scale=guidance_scale,
                         sampler=sampler or "dpmpp_2m", generator=[_seeded(seed)], progress=not no_progress)
        return _write(out, out_path, f"img2img (strength {strength:g})", started)
    out = _load("img2img", model_dir)(image_path, strength, steps, sampler, seed=seed, progress=not no_progress,
                                      **_conditions(class_label, prompt, guidance_scale))
    _write(out, out_path, f"img2img (strength {strength:g})", started)


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(), help="A folder from `difflab train --task super-resolution`.")
@click.option("--image", "image_path", required=True, type=click.Path(), help="The low-resolution picture (PNG or JPEG).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Output PNG.")
@click.option("--steps", type=int, default=50, show_default=True, help="Sampling steps.")
@click.option("--sampler", default=None, help="Any sampler (see `difflab samplers`).  [default: the model's]")
@click.option("--aug-level", type=float, default=0.0, show_default=True, help="Noise augmentation of the input at sampling, in [0, 1].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noise.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def upscale_command(model_dir: str, image_path: str, out_path: str, steps: int, sampler: str | None, aug_level: float,
                    seed: int, no_progress: bool) -> None:
    """Upscale a picture with a super-resolution model (SR3)."""
    from difflab.pipelines.upscale import UpscalePipeline

    started = time.perf_counter()
    pipe = UpscalePipeline.from_pretrained(model_dir)
    out = pipe(image_path, steps, sampler, seed=seed, aug_level=aug_level, progress=not no_progress)
    _write(out, out_path, f"upscaled x{pipe.scale}", started)
