"""`make demo`: train the demo model on built-in shapes, sample a grid, and report what came out."""

from __future__ import annotations

import math
import time
from importlib import resources
from pathlib import Path
from typing import Any

import click

from difflab.data.images import to_pil_grid
from difflab.pipelines.diffusion import DiffusionPipeline
from difflab.training import load_config, train

DEMO_CONFIG = "demo.yaml"


def demo_config_path() -> Path:
    return Path(str(resources.files("difflab") / "configs" / DEMO_CONFIG))


def run_demo(out_dir: Path, *, steps: int | None = None, num_images: int = 64, sampler: str = "dpmpp_2m",
             sampling_steps: int = 20) -> dict[str, Any]:
    """Train (``steps`` overrides the config), sample ``num_images`` into ``out_dir/samples.png``, return the figures."""
    config = load_config(demo_config_path(), {"optim.steps": steps})
    started = time.perf_counter()
    result = train(config, out_dir)
    train_seconds = time.perf_counter() - started
    pipe = DiffusionPipeline.from_pretrained(out_dir)
    started = time.perf_counter()
    out = pipe(num_images=num_images, num_inference_steps=sampling_steps, sampler=sampler, seed=0)
    ms_per_image = 1000 * (time.perf_counter() - started) / num_images
    grid = out_dir / "samples.png"
    to_pil_grid(out.samples, nrow=int(math.ceil(math.sqrt(num_images)))).save(grid)
    return {"grid": grid, "train_seconds": train_seconds, "steps": result.step, "loss": result.loss,
            "ms_per_image": ms_per_image, "nfe": out.nfe, "samples": out.samples}


@click.command()
@click.option("--out", "out_dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--steps", type=int, default=None, help="Training steps.  [default: the demo config's]")
def demo(out_dir: str, steps: int | None) -> None:
    """Train a small model on the built-in shapes and write a grid of samples."""
    figures = run_demo(Path(out_dir), steps=steps)
    click.echo(f"trained {figures['steps']} steps in {figures['train_seconds']:.0f} s, final loss {figures['loss']:.4f}")
    click.echo(f"sampled with dpmpp_2m: {figures['nfe']} network evaluations, {figures['ms_per_image']:.0f} ms per image")
    click.echo(f"sample grid written to {figures['grid']}")
