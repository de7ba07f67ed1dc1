"""``difflab sample``: sample a difflab model or a text-to-image folder into a PNG grid."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from difflab.errors import UserError

@click.command()
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
@click.option("--out", "out_path", default="grid.png", show_default=True, type=click.Path(dir_okay=False), help="Output file: a PNG grid for images, or .safetensors (any modality; .npy for tensors).")
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
    from difflab.io.files import ensure_writable_file
    from difflab.io.pipeline_folder import INDEX_NAME, read_index
    from difflab.pipelines.diffusion import DiffusionPipeline

    if num_images < 1 or batch_size < 1:
        raise UserError(f"--num-images and --batch-size must be >= 1, got {num_images} and {batch_size}")
    out = ensure_writable_file(Path(out_path))
    index = Path(model_dir) / INDEX_NAME
    if index.is_file() and read_index(model_dir)["_class_name"] == "CascadePipeline":  # every stage at --steps
        from difflab.pipelines.cascade import CascadePipeline

        started = time.perf_counter()
        cascade = CascadePipeline.from_pretrained(model_dir, device)
        label = parse_class_label(class_label)
        options = [{"num_inference_steps": steps, **({"sampler": sampler} if sampler else {}),
                    **({"guidance_scale": guidance_scale} if guidance_scale is not None and k == 0 else {})}
                   for k in range(len(cascade.stages))]
        outs = cascade.run_stages(num_images, seed=seed, progress=not no_progress, class_labels=label, prompt=prompt,
                                  negative_prompt=negative_prompt, stage_options=options)
        _write_samples(outs[-1].samples, "image", out, sampler or "each stage's own", sum(o.nfe for o in outs),
                       time.perf_counter() - started)  # evaluations of all stages together
        return
    if index.is_file() and read_index(model_dir)["_class_name"] != "DiffusionPipeline":  # a text-to-image folder
        if class_label is not None or classifier_dir is not None:
            raise UserError("--class-label and --classifier apply to difflab class-conditional models, not text-to-image folders")
        started = time.perf_counter()
        samples, nfe, sampler = _sample_text2image(model_dir, device, dtype, num_images, batch_size, seed=seed, prompt=prompt,
                                                   negative_prompt=negative_prompt, height=height, width=width, eta=eta,
                                                   num_inference_steps=steps, sampler=sampler or "dpmpp_2m",
                                                   guidance_scale=7.5 if guidance_scale is None else guidance_scale,
                                                   guidance_rescale=guidance_rescale, progress=not no_progress)
        _write_samples(samples, "image", out, sampler, nfe, time.perf_counter() - started)
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
    label = parse_class_label(class_label)
    result = pipe.in_batches(num_images, batch_size, seed=seed, num_inference_steps=steps, sampler=sampler, eta=eta,
                             progress=not no_progress, class_labels=label, prompt=prompt, negative_prompt=negative_prompt,
                             guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, classifier=classifier,
                             classifier_scale=classifier_scale)
    _write_samples(result.samples, pipe.modality, out, sampler or pipe.sampler, result.nfe, time.perf_counter() - started)


def parse_class_label(class_label: str | None) -> Any:
    """``--class-label``: an int index when it is one, else the class name as given (None: none)."""
    return int(class_label) if class_label is not None and class_label.lstrip("-").isdigit() else class_label


def _sample_text2image(model_dir: str, device: str, dtype: str | None, num_images: int, batch_size: int,
                       **kwargs: Any) -> tuple[Any, int, str]:
    """``difflab sample`` for a text-to-image folder: (samples in [-1, 1], NFE per image, sampler name)."""
    from difflab.pipelines.text2image import Text2ImagePipeline

    if kwargs["prompt"] is None:
        raise UserError("a text-to-image model needs --prompt \"...\" (use --prompt \"\" for unconditional samples)")
    pipe = Text2ImagePipeline.from_pretrained(model_dir, torch_dtype=dtype, device=device)
    result = pipe.in_batches(num_images, batch_size, **kwargs)
    return result.samples, result.nfe, kwargs["sampler"]


def _write_samples(samples: Any, modality: str, out: Path, sampler: str, nfe: int, elapsed: float) -> None:
    """Write the samples as their modality does (images: a PNG grid; any modality: .safetensors)."""
    from difflab.modalities import get_modality

    num_images = len(samples)
    get_modality(modality).save(samples, out)
    click.echo(f"wrote {num_images} samples to {out} ({sampler}, {nfe} network evaluations per sample, "
               f"{1000 * elapsed / num_images:.0f} ms per sample)")
