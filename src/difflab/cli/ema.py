"""``difflab ema``: a model with any EMA length, rebuilt from a run's post-hoc EMA snapshots.

Post-hoc EMA of Karras et al. 2024 (EDM2, sec. 3); the math is in :mod:`difflab.training.posthoc_ema`.
This module only resolves the paths, swaps the reconstructed weights into the run's exported pipeline and
writes a sampling-ready model folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from difflab.errors import UserError
from difflab.training.posthoc_ema import MAX_FIT_ERROR, SNAPSHOT_DIR, ReconstructionReport, reconstruct

REPORT_NAME = "posthoc_ema.json"


def export_posthoc_ema(run_dir: str | Path, sigma_rel: float, step: int | None = None, out_dir: str | Path | None = None,
                       *, max_fit_error: float = MAX_FIT_ERROR) -> tuple[Path, ReconstructionReport]:
    """Reconstruct the EMA of length ``sigma_rel`` and save the run's pipeline with it into ``out_dir``.

    ``out_dir`` defaults to ``RUN_DIR/ema-<sigma_rel>``; it also receives ``posthoc_ema.json`` (the
    snapshots, their coefficients and the profile fit error).
    """
    from difflab.pipelines.diffusion import DiffusionPipeline
    from difflab.io.model_folder import load_weights

    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist; pass the --out folder of a `difflab train` run")
    if not max_fit_error > 0:
        raise UserError(f"--max-fit-error must be > 0, got {max_fit_error}; {MAX_FIT_ERROR} is the default")
    out = Path(out_dir) if out_dir is not None else run / f"ema-{sigma_rel:g}"
    if out.resolve() == run.resolve():
        raise UserError(f"--out {out} is the run directory itself; its model would be overwritten, choose another folder")
    state, report = reconstruct(run / SNAPSHOT_DIR, sigma_rel, step, max_fit_error=max_fit_error)
    pipe = DiffusionPipeline.from_pretrained(run)
    load_weights(pipe.unet, state, run / SNAPSHOT_DIR)
    pipe.extra_config["posthoc_ema"] = {"sigma_rel": report.sigma_rel, "gamma": report.gamma, "step": report.step,
                                        "fit_error": report.fit_error, "num_snapshots": len(report.snapshots)}
    pipe.save_pretrained(out)
    (out / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=1))
    return out, report


@click.command("ema")
@click.argument("run_dir", type=click.Path())
@click.option("--length", "sigma_rel", type=float, required=True,
              help="EMA length sigma_rel: the averaging profile's std relative to the training time (EDM2); e.g. 0.05-0.2.")
@click.option("--step", type=int, default=None, help="Training step to reconstruct at.  [default: the last snapshot]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Model folder to write.  [default: RUN_DIR/ema-<length>]")
@click.option("--max-fit-error", type=float, default=MAX_FIT_ERROR, show_default=True,
              help="Largest relative L2 error of the fitted averaging profile that is accepted.")
def ema_command(run_dir: str, sigma_rel: float, step: int | None, out_dir: str | None, max_fit_error: float) -> None:
    """Rebuild RUN_DIR's model with any EMA length from its post-hoc EMA snapshots (Karras et al. 2024)."""
    out, report = export_posthoc_ema(run_dir, sigma_rel, step, out_dir, max_fit_error=max_fit_error)
    click.echo(f"reconstructed the EMA of length {report.sigma_rel:g} (gamma {report.gamma:.3f}) at step {report.step} "
               f"from {len(report.snapshots)} snapshots, profile fit error {report.fit_error:.2%}")
    click.echo(f"model written to {out} (sample it with: difflab sample --model {out})")
