"""`difflab demo`: the committed config trains, samples a prompt-per-row grid and is scored by the shapes oracle,
whose reading is checked on rendered images of the demo's own prompts (the independent truth)."""

import dataclasses

import numpy as np
import torch
from PIL import Image

from difflab.cli.demo import DEMO_PROMPTS, prompt_adherence, run_demo
from difflab.data.shapes_render import render_specs
from difflab.data.shapes_spec import POSITIONS, parse_caption


def _as_samples(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def test_the_oracle_reads_rendered_demo_prompts_and_catches_a_wrong_position():
    specs = [parse_caption(p) for p in DEMO_PROMPTS]
    right = prompt_adherence(_as_samples(render_specs(specs)), list(DEMO_PROMPTS), 32)
    # the oracle reads real shapes 99.8 %, colours and positions 100 % right: all 8 renders are read as captioned
    assert right["shape_and_color"] == 1.0 and right["position"] == 1.0
    positions = list(POSITIONS)
    moved = [dataclasses.replace(s, position=positions[(positions.index(s.position) + 1) % len(positions)]) for s in specs]
    wrong = prompt_adherence(_as_samples(render_specs(moved)), list(DEMO_PROMPTS), 32)
    assert wrong["position"] == 0.0 and wrong["shape_and_color"] == 1.0  # only the position disagrees with the prompt


def test_the_demo_config_trains_samples_a_grid_and_scores_it(tmp_path, one_thread):
    f = run_demo(tmp_path, steps=2, per_prompt=2, sampling_steps=2, overrides={"data.num_images": 64})
    assert f["steps"] == 2 and f["nfe"] == 2 and np.isfinite(f["loss"])
    with Image.open(f["grid"]) as grid:  # 8 prompts in rows, 2 samples per row, 32 px tiles, 2 px padding
        assert grid.size == (2 + 2 * 34, 2 + 8 * 34)
    assert (tmp_path / "prompts.txt").read_text().splitlines()[0] == f"row 1: {DEMO_PROMPTS[0]}"
    a = f["adherence"]
    assert set(a) >= {"shape", "color", "position", "shape_and_color"}
    assert all(0.0 <= a[k] <= 1.0 for k in ("shape", "color", "position", "shape_and_color"))
    assert a["shape_and_color"] <= min(a["shape"], a["color"])
    assert min(a["oracle_shape_accuracy"], a["oracle_color_accuracy"], a["oracle_position_accuracy"]) > 0.95
    # the demo trains difflab's defaults: the patch32 layout with pooled tokens, v-prediction, cosine schedule
    from difflab.nets.unet_config import PRESETS
    from difflab.pipelines.diffusion import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert {k: getattr(pipe.unet.config, k) for k in PRESETS["patch32"]} == PRESETS["patch32"]
    assert pipe.unet.config.token_pooling and pipe.parameterization == "v" and pipe.schedule.config["kind"] == "cosine"
