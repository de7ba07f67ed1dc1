"""An oracle for the built-in shapes: a small CNN that reads shape, colour, size, position and background.

Trained in seconds on freshly rendered shapes (the ground truth is exact), it scores generated images:
the fraction of samples whose shape and colour it recognises with confidence, and, for prompts,
whether each attribute matches. Its accuracy on held-out real images is reported with every score,
so a figure is only as trusted as the oracle that made it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from difflab.data.shapes import ShapesDataset
from difflab.data.shapes_spec import VOCABULARIES

ATTRIBUTES = ("shape", "color", "size", "position", "background")


class ShapesOracle(nn.Module):
    """Conv net with one classification head per attribute; input (B, 3, R, R) in [-1, 1]."""

    def __init__(self, resolution: int = 32, width: int = 32) -> None:
        super().__init__()
        layers, cin = [], 3
        for cout in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, stride=2, padding=1), nn.SiLU()]
            cin = cout
        self.features = nn.Sequential(*layers, nn.Flatten())
        flat = cin * (resolution // 8) ** 2
        self.heads = nn.ModuleDict({a: nn.Linear(flat, len(VOCABULARIES[a])) for a in ATTRIBUTES})
        self.resolution = resolution

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
                 seed: int = 1234, width: int = 32, progress: bool = True) -> tuple[ShapesOracle, OracleReport]:
    """Train on rendered shapes (a seed disjoint from the default training data) and test on 2000 others."""
    torch.manual_seed(seed)
    train_set = ShapesDataset(num_images, resolution, seed=seed)
    test_set = ShapesDataset(2000, resolution, seed=seed + 1)
    x, y = train_set.images(), _targets(train_set)
    model = ShapesOracle(resolution, width)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="shapes oracle", disable=not progress):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        logits = model(x[idx])
        loss = sum(F.cross_entropy(logits[a], y[a][idx]) for a in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
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
