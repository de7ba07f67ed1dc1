"""The shapes oracle that scores prompt adherence: its hit test, and the accuracy a brief training reaches on held-out shapes."""

import torch
from torch import nn

from difflab.data.shapes import ShapesDataset
from difflab.data.shapes_spec import VOCABULARIES
from difflab.metrics.shapes_oracle import ATTRIBUTES, attribute_hits, train_oracle


class _Reads(nn.Module):
    """A stand-in oracle that 'reads' fixed attribute values for every image."""

    def __init__(self, values: dict[str, list[str]]) -> None:
        super().__init__()
        self.values = values

    def forward(self, x):
        return {a: torch.nn.functional.one_hot(torch.tensor([VOCABULARIES[a].index(v) for v in self.values[a]]),
                                               len(VOCABULARIES[a])).float() * 10 for a in ATTRIBUTES}


def test_attribute_hits_compares_reading_with_spec():
    specs = ShapesDataset(3, 16, seed=0).specs
    read = {a: [getattr(s, a) for s in specs] for a in ATTRIBUTES}
    wrong_shape = next(v for v in VOCABULARIES["shape"] if v != specs[1].shape)
    read["shape"][1] = wrong_shape
    hits = attribute_hits(_Reads(read), torch.zeros(3, 3, 16, 16), specs, ("shape", "color"))
    assert hits["shape"].tolist() == [True, False, True] and hits["color"].tolist() == [True, True, True]


def test_brief_training_reads_shapes_colours_and_positions():
    """Accuracy on the 2000 held-out rendered shapes (seed disjoint from training). The full recipe reads
    shapes at ~99.6%; this 320-step, width-8 run at 16 px reaches shape 0.84 (0.83-0.84 over seeds 1234, 1, 2;
    chance 1/3), colour 0.994, position 1.0. Thresholds sit ~0.09 (180 images) below for shape, ~2% for the rest."""
    _, report = train_oracle(16, num_images=1500, steps=320, batch_size=64, width=8, progress=False)
    acc = report.accuracy
    assert acc["shape"] > 0.75 and acc["color"] > 0.97 and acc["position"] > 0.98, acc
