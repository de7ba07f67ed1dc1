"""Train a noise-aware classifier p_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, sec. 4).

Each step draws a batch (x_0, y), a time t ~ Uniform{0, ..., T-1} and noise, forms
x_t ~ q(x_t | x_0) (:func:`difflab.process.q_sample`) and minimises the cross-entropy
``-log p_phi(y | x_t, t)`` (:class:`~difflab.training.objectives.noisy_classifier.NoisyClassifierObjective`)
in one :class:`~difflab.training.Trainer` run. Randomness is a pure function of (seed, step), as in the
diffusion trainer: the data order (epoch-wise permutations), times and noise of step k.

>>> from difflab.schedules import NoiseSchedule
>>> res = train_classifier("digits", NoiseSchedule.linear(100), "runs/clf", steps=10, resolution=8,
...                        model={"base_channels": 16, "channel_mults": [1, 2]}, progress=False)  # doctest: +SKIP
>>> clf = NoisyClassifier.from_pretrained("runs/clf")                                               # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.data import build_dataset
from difflab.errors import UserError
from difflab.nets.classifier import ClassifierConfig, NoisyClassifier
from difflab.noise import seeded_generator
from difflab.process import q_sample
from difflab.schedules import NoiseSchedule
from difflab.training.objectives.noisy_classifier import NoisyClassifierObjective
from difflab.training.runs import fit, run_accelerator, run_config
from difflab.training.trainer import Trainer


@dataclass
class ClassifierTrainResult:
    step: int
    loss: float  # exponential moving average of the training loss
    accuracy: float  # moving average of the training accuracy (over all noise levels)
    out_dir: Path
    note: str | None = None  # set when nothing was trained (resuming a finished run)


def _check_positive(name: str, value: Any, kind: type = int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
        raise UserError(f"{name} must be a positive {'number' if kind is float else 'integer'}, got {value!r}")


def _build_model(dataset: Any, model: ClassifierConfig | dict[str, Any] | None, seed: int) -> NoisyClassifier:
    num_classes = getattr(dataset, "num_classes", None)
    if not num_classes:
        raise UserError("the dataset has no class labels; a classifier needs a labelled dataset (e.g. digits, mnist, cifar10)")
    if isinstance(model, ClassifierConfig):
        config = model
    else:
        config = ClassifierConfig.from_dict({"in_channels": dataset.channels, "num_classes": num_classes, **(model or {})})
    if (config.in_channels, config.num_classes) != (dataset.channels, num_classes):
        raise UserError(f"model has in_channels={config.in_channels}, num_classes={config.num_classes} but the dataset has "
                        f"{dataset.channels} channels and {num_classes} classes; remove those keys")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return NoisyClassifier(config)


def train_classifier(
    dataset: str | Any,
    schedule: NoiseSchedule | dict[str, Any],
    out_dir: str | Path,
    *,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 3e-4,
    seed: int = 0,
    model: ClassifierConfig | dict[str, Any] | None = None,
    resolution: int | None = None,
    data_dir: str | Path | None = None,
    num_images: int | None = None,
    weight_decay: float = 0.0,
    device: str | torch.device | None = None,
    progress: bool = True,
    resume: bool = False,
    checkpoint_every: int = 0,
) -> ClassifierTrainResult:
    """Train a :class:`NoisyClassifier` on noised data and save it as a model folder in ``out_dir``.

    ``dataset``: a name or folder for :func:`difflab.data.build_dataset` (with ``resolution``,
    ``data_dir``, ``num_images``) or a labelled dataset object. ``model``: ClassifierConfig keys
    (``in_channels`` and ``num_classes`` come from the dataset). The folder's config.json also records
    the schedule, whose time units the classifier expects. One :class:`~difflab.training.Trainer` run
    (AdamW, no warm-up, clipping or EMA): ``checkpoint_every`` steps between checkpoints (0: only at the
    end); ``resume`` continues the run in ``out_dir`` (a finished one is left as it is, see ``note``).
    """
    for name, value, kind in (("steps", steps, int), ("batch_size", batch_size, int), ("lr", lr, float)):
        _check_positive(name, value, kind)
    schedule = schedule if isinstance(schedule, NoiseSchedule) else NoiseSchedule.from_config(schedule)
    ds = dataset
    if isinstance(dataset, str):
        ds = build_dataset(dataset, resolution, data_dir=data_dir, num_images=num_images, seed=seed)
    net = _build_model(ds, model, seed)
    name = dataset if isinstance(dataset, str) else type(dataset).__name__
    extra = {"dataset": name, "resolution": getattr(ds, "resolution", None), "steps": steps, "seed": seed}
    config = run_config(seed=seed, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                        checkpoint_every=checkpoint_every, data={"dataset": name, "num_images": len(ds)},
                        model=net.config.to_dict(), schedule=schedule.to_config())
    objective = NoisyClassifierObjective(schedule, extra)
    trainer, result = fit(lambda: Trainer(net, ds, objective, config, out_dir, progress=progress,
                                          accelerator=run_accelerator(device)),
                          out_dir, {"config": config.to_dict(), "objective": objective.name}, resume=resume,
                          what="a classifier run")
    m = result.metrics or {}
    return ClassifierTrainResult(result.step, m.get("loss", math.nan), m.get("accuracy", math.nan), Path(out_dir), result.note)


@torch.no_grad()
def classifier_accuracy(
    model: NoisyClassifier, images: Tensor, labels: Tensor, schedule: NoiseSchedule, timesteps: Sequence[int],
    *, seed: int = 0, batch_size: int = 256,
) -> list[float]:
    """Accuracy of ``model`` on ``images`` noised to each of ``timesteps`` (noise from (seed, t))."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for t in timesteps:
        noise = torch.randn(images.shape, generator=seeded_generator(seed, 4, int(t)))
        correct = 0
        for lo in range(0, len(images), batch_size):
            x0, eps = images[lo:lo + batch_size].to(device), noise[lo:lo + batch_size].to(device)
            tt = torch.full((len(x0),), int(t))
            pred = model(q_sample(schedule, x0, tt, eps), tt.float().to(device)).argmax(1).cpu()
            correct += int((pred == labels[lo:lo + batch_size]).sum())
        out.append(correct / len(images))
    return out
