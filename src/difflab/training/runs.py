"""Start or resume a run of the one :class:`~difflab.training.trainer.Trainer` outside ``difflab train``.

The classifier, autoencoder and metric-network trainings build a :class:`TrainConfig` with
:func:`run_config` and hand their trainer to :func:`fit`, which applies the rules of ``difflab train
--resume``: an existing run is never overwritten; ``resume`` continues it exactly where it stopped, after
checking that it trains the same thing (``OUT/run_settings.json``, written before the first step); a
finished run is left as it is and the result says so (``note``).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from difflab.errors import UserError
from difflab.training.checkpoint import find_checkpoint
from difflab.training.config import TrainConfig

RUN_SETTINGS = "run_settings.json"
RESUMABLE = ("config.optim.steps", "config.log.checkpoint_every", "config.log.keep_checkpoints", "config.log.sample_every")


def run_config(*, seed: int, steps: int, batch_size: int, lr: float, weight_decay: float = 0.0,
               betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 0, grad_clip: float = 0.0,
               ema_decay: float = 0.0, checkpoint_every: int = 0, keep_checkpoints: int = 1,
               data: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
               schedule: dict[str, Any] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` for a non-diffusion training: fp32, no previews, plain AdamW by default
    (no warm-up, clipping or EMA); ``data``/``model``/``schedule`` record what is trained."""
    return TrainConfig.from_dict({
        "seed": seed, "data": data or {}, "model": model or {}, "schedule": schedule or {},
        "optim": {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "betas": list(betas),
                  "warmup_steps": warmup_steps, "grad_clip": grad_clip, "ema_decay": ema_decay, "mixed_precision": "no"},
        "log": {"sample_every": 0, "checkpoint_every": checkpoint_every, "keep_checkpoints": keep_checkpoints},
    })


def run_accelerator(device: str | torch.device | None) -> Any:
    """The Accelerator for ``device``: None (a GPU if there is one), "cuda" or "cpu"."""
    from difflab.training.distributed import make_accelerator

    kind = None if device is None else torch.device(device).type
    if kind not in (None, "cpu", "cuda") or (kind == "cuda" and torch.device(device).index not in (None, 0)):
        raise UserError(f"device={device!r} is not supported here; use cpu or cuda (pick the GPU with CUDA_VISIBLE_DEVICES)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("device='cuda' but no CUDA GPU is available; use device='cpu'")
    return make_accelerator("no", cpu=kind == "cpu")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix.rstrip("."): value}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def check_resume(out_dir: Path, settings: dict[str, Any], resume: bool, what: str = "a training run",
                 resumable: tuple[str, ...] = RESUMABLE) -> Path | None:
    """The checkpoint to continue from (None: start afresh), after refusing to overwrite a run or to resume
    one with other ``settings`` (JSON-able; the dotted keys in ``resumable``, or under a prefix there ending
    in ".", may change)."""
    existing = find_checkpoint(out_dir) if out_dir.is_dir() else None
    if existing and not resume:
        raise UserError(f"{out_dir} already holds {what}; pass --resume to continue it or choose another --out")
    path = out_dir / RUN_SETTINGS
    saved = None
    if resume and path.is_file():
        try:
            saved = _flatten(json.loads(path.read_text()))
        except ValueError:
            raise UserError(f"{path} is not valid JSON; delete it to start the run afresh") from None
    elif resume and existing:  # a run from before run_settings.json: its checkpoint records the config
        from difflab.training.checkpoint import load_checkpoint

        saved = _flatten(json.loads(json.dumps({**settings, "config": load_checkpoint(existing)[1]["config"]})))
    if saved is not None:
        new = _flatten(json.loads(json.dumps(settings)))
        free = [p for p in resumable if p.endswith(".")]
        diff = sorted(k for k in set(saved) | set(new) if k not in resumable and not any(k.startswith(p) for p in free)
                      and saved.get(k) != new.get(k))
        if diff:
            raise UserError(f"cannot resume {out_dir} with different settings: {', '.join(diff)} differ; "
                            "resume with the original settings")
    if resume and not existing:
        warnings.warn(f"no checkpoint in {out_dir} yet; starting the run from step 0", UserWarning, stacklevel=3)
    return existing


def fit(build: Callable[[], Any], out_dir: str | Path, settings: dict[str, Any], *, resume: bool = False,
        what: str = "a training run", resumable: tuple[str, ...] = RESUMABLE) -> tuple[Any, Any]:
    """Build the trainer (``build()``), restore it with ``resume``, and run it: ``(trainer, TrainResult)``.

    ``settings`` describe the run (say ``{"config": config.to_dict(), ...}``); see :func:`check_resume`.
    A finished run is restored but not trained; its result carries a ``note``.
    """
    from difflab.io.files import atomic_write
    from difflab.training.trainer import TrainResult

    out_dir = Path(out_dir)
    existing = check_resume(out_dir, settings, resume, what, resumable)
    trainer = build()
    if existing is not None:
        trainer.restore(existing)
        steps = trainer.config.optim.steps
        if trainer.step >= steps:
            note = (f"the run in {out_dir} is complete at step {trainer.step} (steps={steps}); nothing to do "
                    "(raise --steps to train further)")
            return trainer, TrainResult(trainer.step, trainer.smoothed.get("loss", float("nan")), 0.0, out_dir,
                                        dict(trainer.smoothed), note=note)
    elif trainer.accelerator.is_main_process:
        atomic_write(out_dir / RUN_SETTINGS, lambda p: p.write_text(json.dumps(settings, indent=2)))
    return trainer, trainer.run()


def trained_model(trainer: Any) -> torch.nn.Module:
    """The model a run exports: the EMA weights (with ``ema_decay`` 0 bitwise the trained ones), in eval mode."""
    return trainer.ema.model.eval()


@contextlib.contextmanager
def scratch_dir(out_dir: str | Path | None) -> Iterator[Path]:
    """``out_dir``, or a temporary folder (removed afterwards) for a run whose model is kept in memory."""
    if out_dir is not None:
        yield Path(out_dir)
        return
    with tempfile.TemporaryDirectory(prefix="difflab-run-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Torch intra-op threads set to ``num_threads`` inside the block (None: unchanged), restored after."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fit_in_memory(model: torch.nn.Module, dataset: Any, objective: Any, config: TrainConfig,
                  out_dir: str | Path | None = None, *, resume: bool = False, progress: bool = True,
                  what: str = "a training run") -> tuple[torch.nn.Module, dict[str, Any]]:
    """:func:`fit` for a network kept in memory (metric networks): checkpoints in ``out_dir`` (default: a
    temporary folder); returns the trained (EMA) model on the CPU and the last record of its log.jsonl.
    It may run inside another training (single-process), whose Accelerate state it leaves as it was."""
    from difflab.training.distributed import nested_run
    from difflab.training.trainer import Trainer

    with nested_run(), scratch_dir(out_dir) as out:
        trainer, _ = fit(lambda: Trainer(model, dataset, objective, config, out, progress=progress), out,
                         {"config": config.to_dict(), "objective": objective.name}, resume=resume, what=what)
        log = out / "log.jsonl"
        lines = log.read_text().splitlines() if log.is_file() else []
    return trained_model(trainer).cpu(), json.loads(lines[-1]) if lines else {}
