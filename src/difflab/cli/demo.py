"""`make demo`: train a text-to-image model on the built-in shapes, draw a grid for a few prompts, score it.

The score is prompt adherence: a shapes oracle (:mod:`difflab.metrics.shapes_oracle`), trained on real
rendered shapes, reads the shape and colour of every generated image, and the demo reports how many
match their prompt, and how many put the shape where the prompt says, beside the oracle's own accuracy on
real images.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Any

import click
import torch

from difflab.data.images import to_pil_grid
from difflab.data.shapes_spec import parse_caption
from difflab.pipelines.diffusion import DiffusionPipeline
from difflab.recipes import train
from difflab.training import load_config

DEMO_CONFIG = "demo.yaml"
DEMO_PROMPTS = (
    "a large red circle in the center on a black background",
    "a large blue square in the top left on a white background",
    "a large yellow triangle in the bottom right on a gray background",
    "a small green circle in the top right on a black background",
    "a large magenta square in the bottom left on a green background",
    "a large cyan triangle in the center on a red background",
    "a small red square in the center on a white background",
    "a large green triangle in the top left on a blue background",
)


def demo_config_path() -> Path:
    return Path(str(resources.files("difflab") / "configs" / DEMO_CONFIG))


def prompt_adherence(samples: torch.Tensor, prompts: list[str], resolution: int) -> dict[str, float]:
    """Fraction of samples whose shape, colour, both, and position the shapes oracle reads as their prompt says."""
    from difflab.metrics.shapes_adherence import spec_adherence  # the oracle of the training previews, reused

    return spec_adherence(samples, [parse_caption(p) for p in prompts], resolution)


def run_demo(out_dir: Path, *, steps: int | None = None, per_prompt: int = 8, sampler: str = "dpmpp_2m",
             sampling_steps: int = 20, guidance_scale: float = 3.0,
             overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (``steps`` and dotted-key ``overrides`` change the config), sample a prompt-per-row grid into
    ``out_dir/samples.png``, score it."""
    config = load_config(demo_config_path(), {**(overrides or {}), "optim.steps": steps})
    started = time.perf_counter()
    result = train(config, out_dir)
    train_seconds = time.perf_counter() - started
    pipe = DiffusionPipeline.from_pretrained(out_dir)
    prompts = [p for p in DEMO_PROMPTS for _ in range(per_prompt)]
    started = time.perf_counter()
    out = pipe(num_images=len(prompts), num_inference_steps=sampling_steps, sampler=sampler, seed=0,
               prompt=prompts, guidance_scale=guidance_scale)
    ms_per_image = 1000 * (time.perf_counter() - started) / len(prompts)
    grid = out_dir / "samples.png"
    to_pil_grid(out.samples, nrow=per_prompt).save(grid)
    (out_dir / "prompts.txt").write_text("".join(f"row {i + 1}: {p}\n" for i, p in enumerate(DEMO_PROMPTS)))
    return {"grid": grid, "train_seconds": train_seconds, "steps": result.step, "loss": result.loss,
            "parameters": sum(p.numel() for p in pipe.unet.parameters()), "num_images": config.data.num_images,
            "ms_per_image": ms_per_image, "nfe": out.nfe, "sampler": sampler, "guidance_scale": guidance_scale,
            "adherence": prompt_adherence(out.samples, prompts, pipe.resolution)}


@click.command()
@click.option("--out", "out_dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--steps", type=int, default=None, help="Training steps.  [default: the demo config's]")
def demo(out_dir: str, steps: int | None) -> None:
    """Train a small text-to-image model on the built-in shapes and draw a grid for a few prompts."""
    f = run_demo(Path(out_dir), steps=steps)
    a = f["adherence"]
    click.echo(f"trained a {f['parameters'] / 1e6:.1f}M-parameter text-to-image UNet on {f['num_images']} captioned shapes: "
               f"{f['steps']} steps in {f['train_seconds']:.0f} s, final loss {f['loss']:.4f}")
    click.echo(f"sampled with {f['sampler']} (guidance {f['guidance_scale']:g}): {f['nfe']} network evaluations, "
               f"{f['ms_per_image']:.0f} ms per image")
    click.echo(f"prompt adherence: {100 * a['shape_and_color']:.0f}% of samples have their prompt's shape and colour "
               f"(shape {100 * a['shape']:.0f}%, colour {100 * a['color']:.0f}%), {100 * a['position']:.0f}% its position; "
               f"judged by an oracle that reads real shapes {100 * a['oracle_shape_accuracy']:.1f}%, colours "
               f"{100 * a['oracle_color_accuracy']:.1f}% and positions {100 * a['oracle_position_accuracy']:.1f}% right")
    click.echo(f"sample grid written to {f['grid']} (one prompt per row: {Path(out_dir) / 'prompts.txt'})")
