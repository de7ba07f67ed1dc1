"""Training never loses work: last-K checkpoints with checksums, NaN/Inf gradients, SIGKILL at random steps."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config_dict
from difflab.errors import UserError
from difflab.recipes import train
from difflab.recipes.diffusion import build_diffusion_training
from difflab.training import TrainConfig
from difflab.training import checkpoint as ckpt


def _weights(out: Path) -> dict[str, torch.Tensor]:
    path = ckpt.find_checkpoint(out)
    return {**load_file(str(path / "model.safetensors")), **{f"ema.{k}": v for k, v in load_file(str(path / "ema.safetensors")).items()}}


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_keeps_the_last_k_checkpoints(tmp_path):
    cfg = TrainConfig.from_dict({**tiny_config_dict(steps=5), "log": {**tiny_config_dict()["log"], "checkpoint_every": 1, "keep_checkpoints": 2}})
    train(cfg, tmp_path / "run", progress=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_0000004", "step_0000005"]
    assert ckpt.verify_checkpoint(ckpt.list_checkpoints(tmp_path / "run")[-1]) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_manifest"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    cfg = TrainConfig.from_dict({**tiny_config_dict(steps=4), "log": {**tiny_config_dict()["log"], "checkpoint_every": 2}})
    train(cfg, tmp_path / "run", progress=False)
    older, newest = ckpt.list_checkpoints(tmp_path / "run")
    target = newest / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        (newest / ckpt.MANIFEST).unlink()
    with pytest.warns(UserWarning, match="damaged.*falling back"):
        assert ckpt.find_checkpoint(tmp_path / "run") == older
    for path in (older, newest):
        (path / ckpt.MANIFEST).write_text("{")  # now every checkpoint is damaged
    with pytest.warns(UserWarning), pytest.raises(UserError, match="no intact checkpoint"):
        ckpt.find_checkpoint(tmp_path / "run")


def test_resume_after_fallback_repeats_the_lost_steps_exactly(tmp_path):
    cfg = TrainConfig.from_dict({**tiny_config_dict(steps=6), "log": {**tiny_config_dict()["log"], "checkpoint_every": 2}})
    train(cfg, tmp_path / "straight", progress=False)
    short = TrainConfig.from_dict({**tiny_config_dict(steps=4), "log": {**tiny_config_dict()["log"], "checkpoint_every": 2}})
    train(short, tmp_path / "run", progress=False)
    newest = ckpt.list_checkpoints(tmp_path / "run")[-1]
    (newest / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="damaged"):
        train(cfg, tmp_path / "run", resume=True, progress=False)
    _assert_bitwise_equal(_weights(tmp_path / "straight"), _weights(tmp_path / "run"))


def test_non_finite_gradient_skips_the_step_and_counts_it(tmp_path, tiny_config):
    trainer = build_diffusion_training(tiny_config, tmp_path, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    original_backward = trainer.accelerator.backward

    def poisoned_backward(loss):
        original_backward(loss)
        next(trainer.model.parameters()).grad.view(-1)[0] = float("inf")

    trainer.accelerator.backward = poisoned_backward
    assert trainer.train_step(0) != trainer.train_step(0)  # NaN: both skipped
    assert trainer.skipped_steps == 2 and trainer.bad_steps == 2
    _assert_bitwise_equal(before, trainer.model.state_dict())
    with pytest.raises(UserError, match="NaN/Inf for 3 steps in a row"):
        trainer.train_step(0)
    trainer.accelerator.backward = original_backward
    assert torch.isfinite(torch.tensor(trainer.train_step(0))) and trainer.bad_steps == 0 and trainer.skipped_steps == 3
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # this step was taken


_TRAIN_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from difflab.recipes import train
from difflab.training import TrainConfig
cfg = TrainConfig.from_dict(__import__("json").loads(sys.argv[1]))
train(cfg, sys.argv[2], resume=sys.argv[3] == "1", progress=False)
"""


