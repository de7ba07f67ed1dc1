"""Domain FID / IS on a small digit classifier: training, save/load, labelling, and a known ordering."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MNIST_FILES, require_shared_data

from difflab.errors import UserError
from difflab.metrics import evaluate
from difflab.metrics.domain import DigitClassifier, DomainExtractor, load_mnist, train_digit_classifier



@pytest.fixture(scope="module")
def mnist():
    return load_mnist(require_shared_data(*MNIST_FILES) / "mnist")


@pytest.fixture(scope="module")
def classifier(mnist):
    images, labels = mnist
    # a quick version of the default recipe (which trains on 8000 images, 2 epochs)
    return train_digit_classifier(images[:2500], labels[:2500], heldout=500, epochs=1, batch_size=32, seed=0)


def test_classifier_learns_digits(classifier):
    assert classifier.config.heldout_accuracy > 0.8  # chance is 0.1


def test_training_is_deterministic(mnist):
    images, labels = mnist
    a = train_digit_classifier(images[:300], labels[:300], heldout=100, epochs=1, seed=3)
    b = train_digit_classifier(images[:300], labels[:300], heldout=100, epochs=1, seed=3)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_save_load_roundtrip(classifier, mnist, tmp_path):
    classifier.save_pretrained(tmp_path / "clf")
    assert {p.name for p in (tmp_path / "clf").iterdir()} == {"config.json", "model.safetensors"}
    loaded = DigitClassifier.from_pretrained(tmp_path / "clf")
    assert loaded.config == classifier.config
    x = torch.from_numpy(mnist[0][:5] / 255.0).float()[:, None]
    with torch.no_grad():
        for got, want in zip(loaded(x), classifier(x)):
            assert torch.equal(got, want)
    with pytest.raises(UserError, match="config.json"):
        DigitClassifier.from_pretrained(tmp_path / "nothing")


def test_extractor_batch_independent_and_rgb_is_grey(classifier, mnist):
    ex = DomainExtractor(classifier)
    imgs = [im[:, :, None] for im in mnist[0][:6]]
    whole = ex(imgs)[0]
    torch.testing.assert_close(torch.cat([ex([im])[0] for im in imgs]), whole, rtol=1e-5, atol=1e-5)
    rgb = [np.repeat(im, 3, axis=2) for im in imgs]  # grey stored as RGB converts back exactly
    torch.testing.assert_close(ex(rgb)[0], whole, rtol=0, atol=0)


def test_domain_metrics_are_labelled_and_ordered(classifier, mnist):
    images = mnist[0]
    real, same, noise = images[3000:3300], images[3300:3600], np.random.default_rng(0).integers(
        0, 256, (300, 28, 28), dtype=np.uint8)
    kw = dict(metrics=["domain_fid", "domain_is"], reference=real, domain_model=classifier, progress=False,
              batch_size=100)
    close = evaluate(same, **kw)
    far = evaluate(noise, **kw)
    for out in (close, far):
        for name, entry in out["metrics"].items():
            assert name.startswith("domain_") and entry["label"].startswith("domain ")
            assert "not comparable" in entry["label"]
    assert close["metrics"]["domain_fid"]["value"] < 0.1 * far["metrics"]["domain_fid"]["value"]
    assert 1.0 <= far["metrics"]["domain_is"]["value"] < close["metrics"]["domain_is"]["value"] <= 10.0
