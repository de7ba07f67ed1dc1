"""``difflab train-classifier``: a noise-aware classifier p(y | x_t, t) for classifier guidance."""

from __future__ import annotations

from pathlib import Path

import click

@click.command("train-classifier")
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
@click.option("--checkpoint-every", type=int, default=0, show_default=True, help="Steps between checkpoints (0: only at the end and on Ctrl-C).")
@click.option("--resume", is_flag=True, help="Continue the run in --out where it stopped.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_classifier_cmd(dataset: str, resolution: int | None, num_images: int | None, data_dir: str | None,
                         schedule_kind: str, num_timesteps: int, model_dir: str | None, steps: int, batch_size: int,
                         lr: float, seed: int, out_dir: str, checkpoint_every: int, resume: bool, no_progress: bool) -> None:
    """Train a noise-aware classifier p(y | x_t, t) for classifier guidance."""
    from difflab.pipelines.diffusion_io import read_settings
    from difflab.training.classifier import train_classifier

    schedule = {"kind": schedule_kind, "num_timesteps": num_timesteps}
    if model_dir is not None:
        schedule = read_settings(Path(model_dir))["schedule"]
    result = train_classifier(dataset, schedule, out_dir, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                              resolution=resolution, data_dir=data_dir, num_images=num_images, progress=not no_progress,
                              resume=resume, checkpoint_every=checkpoint_every)
    if result.note:
        click.echo(result.note)
        return
    click.echo(f"trained the classifier for {result.step} steps (final loss {result.loss:.4f}); written to {result.out_dir}")