def _run_until_killed(config: dict, out: Path, resume: bool, kill_after_step: int | None) -> int | None:
    """Start a training process; SIGKILL it once the newest checkpoint reaches ``kill_after_step`` (+ a random delay)."""
    proc = subprocess.Popen([sys.executable, "-c", _TRAIN_SCRIPT, json.dumps(config), str(out), "1" if resume else "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if kill_after_step is None:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
        return None
    deadline = time.monotonic() + 300
    while proc.poll() is None:
        found = ckpt.list_checkpoints(out)
        if found and int(found[-1].name.split("_")[1]) >= kill_after_step:
            break
        assert time.monotonic() < deadline, f"no checkpoint of step {kill_after_step} within 300 s"
        time.sleep(0.01)
    time.sleep(random.Random(kill_after_step).uniform(0.0, 0.3))  # land anywhere: in a step or in a checkpoint write
    # The run must still be going, else this test would not test a kill: see the steps left in the caller.
    assert proc.poll() is None, f"training ended (status {proc.returncode}) before the kill after step {kill_after_step}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


def test_sigkill_at_random_steps_then_resume_is_bitwise_exact(tmp_path):
    """Kill -9 a CPU run three times at random points (checkpoint every step), resume each time: the final
    weights equal an uninterrupted run's bit for bit."""
    # Kills land after step <= 10 + at most 0.3 s; 30 steps leave >= 20 steps with a checkpoint each (>> 0.3 s) to run.
    config = {**tiny_config_dict(steps=30), "log": {**tiny_config_dict()["log"], "checkpoint_every": 1, "keep_checkpoints": 2}}
    _run_until_killed(config, tmp_path / "straight", resume=False, kill_after_step=None)
    rng = random.Random(0)
    kill_steps = sorted(rng.sample(range(2, 11), 3))
    out = tmp_path / "killed"
    for i, step in enumerate(kill_steps):
        assert _run_until_killed(config, out, resume=i > 0, kill_after_step=step) == -signal.SIGKILL
    _run_until_killed(config, out, resume=True, kill_after_step=None)
    _assert_bitwise_equal(_weights(tmp_path / "straight"), _weights(out))
    assert not list((out / "checkpoints").glob(".tmp-*"))  # a kill mid-write leaves one; the next save removes it
    assert json.loads((ckpt.find_checkpoint(out) / "state.json").read_text())["step"] == 30


def test_resume_is_exact_with_learned_variance_importance_sampling_and_posthoc_ema(tmp_path):
    """Every piece of training state survives a stop: the importance sampler's loss history (warm before the
    stop), the post-hoc EMA trackers and their snapshot files."""
    def config(steps):
        d = tiny_config_dict(steps=steps)
        d["schedule"] = {"kind": "linear", "num_timesteps": 3}  # 3 timesteps x 10 losses: warm within a few steps
        d["objective"] = {"parameterization": "eps", "learn_variance": True, "loss": "hybrid", "timestep_sampling": "importance"}
        d["posthoc_ema"] = {"sigma_rels": [0.05, 0.1], "snapshot_every": 4}
        d["log"] = {**d["log"], "checkpoint_every": 0}
        return TrainConfig.from_dict(d)

    train(config(20), tmp_path / "straight", progress=False)
    train(config(12), tmp_path / "run", progress=False)
    state = load_file(str(ckpt.find_checkpoint(tmp_path / "run") / "objective.safetensors"))
    assert int(state["count"].min()) >= 10  # the sampler was warm when the run stopped
    train(config(20), tmp_path / "run", resume=True, progress=False)
    _assert_bitwise_equal(_weights(tmp_path / "straight"), _weights(tmp_path / "run"))
    for name in ("objective", "posthoc_ema_0", "posthoc_ema_1"):
        a = load_file(str(ckpt.find_checkpoint(tmp_path / "straight") / f"{name}.safetensors"))
        b = load_file(str(ckpt.find_checkpoint(tmp_path / "run") / f"{name}.safetensors"))
        _assert_bitwise_equal(a, b)
    snaps = sorted(p.name for p in (tmp_path / "straight" / "ema_snapshots").iterdir())
    assert snaps == sorted(p.name for p in (tmp_path / "run" / "ema_snapshots").iterdir()) and len(snaps) == 10
    for name in snaps:
        _assert_bitwise_equal(load_file(str(tmp_path / "straight" / "ema_snapshots" / name)),
                              load_file(str(tmp_path / "run" / "ema_snapshots" / name)))


def test_corrupted_exported_weights_are_a_one_line_error(tmp_path, tiny_config):
    from difflab.pipelines.diffusion import DiffusionPipeline

    train(tiny_config, tmp_path / "run", progress=False)
    weights = tmp_path / "run" / "unet" / "model.safetensors"  # a v2 pipeline folder: the UNet is a component
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(UserError, match="is unreadable.*re-export"):
        DiffusionPipeline.from_pretrained(tmp_path / "run")
