"""Trained (Palette-style) inpainting: random training masks, `--task inpaint` training, and InpaintPipeline's
"trained" method keeping known pixels exactly."""

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny_config_dict
from difflab.conditioning.concat import ConcatCondition
from difflab.data.masks import MASK_KINDS, random_fill_masks
from difflab.errors import UserError
from difflab.pipelines.edit import InpaintPipeline
from difflab.recipes import train
from difflab.training import TrainConfig


def test_each_mask_kind_has_its_geometry():
    g = torch.Generator().manual_seed(0)
    for kind in MASK_KINDS:
        masks = random_fill_masks(200, 16, 16, g, (kind,))[:, 0]
        frac = masks.float().mean((1, 2))
        if kind == "box":  # sides 4..8 of 16: 1/16 to 1/4 of the area, and a rectangle
            assert frac.min() >= 16 / 256 and frac.max() <= 64 / 256
            rows, cols = masks.any(2), masks.any(1)
            assert torch.equal(masks.float().sum((1, 2)), rows.float().sum(1) * cols.float().sum(1))
        elif kind == "half":
            assert torch.all(frac == 0.5)
        elif kind == "border":  # a strip 4..8 deep along one side, touching that side
            assert frac.min() >= 0.25 and frac.max() <= 0.5
            assert torch.all(masks[:, 0].all(1) | masks[:, -1].all(1) | masks[:, :, 0].all(1) | masks[:, :, -1].all(1))
        else:  # strokes: radius 16 / 12 -> more than a disc, less than the image, not a half
            assert frac.min() > 0.02 and frac.max() < 0.9
            # a stroke is connected: every filled pixel is reachable from any other through 4-neighbours
            from scipy.ndimage import label

            assert all(label(m.numpy())[1] == 1 for m in masks)
    a = random_fill_masks(4, 16, 16, torch.Generator().manual_seed(5))
    assert torch.equal(a, random_fill_masks(4, 16, 16, torch.Generator().manual_seed(5)))  # a function of the seed


def test_inpainting_condition_is_the_masked_picture_and_the_mask():
    cond = ConcatCondition("image", channels=4, masks=["half"])
    picture = torch.rand(3, 3, 8, 8) + 1  # > 0 everywhere, so zeros mark the masked entries
    out = cond.prepare(picture, torch.zeros(3, dtype=torch.bool), torch.Generator().manual_seed(0))["image"]
    keep = out[:, 3:]
    assert out.shape == (3, 4, 8, 8) and torch.all(keep.mean((1, 2, 3)) == 0.5)
    assert torch.equal(out[:, :3], picture * keep) and torch.all((out[:, :3] == 0) == (keep == 0))
    assert ConcatCondition(**cond.to_config()).masks == ("half",)  # saved with the model


@pytest.fixture(scope="module")
def inpaint_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("inp") / "run"
    train(TrainConfig.from_dict({**tiny_config_dict(steps=2), "task": "inpaint"}), out, progress=False)
    return out


def test_trained_inpainting_keeps_known_pixels_and_uses_the_picture(inpaint_model, one_thread):
    pipe = InpaintPipeline.from_pretrained(inpaint_model)
    assert pipe.unet.config.concat_channels == 4 and pipe.conditioner.concat.masks == MASK_KINDS
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    fill = torch.zeros(16, 16)
    fill[4:12, 4:12] = 1
    out = pipe(image, fill, 3, sampler="ddim", seed=0, progress=False)  # method defaults to "trained"
    keep = fill == 0
    assert out.nfe == 3 and torch.equal(out.samples[:, :, keep], image[:, :, keep])
    other = pipe(-image, fill, 3, sampler="ddim", seed=0, progress=False)  # the known region conditions the fill
    assert (other.samples[:, :, ~keep] - out.samples[:, :, ~keep]).abs().max() > 1e-5
    both = pipe(image, fill, 4, method="repaint", jump=2, resample=2, seed=0, progress=False)  # conditioned and resampled
    assert torch.equal(both.samples[:, :, keep], image[:, :, keep])


def test_inpainting_task_bad_input(tmp_path, capsys):
    with pytest.raises(UserError, match="random masks train inpainting models: add --task inpaint"):
        TrainConfig.from_dict({**tiny_config_dict(), "conditioning": {"concat_masks": ["box"]}})
    with pytest.raises(UserError, match="mask kinds \\['disc'\\] are invalid"):
        TrainConfig.from_dict({**tiny_config_dict(), "task": "inpaint", "conditioning": {"concat_masks": ["disc"]}})
    train(TrainConfig.from_dict(tiny_config_dict(steps=1)), tmp_path / "gen", progress=False)
    with pytest.raises(UserError, match="method 'trained' needs a model trained with --task inpaint"):
        InpaintPipeline.from_pretrained(tmp_path / "gen")(torch.zeros(1, 3, 16, 16), np.ones((16, 16)), 2,
                                                           method="trained", progress=False)


def test_cli_trains_an_inpainting_model(tmp_path, capsys, one_thread):
    code, _, err = run_cli(["train", "--task", "inpaint", "--dataset", "shapes", "--resolution", "8", "--num-images", "16",
                            "--steps", "1", "--batch-size", "4", "--sample-every", "1", "--no-progress",
                            "--out", str(tmp_path / "inp")], capsys)
    assert code == 0, err
    assert (tmp_path / "inp" / "samples").is_dir()  # previews of masked training pictures
