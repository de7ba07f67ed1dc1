"""``difflab plot-log``: the training curves of a run, drawn from its ``log.jsonl``.

The trainer appends one record per step (``step``, ``loss``, the objective's terms, ``images_per_second``,
``skipped_steps``) and, for shapes + text runs, one per preview with the shapes oracle's prompt adherence
(``adherence_*``). This draws the loss (raw and smoothed, log scale) and the adherence against the step.
matplotlib is imported only here (``pip install "difflab[plot]"``), through its Agg canvas.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from difflab.errors import UserError

LOG_NAME = "log.jsonl"
SMOOTHING = 0.98  # the progress bar's smoothing of the loss (Trainer._smooth), here without its start-up bias
WIDTH_IN, LOSS_HEIGHT_IN, ADHERENCE_HEIGHT_IN, DPI = 8.0, 4.0, 2.5, 100  # 800 x 400 px, 800 x 650 with adherence
FORMATS = (".png", ".svg", ".pdf")


def read_log(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step records with a loss, preview records with adherence), each sorted by step; a step logged twice
    (a run resumed from a checkpoint before it) keeps its last record, and unreadable lines (a run killed
    mid-write) are skipped."""
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass the --out folder of a `difflab train` run (it writes {LOG_NAME})")
    losses: dict[int, dict[str, Any]] = {}
    adherence: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        if "loss" in record:
            losses[record["step"]] = record
        if any(k.startswith("adherence_") for k in record):
            adherence[record["step"]] = record
    if not losses:
        raise UserError(f"{path} holds no training records yet; plot it once the run has trained a step")
    return [losses[s] for s in sorted(losses)], [adherence[s] for s in sorted(adherence)]


def smooth(values: list[float], decay: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (Adam's correction): the mean of the values weighted by
    ``decay^age``, so the first points are not pulled towards the first value; non-finite values are skipped."""
    out, total, weight = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            total, weight = decay * total + (1 - decay) * v, decay * weight + (1 - decay)
        out.append(total / weight if weight else math.nan)
    return out


def plot_log(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``RUN_DIR/log.jsonl`` into ``out`` (default ``RUN_DIR/log.png``; .png, .svg or .pdf); returns the path."""
    from difflab.io.files import ensure_writable_file

    run = Path(run_dir)
    path = Path(out) if out is not None else run / "log.png"
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"--out {path} has no image suffix; end it in {', '.join(FORMATS)}, e.g. {path.with_suffix('.png')}")
    losses, previews = read_log(run / LOG_NAME)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError('difflab plot-log needs matplotlib: pip install "difflab[plot]"') from None
    ensure_writable_file(path)
    height = LOSS_HEIGHT_IN + (ADHERENCE_HEIGHT_IN if previews else 0.0)
    fig = Figure(figsize=(WIDTH_IN, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if previews else 1, 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": [LOSS_HEIGHT_IN, ADHERENCE_HEIGHT_IN] if previews else [1]})[:, 0]
    _draw_loss(axes[0], losses, run)
    if previews:
        _draw_adherence(axes[1], previews)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _draw_loss(ax: Any, losses: list[dict[str, Any]], run: Path) -> None:
    steps = [r["step"] for r in losses]
    values = [float(r["loss"]) if isinstance(r["loss"], (int, float)) else math.nan for r in losses]
    ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss")
    ax.plot(steps, smooth(values), color="tab:blue", linewidth=1.8, label=f"smoothed (EMA {SMOOTHING:g})")
    if all(v > 0 for v in values if math.isfinite(v)):  # a VLB-type loss can be negative: then a linear axis
        ax.set_yscale("log")
    ax.set_ylabel("training loss")
    ax.set_title(f"{run.name}: {len(steps)} steps")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper right")


def _draw_adherence(ax: Any, previews: list[dict[str, Any]]) -> None:
    steps = [r["step"] for r in previews]
    keys = sorted({k for r in previews for k in r if k.startswith("adherence_")})
    for key in keys:
        ax.plot(steps, [100 * r.get(key, math.nan) for r in previews], "o-", markersize=3,
                label=key[len("adherence_"):].replace("_", " "))
    accuracy = {k[len("oracle_"):-len("_accuracy")]: v for k, v in previews[-1].items()
                if k.startswith("oracle_") and k.endswith("_accuracy")}
    if accuracy:  # the oracle's own accuracy on real images: how far its scores can be trusted
        ax.set_title("oracle accuracy on real images: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in accuracy.items()),
                     fontsize=9)
    ax.set_ylim(-5, 105)
    ax.set_ylabel("prompt adherence (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, ncol=len(keys))


@click.command("plot-log")
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Image to write (.png, .svg or .pdf).  [default: RUN_DIR/log.png]")
def plot_log_command(run_dir: str, out_path: str | None) -> None:
    """Plot RUN_DIR/log.jsonl: the smoothed training loss and, if logged, the prompt adherence against steps."""
    path = plot_log(run_dir, out_path)
    click.echo(f"plot written to {path}")
