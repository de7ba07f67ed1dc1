"""The noise-aware classifier: trains above chance on digits, loses accuracy with noise, saves and loads."""

from __future__ import annotations

import json
import math

import pytest
import torch

from difflab.data.base import ArrayDataset
from difflab.data.digits import DigitsDataset
from difflab.denoiser import Denoiser
from difflab.errors import UserError
from difflab.guidance import ClassifierGuidedDenoiser
from difflab.nets.classifier import ClassifierConfig, NoisyClassifier
from difflab.nets.unet import UNet, UNetConfig
from difflab.schedules import NoiseSchedule
from difflab.training.classifier import classifier_accuracy, train_classifier

SCHED = NoiseSchedule.cosine(100)  # alpha_bar(T-1) ~ 0: the noisiest inputs carry no information
TINY = {"base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_levels": [], "norm_groups": 8,
        "head_channels": 16, "mid_attention": False}
N_TRAIN = 1400


def _digit_split() -> tuple[ArrayDataset, torch.Tensor, torch.Tensor]:
    full = DigitsDataset(resolution=8)
    pixels = full.pixels.permute(0, 2, 3, 1).numpy()
    train = ArrayDataset(pixels[:N_TRAIN], full.labels[:N_TRAIN], full.class_names)
    return train, full.images()[N_TRAIN:], torch.as_tensor(full.labels[N_TRAIN:])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is much faster on a busy box
    try:
        train, images, labels = _digit_split()
        out = tmp_path_factory.mktemp("clf")
        result = train_classifier(train, SCHED, out, steps=100, batch_size=64, lr=2e-3, seed=0, model=TINY, progress=False)
        yield result, images, labels
    finally:
        torch.set_num_threads(threads)


def test_trained_classifier_beats_chance_and_degrades_with_noise(trained) -> None:
    """Held-out digits (8x8, 10 classes, chance 0.1): clearly above chance when clean, chance at pure noise."""
    result, images, labels = trained
    clf = NoisyClassifier.from_pretrained(result.out_dir)
    acc = classifier_accuracy(clf, images, labels, SCHED, [0, 40, 70, 99])
    se = math.sqrt(0.1 * 0.9 / len(labels))  # standard error of a chance-level accuracy
    assert acc[0] > 0.6, acc
    assert acc[0] > acc[1] > acc[2] > acc[3], acc
    assert acc[3] < 0.1 + 4 * se + 0.05, acc  # a constant guess scores its class's share (~0.1)


def test_save_load_round_trip(trained, tmp_path) -> None:
    result, images, _ = trained
    clf = NoisyClassifier.from_pretrained(result.out_dir)
    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["_class_name"] == "NoisyClassifier" and config["schedule"] == SCHED.to_config()
    assert clf.extra_config["schedule"] == SCHED.to_config() and not clf.training
    clf.save_pretrained(tmp_path / "copy", clf.extra_config)
    again = NoisyClassifier.from_pretrained(tmp_path / "copy")
    t = torch.tensor([0.0, 30.0, 60.0, 99.0])
    with torch.no_grad():
        assert torch.equal(clf(images[:4], t), again(images[:4], t))
    assert ClassifierConfig.from_dict(json.loads(json.dumps(clf.config.to_dict()))) == clf.config


def test_training_is_a_function_of_the_seed(tmp_path, one_thread) -> None:
    train, _, _ = _digit_split()
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        train_classifier(train, SCHED, tmp_path / name, steps=3, batch_size=8, lr=1e-3, seed=seed, model=TINY, progress=False)
        runs[name] = NoisyClassifier.from_pretrained(tmp_path / name).state_dict()
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


@pytest.mark.parametrize("pool", ["attention", "mean"])
def test_classifier_shapes_and_time_dependence(pool: str) -> None:
    torch.manual_seed(0)
    clf = NoisyClassifier(ClassifierConfig(in_channels=3, num_classes=4, pool=pool, **{**TINY, "attention_levels": (1,)}))
    x = torch.randn(2, 3, 16, 16)
    a, b = clf(x, 0.0), clf(x, torch.tensor([90.0, 90.0]))
    assert a.shape == (2, 4) and not torch.allclose(a, b)
    with pytest.raises(UserError, match="divisible"):
        clf(torch.randn(1, 3, 15, 15), 0.0)
    with pytest.raises(UserError, match="expected"):
        clf(torch.randn(1, 1, 16, 16), 0.0)


def test_bad_configs_and_folders(tmp_path) -> None:
    with pytest.raises(UserError, match="num_classes"):
        ClassifierConfig(num_classes=1)
    with pytest.raises(UserError, match="pool"):
        ClassifierConfig(pool="max")
    with pytest.raises(UserError, match="unknown ClassifierConfig key"):
        ClassifierConfig.from_dict({"num_class": 3})
    with pytest.raises(UserError, match="attention_levels"):
        ClassifierConfig(channel_mults=(1, 2), attention_levels=(2,))
    UNet(UNetConfig(base_channels=8, channel_mults=(1,), attention_levels=(), norm_groups=4)).save_pretrained(tmp_path / "unet")
    with pytest.raises(UserError, match="not a noise-aware classifier"):
        NoisyClassifier.from_pretrained(tmp_path / "unet")
    unlabelled = ArrayDataset(torch.zeros(4, 8, 8, 1, dtype=torch.uint8).numpy())
    with pytest.raises(UserError, match="no class labels"):
        train_classifier(unlabelled, SCHED, tmp_path / "x", steps=1, progress=False)
    with pytest.raises(UserError, match="steps"):
        train_classifier("digits", SCHED, tmp_path / "x", steps=0, progress=False)


def test_guidance_with_a_noisy_classifier_checks_labels() -> None:
    clf = NoisyClassifier(ClassifierConfig(in_channels=1, num_classes=10, **TINY))
    den = Denoiser(lambda x, t: torch.zeros_like(x), SCHED)
    with pytest.raises(UserError, match=r"valid labels are 0\.\.9"):
        ClassifierGuidedDenoiser(den, clf, 10, 1.0)
    guided = ClassifierGuidedDenoiser(den, clf, torch.tensor([1, 7]), 2.0)
    x = torch.randn(2, 1, 8, 8)
    out = guided(x, 50.0)
    grad = guided.classifier_grad(x, 50.0)
    assert grad.shape == x.shape and bool(grad.abs().sum() > 0)
    torch.testing.assert_close(out.eps, -2.0 * out.sigma * grad)
