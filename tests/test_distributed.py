"""Multi-process training through Accelerate: 2 CPU processes (gloo) equal 1 process with the whole batch."""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config_dict
from difflab.errors import UserError
from difflab.training import checkpoint as ckpt
from difflab.training.distributed import check_accelerate_config, check_mixed_precision, launch


def _train(tmp_path, name, *extra, seed=0):
    config = {**tiny_config_dict(steps=3), "seed": seed, "log": {"sample_every": 0, "checkpoint_every": 0}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / name
    result = subprocess.run([sys.executable, "-m", "difflab", "train", "--config", str(path), "--out", str(out),
                             "--no-progress", *extra], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_two_gloo_processes_match_one_process_with_the_whole_batch(tmp_path):
    """Each of the 2 processes takes half of every global batch of 4 and DDP averages the gradients, so after 3
    AdamW steps the weights equal a 1-process run on the full batch up to float summation order. Tolerance 1e-4:
    a tenth of one step's largest update (lr = 1e-3); a run with another seed differs by far more."""
    two, out_two = _train(tmp_path, "two", "--num-processes", "2")
    one, _ = _train(tmp_path, "one")
    other, _ = _train(tmp_path, "other", seed=1)
    w2, w1, wo = (load_file(str(ckpt.find_checkpoint(d) / "model.safetensors")) for d in (two, one, other))
    assert max((w2[k] - w1[k]).abs().max().item() for k in w1) < 1e-4
    assert max((wo[k] - w1[k]).abs().max().item() for k in w1) > 1e-2
    assert len((two / "log.jsonl").read_text().splitlines()) == 3  # only rank 0 logs
    assert out_two.count("model written to") == 1  # and reports


def test_accelerate_config_that_does_not_match_the_machine(tmp_path):
    cfg = tmp_path / "accelerate.yaml"
    cfg.write_text(yaml.safe_dump({"distributed_type": "MULTI_GPU", "num_processes": 8, "mixed_precision": "bf16"}))
    with pytest.raises(UserError, match="MULTI_GPU with 8 processes on this machine, but it has 0 GPU"):
        check_accelerate_config(cfg, None, gpus=0)
    with pytest.raises(UserError, match="MULTI_GPU with 4 processes.*has 2 GPU.*--num-processes 2"):
        check_accelerate_config(cfg, 4, gpus=2)
    cfg.write_text(yaml.safe_dump({"distributed_type": "MULTI_CPU", "num_processes": 2, "use_cpu": True, "mixed_precision": "fp16"}))
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        check_accelerate_config(cfg, 2, gpus=0)
    with pytest.raises(UserError, match="does not exist"):
        check_accelerate_config(tmp_path / "missing.yaml", 2)
    with pytest.raises(UserError, match="--num-processes=0 is invalid"):
        launch([], 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_fp16_on_cpu_is_refused_not_silently_fp32():
    with pytest.raises(UserError, match="use --mixed-precision bf16 or no"):
        check_mixed_precision("fp16")
    check_mixed_precision("bf16")
    check_mixed_precision("no")


def test_auto_mixed_precision_is_bf16_only_on_a_gpu_that_supports_it():
    from difflab.training.distributed import resolve_mixed_precision

    expected = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    assert resolve_mixed_precision("auto") == expected
    assert [resolve_mixed_precision(m) for m in ("no", "fp16", "bf16")] == ["no", "fp16", "bf16"]
