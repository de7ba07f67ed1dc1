"""Train a noise-aware classifier p_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, sec. 4).

Each step draws a batch (x_0, y), a time t ~ Uniform{0, ..., T-1} and noise, forms
x_t ~ q(x_t | x_0) (:func:`difflab.process.q_sample`) and minimises the cross-entropy
``-log p_phi(y | x_t, t)``. Randomness is a pure function of (seed, step), as in the diffusion trainer:
the batch indices, times and noise of step k come from a generator seeded by (seed, k).

>>> from difflab.schedules import NoiseSchedule
>>> res = train_classifier("digits", NoiseSchedule.linear(100), "runs/clf", steps=10, resolution=8,
...                        model={"base_channels": 16, "channel_mults": [1, 2]}, progress=False)  # doctest: +SKIP
>>> clf = NoisyClassifier.from_pretrained("runs/clf")                                               # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

from difflab.data import build_dataset
from difflab.errors import UserError
from difflab.noise import seeded_generator
from difflab.nets.classifier import ClassifierConfig, NoisyClassifier
from difflab.pipelines.model_dir import ensure_writable_dir
from difflab.process import q_sample
from difflab.schedules import NoiseSchedule


@dataclass
class ClassifierTrainResult:
    step: int
    loss: float  # exponential moving average of the training loss
    accuracy: float  # moving average of the training accuracy (over all noise levels)
    out_dir: Path


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


def training_batch(
    dataset: Any, schedule: NoiseSchedule, seed: int, step: int, batch_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_0, labels, t, noise) of ``step``: indices drawn with replacement, t uniform, all from (seed, step)."""
    g = seeded_generator(seed, 3, step)
    idx = torch.randint(0, len(dataset), (batch_size,), generator=g)
    items = [dataset[int(i)] for i in idx]
    x0 = torch.stack([it["image"] for it in items])
    labels = torch.tensor([int(it["label"]) for it in items])
    t = torch.randint(0, schedule.T, (batch_size,), generator=g)
    return x0, labels, t, torch.randn(x0.shape, generator=g)


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
) -> ClassifierTrainResult:
    """Train a :class:`NoisyClassifier` on noised data and save it as a model folder in ``out_dir``.

    ``dataset``: a name or folder for :func:`difflab.data.build_dataset` (with ``resolution``,
    ``data_dir``, ``num_images``) or a labelled dataset object. ``model``: ClassifierConfig keys
    (``in_channels`` and ``num_classes`` come from the dataset). The folder's config.json also records
    the schedule, whose time units the classifier expects.
    """
    for name, value, kind in (("steps", steps, int), ("batch_size", batch_size, int), ("lr", lr, float)):
        _check_positive(name, value, kind)
    schedule = schedule if isinstance(schedule, NoiseSchedule) else NoiseSchedule.from_config(schedule)
    ds = dataset
    if isinstance(dataset, str):
        ds = build_dataset(dataset, resolution, data_dir=data_dir, num_images=num_images, seed=seed)
    out_dir = ensure_writable_dir(Path(out_dir))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = _build_model(ds, model, seed).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    loss_avg = acc_avg = float("nan")
    with tqdm(total=steps, disable=not progress, desc="train-classifier", unit="step") as bar:
        for step in range(steps):
            x0, labels, t, noise = (v.to(device) for v in training_batch(ds, schedule, seed, step, batch_size))
            logits = net(q_sample(schedule, x0, t.cpu(), noise), t.float())
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            acc = (logits.argmax(1) == labels).float().mean().item()
            loss_avg = loss.item() if step == 0 else 0.98 * loss_avg + 0.02 * loss.item()
            acc_avg = acc if step == 0 else 0.98 * acc_avg + 0.02 * acc
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.3f}", acc=f"{acc_avg:.2f}")
    extra = {"schedule": schedule.to_config(), "dataset": dataset if isinstance(dataset, str) else type(dataset).__name__,
             "resolution": getattr(ds, "resolution", None), "steps": steps, "seed": seed}
    net.eval().save_pretrained(out_dir, extra)
    return ClassifierTrainResult(steps, loss_avg, acc_avg, out_dir)


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
