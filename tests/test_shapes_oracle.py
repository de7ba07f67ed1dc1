"""The shapes oracle that scores prompt adherence: its hit test, and that a brief training reads real shapes."""

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


def test_brief_training_reads_colours_and_positions():
    _, report = train_oracle(16, num_images=1500, steps=80, batch_size=64, width=8, progress=False)
    assert report.accuracy["color"] > 0.8 and report.accuracy["position"] > 0.6, report.accuracy
