"""``difflab train-autoencoder``: train the KL autoencoder of latent diffusion on a dataset.

The training itself is :func:`difflab.training.autoencoder.train_autoencoder`; this module maps flags
to its arguments.
"""

from __future__ import annotations

import time

import click

from difflab.errors import UserError

FACTOR_MULTS = {4: (1, 2, 2), 8: (1, 2, 2, 4)}  # channel_mults per downsampling factor (2 ** (levels - 1))


@click.command("train-autoencoder")
@click.option("--dataset", default="shapes", show_default=True, help="shapes | digits | mnist | cifar10 | a folder of images.")
@click.option("--resolution", type=int, default=None, help="Image size in pixels (square, a multiple of --factor).  [default: the dataset's]")
@click.option("--num-images", type=int, default=None, help="How many training images to use or generate.")
@click.option("--data-dir", default=None, help="Folder with the MNIST / CIFAR-10 files.  [default: $DIFFLAB_DATA_DIR]")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder: config.json, model.safetensors, checkpoints, log.")
@click.option("--steps", type=int, default=2000, show_default=True, help="Optimizer steps in total.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Batch size.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Adam learning rate (betas 0.5, 0.9).")
@click.option("--latent-channels", type=int, default=4, show_default=True, help="Channels of the latent z.")
@click.option("--factor", type=click.Choice(["4", "8"]), default="4", show_default=True, help="Spatial downsampling factor f (latent is H/f x W/f).")
@click.option("--base-channels", type=int, default=64, show_default=True, help="Channels at full resolution.")
@click.option("--kl-weight", type=float, default=1e-6, show_default=True, help="Weight of KL(q(z|x) || N(0, I)) (LDM's convention).")
@click.option("--perceptual-weight", type=float, default=1.0, show_default=True, help="Weight of the Laplacian-pyramid L1 term.")
@click.option("--gan-start", type=int, default=None, help="Step from which the patch-GAN loss is on.  [default: no GAN]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of everything random.")
@click.option("--checkpoint-every", type=int, default=0, show_default=True, help="Steps between checkpoints (0: only at the end).")
@click.option("--resume", is_flag=True, help="Continue the run in --out where it stopped.")
@click.option("--device", default=None, help="torch device.  [default: cuda if available, else cpu]")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_autoencoder_command(dataset: str, resolution: int | None, num_images: int | None, data_dir: str | None,
                              out_dir: str, steps: int, batch_size: int, lr: float, latent_channels: int, factor: str,
                              base_channels: int, kl_weight: float, perceptual_weight: float, gan_start: int | None,
                              seed: int, checkpoint_every: int, resume: bool, device: str | None,
                              no_progress: bool) -> None:
    """Train a KL autoencoder (Rombach et al. 2022) for latent diffusion."""
    from difflab.training.autoencoder import train_autoencoder

    if gan_start is not None and gan_start < 0:
        raise UserError(f"--gan-start must be >= 0, got {gan_start}; omit it to train without the GAN")
    config = {"latent_channels": latent_channels, "channel_mults": FACTOR_MULTS[int(factor)], "base_channels": base_channels}
    started = time.perf_counter()
    result = train_autoencoder(dataset, out_dir, config, steps=steps, batch_size=batch_size, lr=lr, kl_weight=kl_weight,
                               perceptual_weight=perceptual_weight, gan_start=gan_start, seed=seed,
                               resolution=resolution, data_dir=data_dir, num_images=num_images,
                               checkpoint_every=checkpoint_every, resume=resume, device=device,
                               progress=not no_progress)
    if result.note:
        click.echo(result.note)
        return
    click.echo(f"trained {result.step} steps in {time.perf_counter() - started:.0f} s (L1 {result.l1:.4f}, "
               f"KL {result.kl:.1f}); scaling factor {result.scaling_factor:.4f}; written to {result.out_dir}")
