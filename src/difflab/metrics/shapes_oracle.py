"""An oracle for the built-in shapes: a small CNN that reads shape, colour, size, position and background.

Trained in seconds on freshly rendered shapes (the ground truth is exact), it scores generated images:
the fraction of samples whose shape and colour it recognises with confidence, and, for prompts,
whether each attribute matches. Its accuracy on held-out real images is reported with every score,
so a figure is only as trusted as the oracle that made it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from difflab.data.shapes import ShapesDataset
from difflab.data.shapes_spec import VOCABULARIES
from difflab.io.configs import JsonConfig
from difflab.io.model_folder import PretrainedModel
from difflab.io.registry import register_network

ATTRIBUTES = ("shape", "color", "size", "position", "background")
EMA_DECAY = 0.99  # with the warm-up, stands in for v1's one-cycle learning-rate decay


@dataclass
class ShapesOracleConfig(JsonConfig):
    """Shape of a :class:`ShapesOracle`: input side ``resolution`` (a multiple of 8) and base ``width``."""

    resolution: int = 32
    width: int = 32


@register_network
class ShapesOracle(PretrainedModel, nn.Module):
    """Conv net with one classification head per attribute; input (B, 3, R, R) in [-1, 1].

    Built from a :class:`ShapesOracleConfig` or, as before, ``ShapesOracle(resolution, width)``; saved
    with ``save_pretrained`` (pass its accuracy as ``extra={"accuracy": report.accuracy}``).
    """

    config_class = ShapesOracleConfig
    description = "a shapes oracle"

    def __init__(self, resolution: ShapesOracleConfig | int = 32, width: int = 32) -> None:
        super().__init__()
        config = resolution if isinstance(resolution, ShapesOracleConfig) else ShapesOracleConfig(int(resolution), width)
        self.config = config
        width = config.width
        layers, cin = [], 3
        for cout in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, stride=2, padding=1), nn.SiLU()]
            cin = cout
        self.features = nn.Sequential(*layers, nn.Flatten())
        flat = cin * (config.resolution // 8) ** 2
        self.heads = nn.ModuleDict({a: nn.Linear(flat, len(VOCABULARIES[a])) for a in ATTRIBUTES})

    @property
    def resolution(self) -> int:
        return self.config.resolution

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.features(x)
        return {a: head(h) for a, head in self.heads.items()}


def _targets(dataset: ShapesDataset) -> dict[str, Tensor]:
    return {a: torch.tensor([VOCABULARIES[a].index(getattr(s, a)) for s in dataset.specs]) for a in ATTRIBUTES}


@dataclass
class OracleReport:
    """Per-attribute accuracy of the oracle on held-out real images."""

    accuracy: dict[str, float]


def train_oracle(resolution: int = 32, num_images: int = 12000, steps: int = 400, batch_size: int = 128,
                 seed: int = 1234, width: int = 32, progress: bool = True, *, out_dir: str | Path | None = None,
                 resume: bool = False) -> tuple[ShapesOracle, OracleReport]:
    """Train on rendered shapes (a seed disjoint from the default training data) and test on 2000 others.

    One :class:`~difflab.training.Trainer` run (AdamW, lr 2e-3 after a warm-up over the first quarter,
    weight decay 0.01, the EMA of the weights is returned); checkpoints go to ``out_dir`` (default: a
    temporary folder), and ``resume`` continues the run there.
    """
    from difflab.data.tensors import TensorDataset
    from difflab.training.objectives.cross_entropy import CrossEntropyObjective
    from difflab.training.runs import fit_in_memory, run_config

    train_set = ShapesDataset(num_images, resolution, seed=seed)
    test_set = ShapesDataset(2000, resolution, seed=seed + 1)
    data = TensorDataset(train_set.images(), _targets(train_set))
    config = run_config(seed=seed, steps=steps, batch_size=batch_size, lr=2e-3, weight_decay=0.01,
                        warmup_steps=max(steps // 4, 1), ema_decay=EMA_DECAY,
                        data={"dataset": "shapes", "resolution": resolution, "num_images": num_images},
                        model={"resolution": resolution, "width": width})
    torch.manual_seed(seed)
    model = ShapesOracle(resolution, width)
    model, _ = fit_in_memory(model, data, CrossEntropyObjective(), config, out_dir, resume=resume, progress=progress,
                             what="a shapes-oracle run")
    predicted = predict(model, test_set.images())
    truth = _targets(test_set)
    accuracy = {a: (predicted[a] == truth[a]).float().mean().item() for a in ATTRIBUTES}
    return model, OracleReport(accuracy)


@torch.no_grad()
def predict(model: ShapesOracle, images: Tensor, batch_size: int = 256) -> dict[str, Tensor]:
    """Most likely index of each attribute for images in [-1, 1]."""
    probs = predict_proba(model, images, batch_size)
    return {a: p.argmax(1) for a, p in probs.items()}


@torch.no_grad()
def predict_proba(model: ShapesOracle, images: Tensor, batch_size: int = 256) -> dict[str, Tensor]:
    outs = [model(images[i:i + batch_size].float()) for i in range(0, len(images), batch_size)]
    return {a: torch.cat([o[a] for o in outs]).softmax(1) for a in ATTRIBUTES}


def recognisable_fraction(model: ShapesOracle, images: Tensor, threshold: float = 0.9) -> float:
    """Fraction of images whose shape AND colour the oracle names with probability >= ``threshold``."""
    probs = predict_proba(model, images)
    confident = (probs["shape"].max(1).values >= threshold) & (probs["color"].max(1).values >= threshold)
    return confident.float().mean().item()


def attribute_hits(model: ShapesOracle, images: Tensor, specs: list, attributes: tuple[str, ...]) -> dict[str, Tensor]:
    """Per attribute, a bool per image: does the oracle read the value its spec (e.g. its prompt) names?"""
    predicted = predict(model, images)
    return {a: torch.tensor([VOCABULARIES[a][int(i)] == getattr(s, a) for i, s in zip(predicted[a], specs)])
            for a in attributes}
