"""Shared test settings: small thread count, a tiny training config, the shared data sets."""

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_FILES = ("mnist/t10k-images-idx3-ubyte.gz", "mnist/t10k-labels-idx1-ubyte.gz")
CIFAR_FILES = ("cifar10/cifar10-test-jpeg.zip",)


def require_shared_data(*files: str) -> Path:
    """SHARED_DATA, after checking that each of ``files`` (relative to it) exists.

    A missing file skips the test on a developer's machine but fails it under CI (``CI=true``), where
    the data are provisioned and a skip would hide a broken set-up.
    """
    missing = [f for f in files if not (SHARED_DATA / f).exists()]
    if missing:
        message = f"shared test data missing: {', '.join(str(SHARED_DATA / f) for f in missing)}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: the shared data must be provisioned)", pytrace=False)
        pytest.skip(message)
    return SHARED_DATA

TINY_MODEL = {"base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
              "head_channels": 16, "norm_groups": 8}


def tiny_config_dict(**optim):
    return {
        "seed": 0,
        "data": {"dataset": "shapes", "resolution": 16, "num_images": 64},
        "model": dict(TINY_MODEL),
        "schedule": {"kind": "linear", "num_timesteps": 100},
        # eps and L_simple as written: several truths read the network's output as eps. The default recipe
        # (v, min-SNR, cosine) trains in test_training's default tests and in the demo test.
        "objective": {"parameterization": "eps", "weighting": "uniform"},
        "optim": {"steps": 6, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, **optim},
        "log": {"sample_every": 0, "checkpoint_every": 3, "num_samples": 4, "sample_steps": 3},
    }


def run_cli(argv, capsys):
    """Run ``difflab ARGV`` in-process: (exit status, stdout, stderr)."""
    from difflab.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


@pytest.fixture
def one_thread():
    """Small tensors: a second intra-op thread costs more than it saves (and far more on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config():
    from difflab.training import TrainConfig

    return TrainConfig.from_dict(tiny_config_dict())
