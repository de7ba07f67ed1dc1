"""SR3 super-resolution: `--task super-resolution --scale S` trains a concat-conditioned model on (LR, HR) pairs
made on the fly; UpscalePipeline and `difflab upscale` sample S times the input's size; bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, tiny_config_dict
from difflab.errors import UserError
from difflab.pipelines.upscale import UpscalePipeline
from difflab.pipelines.diffusion import DiffusionPipeline
from difflab.recipes import train
from difflab.training import TrainConfig


def sr_config(**extra):
    raw = tiny_config_dict(steps=2)
    raw["task"] = "super-resolution"
    raw["data"]["low_res_factor"] = 4
    raw.update(extra)
    return TrainConfig.from_dict(raw)


@pytest.fixture(scope="module")
def sr_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("sr") / "run"
    train(sr_config(), out, progress=False)
    return out


def test_the_task_fixes_the_condition_and_its_defaults():
    c = sr_config().conditioning
    assert (c.concat, c.concat_resize, c.concat_noise_aug) == ("low_res", "bicubic", 0.2)  # SR3 bicubic, CDM augmentation
    assert sr_config(conditioning={"concat_noise_aug": 0.0}).conditioning.concat_noise_aug == 0.0
    plain = TrainConfig.from_dict(tiny_config_dict()).conditioning
    assert (plain.concat, plain.concat_resize, plain.concat_noise_aug) == (None, "bilinear", 0.0)
    with pytest.raises(UserError, match="super-resolution needs its scale: --scale 2 or 4"):
        TrainConfig.from_dict({**tiny_config_dict(), "task": "super-resolution"})
    with pytest.raises(UserError, match="config value task='denoise' is out of range"):
        TrainConfig.from_dict({**tiny_config_dict(), "task": "denoise"})


def test_upscale_pipeline_samples_scale_times_the_input(sr_model, one_thread):
    pipe = UpscalePipeline.from_pretrained(sr_model)
    assert pipe.scale == 4 and pipe.unet.config.concat_channels == 3 and pipe.unet.config.concat_resize == "bicubic"
    low = torch.rand(2, 3, 4, 4) * 2 - 1
    out = pipe(low, 3, "ddim", seed=0, progress=False)
    assert out.samples.shape == (2, 3, 16, 16) and out.nfe == 3
    # the condition matters: another low-resolution input changes the sample drawn from the same noise
    other = pipe(-low, 3, "ddim", seed=0, progress=False)
    assert (other.samples - out.samples).abs().max() > 1e-4
    # and is what DiffusionPipeline sees with concat= (the same model, the same call underneath)
    plain = DiffusionPipeline.from_pretrained(sr_model)(num_images=2, num_inference_steps=3, sampler="ddim", seed=0,
                                                         concat={"low_res": low}, progress=False)
    assert torch.equal(plain.samples, out.samples)


def test_upscale_bad_input(sr_model, tmp_path):
    pipe = UpscalePipeline.from_pretrained(sr_model)
    with pytest.raises(UserError, match="this model upscales by 4, not 2"):
        pipe(torch.zeros(1, 3, 4, 4), 2, scale=2, progress=False)
    with pytest.raises(UserError, match="the input is 8x8 pixels, larger than the 4x4 inputs this model was trained on"):
        pipe(torch.zeros(1, 3, 8, 8), 2, progress=False)


def test_a_generation_model_is_not_an_upscaler(tmp_path):
    train(TrainConfig.from_dict(tiny_config_dict(steps=1)), tmp_path / "gen", progress=False)
    with pytest.raises(UserError, match="not trained for super-resolution"):
        UpscalePipeline.from_pretrained(tmp_path / "gen")(torch.zeros(1, 3, 4, 4), 2, progress=False)


def test_cli_trains_and_upscales(tmp_path, capsys, one_thread):
    code, out, err = run_cli(["train", "--task", "super-resolution", "--scale", "2", "--dataset", "shapes", "--resolution", "8",
                              "--num-images", "16", "--steps", "1", "--batch-size", "4", "--sample-every", "0",
                              "--no-progress", "--out", str(tmp_path / "sr")], capsys)
    assert code == 0, err
    Image.fromarray(np.full((4, 4, 3), 128, dtype=np.uint8)).save(tmp_path / "low.png")
    code, out, err = run_cli(["upscale", "--model", str(tmp_path / "sr"), "--image", str(tmp_path / "low.png"), "--steps", "2",
                              "--no-progress", "--out", str(tmp_path / "high.png")], capsys)
    assert code == 0, err
    assert "upscaled x2" in out and Image.open(tmp_path / "high.png").size == (8, 8)
