"""difflab's recipe and the shared FID for ``bench_time_to_quality.py``.

difflab trains through its own API: the config (``bench/configs/time_to_quality_<dataset>.yaml`` or
``--difflab-config``) goes to ``difflab.recipes.train`` with ``optim.time_limit_s`` where the config has
that key, else to ``build_diffusion_training`` with ``trainer.time_limit`` set; the exported folder is read
back with ``DiffusionPipeline.from_pretrained``. FID is difflab's reference-equal Inception FID
(``difflab.metrics.evaluate``: TF Inception-v3 pool3, clean-fid resize, grey repeated to RGB).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.training.config import OptimConfig, TrainConfig

TIME_LIMIT_KEY = "time_limit_s"  # optim.<key>, being added to difflab's config; used when present


def has_time_limit_key() -> bool:
    return TIME_LIMIT_KEY in {f.name for f in dataclasses.fields(OptimConfig)}


def training_images(config: TrainConfig) -> tuple[Any, Tensor]:
    """difflab's training dataset of ``config`` and its items' ``x`` stacked, (N, C, H, W) in [-1, 1]:
    exactly what difflab's trainer reads, handed to the diffusers loop too."""
    from difflab.recipes.diffusion import build_dataset_from_config

    if config.data.autoencoder or config.data.low_res_factor:
        raise SystemExit("error: the time-to-quality benchmark trains pixel models: drop data.autoencoder "
                         "and data.low_res_factor from --difflab-config")
    dataset, _ = build_dataset_from_config(config, Path("."), accelerator=None)
    return dataset, torch.stack([dataset[i]["x"] for i in range(len(dataset))])


def network_params(config: TrainConfig, dataset: Any) -> int:
    """Parameters of the network difflab builds for ``config`` (the size diffusers' UNet is matched to)."""
    from difflab.recipes.diffusion import build_conditioner, build_network, network_fields

    net = build_network(config.model, network_fields(config, dataset, build_conditioner(config, dataset)))
    return sum(p.numel() for p in net.parameters())


def train(config: TrainConfig, budget: float, out_dir: Path) -> dict[str, Any]:
    """Train ``config`` into ``out_dir`` for ``budget`` seconds of the training loop; the run's figures."""
    from difflab.pipelines.diffusion import DiffusionPipeline
    from difflab.training.checkpoint import list_checkpoints

    if has_time_limit_key():
        from difflab.recipes import train as recipe_train

        raw = config.to_dict()
        raw["optim"][TIME_LIMIT_KEY] = float(budget)
        result, how = recipe_train(TrainConfig.from_dict(raw), out_dir, progress=False), "recipes.train"
    else:
        from difflab.recipes.diffusion import build_diffusion_training

        trainer = build_diffusion_training(config, out_dir, progress=False)
        trainer.time_limit = float(budget)
        result, how = trainer.run(), "Trainer.time_limit"
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    rate = float([r for r in records if "images_per_second" in r][-1]["images_per_second"])  # last step, before the final save
    pipe = DiffusionPipeline.from_pretrained(out_dir)
    steps = [int(p.name.split("_")[1]) for p in list_checkpoints(out_dir)]
    return {"steps": int(result.step), "train_s": result.step * config.optim.batch_size / rate, "images_per_s": rate,
            "final_loss": float(result.loss), "params": sum(p.numel() for p in pipe.unet.parameters()),
            "snapshots": steps, "time_limit_via": how}


@torch.no_grad()
def sample(run_dir: Path, num: int, nfe: int, sampler: str, *, seed: int = 0, batch: int = 250,
           step: int | None = None, device: str = "cpu") -> Tensor:
    """``num`` images in [-1, 1] from the run's exported EMA model (or the EMA of its checkpoint at ``step``)."""
    from difflab.pipelines.diffusion import DiffusionPipeline
    from difflab.training.checkpoint import CHECKPOINTS, checkpoint_name, load_checkpoint

    pipe = DiffusionPipeline.from_pretrained(run_dir, device=device)
    if step is not None:
        tensors, _ = load_checkpoint(run_dir / CHECKPOINTS / checkpoint_name(step))
        pipe.unet.load_state_dict(tensors["ema"])
    out = pipe.in_batches(num, batch, seed=seed, num_inference_steps=nfe, sampler=sampler, progress=False)
    return out.samples.clamp(-1, 1)


def reference_stats(images: Tensor, cache_dir: Path, name: str, device: str = "cpu") -> tuple[Path, int]:
    """Inception statistics of the training images, computed once and cached as ``cache_dir/<name>_HxW_....npz``."""
    from difflab.metrics.features import InceptionExtractor
    from difflab.metrics.reference import cache_path, reference_records

    extractor = InceptionExtractor(device=device)
    record = reference_records(images, [extractor], cache_dir=cache_dir, name=name, value_range=(-1.0, 1.0),
                               progress=False)[0]
    return cache_path(cache_dir, name, f"{images.shape[-2]}x{images.shape[-1]}", extractor.name), record.count


def fid(samples: Tensor, reference: Path, device: str = "cpu") -> float:
    """FID of ``samples`` in [-1, 1] against the cached reference statistics."""
    from difflab.metrics.evaluation import evaluate

    result = evaluate(samples, ["fid"], reference=str(reference), value_range=(-1.0, 1.0), device=device,
                      progress=False)
    return float(result["metrics"]["fid"]["value"])
