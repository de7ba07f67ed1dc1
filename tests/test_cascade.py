"""Imagen-like cascades: stages in one folder listed in model_index.json, per-stage options, sizes that must meet,
and `difflab train-cascade`."""

import pytest
import torch
import yaml

from conftest import run_cli, tiny_config_dict
from difflab.errors import UserError
from difflab.pipelines.cascade import CascadePipeline
from difflab.pipelines.diffusion import DiffusionPipeline
from difflab.pipelines.upscale import UpscalePipeline
from difflab.recipes import train
from difflab.training import TrainConfig


def base_config(resolution=8):
    raw = tiny_config_dict(steps=1)
    raw["data"] = {**raw["data"], "resolution": resolution}
    return raw


def sr_config(resolution=16, scale=2):
    raw = tiny_config_dict(steps=1)
    raw["data"] = {**raw["data"], "resolution": resolution, "low_res_factor": scale}
    return {**raw, "task": "super-resolution"}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    train(TrainConfig.from_dict(base_config()), root / "base", progress=False)
    train(TrainConfig.from_dict(sr_config()), root / "sr", progress=False)
    return root


def test_a_cascade_round_trips_and_runs_each_stage(stages, tmp_path, one_thread):
    cascade = CascadePipeline([DiffusionPipeline.from_pretrained(stages / "base"), UpscalePipeline.from_pretrained(stages / "sr")])
    cascade.save_pretrained(tmp_path / "c")
    loaded = CascadePipeline.from_pretrained(tmp_path / "c")
    assert loaded.names == ["base", "sr1"]
    outs = loaded.run_stages(2, seed=0, progress=False, stage_options=[{"num_inference_steps": 3, "sampler": "ddim"},
                                                                       {"num_inference_steps": 2, "aug_level": 0.1}])
    assert [tuple(o.samples.shape) for o in outs] == [(2, 3, 8, 8), (2, 3, 16, 16)] and [o.nfe for o in outs] == [3, 2]
    # stage 1 is the base pipeline itself, stage 2 the upscaler given stage 1's images at that augmentation level
    base = DiffusionPipeline.from_pretrained(stages / "base")(num_images=2, num_inference_steps=3, sampler="ddim", seed=0,
                                                               progress=False)
    assert torch.equal(outs[0].samples, base.samples)
    up = UpscalePipeline.from_pretrained(stages / "sr")(base.samples, 2, seed=0, aug_level=0.1, progress=False)
    assert torch.equal(outs[1].samples, up.samples)


def test_cascade_bad_input(stages, tmp_path):
    base, sr = DiffusionPipeline.from_pretrained(stages / "base"), UpscalePipeline.from_pretrained(stages / "sr")
    with pytest.raises(UserError, match="a base model and at least one super-resolution stage"):
        CascadePipeline([base])
    train(TrainConfig.from_dict(sr_config(32, 2)), tmp_path / "sr32", progress=False)
    with pytest.raises(UserError, match="stage sr1 upscales 16x16 inputs but the stage before it makes 8x8 images"):
        CascadePipeline([base, UpscalePipeline.from_pretrained(tmp_path / "sr32")])
    with pytest.raises(UserError, match="stage sr1 must be an UpscalePipeline"):
        CascadePipeline([base, DiffusionPipeline.from_pretrained(stages / "sr")])
    cascade = CascadePipeline([base, sr])
    with pytest.raises(UserError, match="aug_level applies to the super-resolution stages"):
        cascade(1, stage_options=[{"aug_level": 0.1}, {}], progress=False)
    with pytest.raises(UserError, match="stage_options has 1 entries for 2 stages"):
        cascade(1, stage_options=[{}], progress=False)
    with pytest.raises(UserError, match="unknown option\\(s\\) \\['steps'\\] for stage base"):
        cascade(1, stage_options=[{"steps": 3}, {}], progress=False)


def test_cli_trains_a_cascade(tmp_path, capsys, one_thread):
    (tmp_path / "sr.yaml").write_text(yaml.safe_dump(sr_config()))
    (tmp_path / "cascade.yaml").write_text(yaml.safe_dump({"stages": {"base": base_config(), "sr1": "sr.yaml"}}, sort_keys=False))
    code, out, err = run_cli(["train-cascade", "--config", str(tmp_path / "cascade.yaml"), "--out", str(tmp_path / "c"),
                              "--no-progress"], capsys)
    assert code == 0, err
    assert "cascade written to" in out
    cascade = CascadePipeline.from_pretrained(tmp_path / "c")
    assert cascade(1, seed=0, progress=False, stage_options=[{"num_inference_steps": 2}] * 2).samples.shape == (1, 3, 16, 16)
    code, out, err = run_cli(["sample", "--model", str(tmp_path / "c"), "--steps", "2", "--num-images", "2", "--no-progress",
                              "--out", str(tmp_path / "grid.png")], capsys)
    assert code == 0 and "wrote 2 samples" in out, err
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"stages": {"base": base_config(), "sr1": base_config()}}))
    code, _, err = run_cli(["train-cascade", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and "stage sr1 must train a super-resolution model" in err
