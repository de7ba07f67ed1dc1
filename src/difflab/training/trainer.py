"""The one training loop, on Hugging Face Accelerate (one process here, many with ``accelerate launch``).

``Trainer(model, dataset, objective, config, out_dir)`` trains anything: a diffusion model, an
autoencoder, a classifier, an oracle, a distillation student. The :class:`~difflab.training.objectives.Objective`
says what the loss is; the trainer does the rest: data order, AdamW with warm-up and clipping, EMA,
gradient accumulation, mixed precision, the NaN/Inf guard, atomic checkpoints with exact resume, the
progress bar, ``log.jsonl``, previews and the exported model folder.

Randomness is a pure function of (seed, step): the data order of every epoch and the objective's draws
of every step (:meth:`Objective.prepare`) come from generators seeded by them, for the whole global batch,
and each process takes its slice. So a resumed run repeats exactly what an uninterrupted run would do,
and N processes see exactly the batch one process with N times the batch would see.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from difflab.errors import UserError
from difflab.io.files import ensure_writable_dir
from difflab.noise import seeded_generator
from difflab.training import checkpoint as ckpt
from difflab.training import posthoc_ema
from difflab.training.distributed import make_accelerator
from difflab.training.ema import EMA
from difflab.training.objectives.base import Batch, Objective

MAX_BAD_STEPS = 3
# tqdm's own bar without its step-count ETA ({remaining}); the postfix carries the ETA that knows the time limit
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C or SIGTERM once the checkpoint is safely on disk."""


@dataclass
class TrainResult:
    step: int
    loss: float
    images_per_second: float  # samples per second (the name is kept from v1)
    out_dir: Path
    metrics: dict[str, float] | None = None  # smoothed batch means of the objective's terms
    note: str | None = None  # set when nothing was trained (e.g. resuming a finished run)


class Trainer:
    """Train ``model`` on ``dataset`` with ``objective`` as ``config`` (``seed``, ``optim``, ``log``,
    ``posthoc_ema`` sections, :class:`~difflab.training.config.TrainConfig`) says, into ``out_dir``.

    ``dataset`` yields items ``{"x", "cond", "mask"}`` and batches them with its ``collate``.
    ``time_limit``: seconds after which :meth:`run` stops before ``optim.steps`` (the checkpoint is still saved);
    default ``optim.time_limit_s``. A limit that runs out before the run's first step is done is a :class:`UserError`.
    The progress bar shows the smoothed loss, samples per second and the ETA of whichever ends first, the steps or the time.
    """

    def __init__(self, model: nn.Module, dataset: Any, objective: Objective, config: Any, out_dir: str | Path, *,
                 progress: bool = True, accelerator: Any = None, time_limit: float | None = None) -> None:
        self.config = config
        # seconds of run() after which it stops early (and still saves); the argument wins over optim.time_limit_s
        self.time_limit = time_limit if time_limit is not None else config.optim.time_limit_s
        if self.time_limit is not None and not self.time_limit > 0:
            raise UserError(f"time limit {self.time_limit!r} s is not positive; give seconds > 0 (e.g. 3600) or none")
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.accelerator = accelerator or make_accelerator(config.optim.mixed_precision)
        if self.accelerator.is_main_process:
            ensure_writable_dir(self.out_dir)
        if len(dataset) < 1:
            raise UserError("the dataset is empty; give at least one training item")
        if config.optim.batch_size > len(dataset):
            raise UserError(f"optim.batch_size={config.optim.batch_size} is larger than the dataset ({len(dataset)} items), "
                            f"so every batch would repeat items; lower optim.batch_size (--batch-size) to at most "
                            f"{len(dataset)} or give more data (data.num_images, --num-images)")
        self.dataset = dataset
        self.objective = objective
        o = config.optim
        # channels-last 2-D convolutions (docs/benchmarks.md, section 2): weights before the EMA copy and the optimizer
        self.channels_last = bool(o.channels_last) and any(p.dim() == 4 for p in model.parameters())
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.ema = EMA(model, o.ema_decay)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay,
                                           betas=tuple(o.betas), foreach=True)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / max(o.warmup_steps, 1)))
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.ema.model.to(self.accelerator.device)
        ph = config.posthoc_ema  # power-function EMA trackers (main process only: only it writes snapshots)
        self.posthoc_ema = ([posthoc_ema.PowerEMA(self.accelerator.unwrap_model(self.model), s) for s in ph.sigma_rels]
                            if ph.snapshot_every and self.accelerator.is_main_process else [])
        self.step = 0
        self.bad_steps = 0  # non-finite steps in a row
        self.skipped_steps = 0  # non-finite steps in total
        self.smoothed: dict[str, float] = {}
        self.step_metrics: dict[str, float] = {}  # the objective's metrics of the last good step (for log.jsonl)
        self._order: tuple[int, torch.Tensor | None] = (-1, None)  # (epoch, its data order), see _epoch_order

    # ----- randomness as a function of (seed, step) -------------------------------------------
    def _generator(self, *keys: int) -> torch.Generator:
        return seeded_generator(self.config.seed, *keys)

    def _batch_indices(self, step: int) -> torch.Tensor:
        """Dataset indices of the global batch at ``step`` (epoch-wise permutations, no repeats within an epoch)."""
        n, bs = len(self.dataset), self.config.optim.batch_size
        positions = torch.arange(step * bs, (step + 1) * bs)
        epochs = positions // n
        out = torch.empty(bs, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._epoch_order(epoch)[positions[mask] % n]
        return out

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The data order of ``epoch``, drawn once per epoch rather than once per step."""
        if self._order[0] != epoch:
            self._order = (epoch, torch.randperm(len(self.dataset), generator=self._generator(1, epoch)))
        return self._order[1]

    def global_batch(self, step: int) -> Batch:
        """The prepared global batch of ``step`` (CPU): collated items (and ``"step"``, for objectives with a
        schedule such as a GAN that starts later) plus the objective's random draws."""
        items = [self.dataset[int(i)] for i in self._batch_indices(step)]
        collate = getattr(self.dataset, "collate", None)
        if collate is None:
            from difflab.data.collate import stack_collate as collate
        return self.objective.prepare({**collate(items), "step": step}, self._generator(2, step))

    def _local_batch(self, step: int) -> Batch:
        """This process's rows of the global batch, on its device."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        batch = _rows(self.global_batch(step), slice(rank, None, world), self.accelerator.device)
        if self.channels_last and isinstance(batch.get("x"), Tensor) and batch["x"].dim() == 4:
            batch["x"] = batch["x"].contiguous(memory_format=torch.channels_last)
        return batch

    # ----- one optimisation step --------------------------------------------------------------
    def train_step(self, step: int) -> float:
        batch = self._local_batch(step)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        terms: dict[str, list[Tensor]] = {}  # per-sample terms of every micro-batch
        n = _batch_size(batch)
        loss = torch.zeros((), device=self.accelerator.device)
        chunks = torch.arange(n).tensor_split(min(self.config.optim.grad_accum_steps, n))
        for i, idx in enumerate(chunks):  # gradient accumulation: the gradient of the mean over the whole batch
            last = i == len(chunks) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):  # all-reduce once
                with self.accelerator.autocast():
                    losses, parts = self.objective.loss(self.model, _rows(batch, idx))
                part = losses.mean() * (len(idx) / n)
                self.accelerator.backward(part)
            for key, value in parts.items():
                terms.setdefault(key, []).append(value.detach())
            loss += part.detach()
        terms_all = {k: torch.cat([v.reshape(-1) if v.ndim == 0 else v for v in vs]) for k, vs in terms.items()}
        clip = self.config.optim.grad_clip if self.config.optim.grad_clip > 0 else math.inf
        grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), clip))  # gradients are already averaged
        loss_value = self.accelerator.reduce(loss.detach(), reduction="mean").item()
        # fp16: the gradient scaler itself skips steps with overflowing gradients while it calibrates.
        grads_ok = math.isfinite(grad_norm) or self.accelerator.mixed_precision == "fp16"
        if not (math.isfinite(loss_value) and grads_ok):
            return self._skip_bad_step(step)
        self.bad_steps = 0
        self.objective.observe(batch, terms_all, self.accelerator.gather)
        self.optimizer.step()
        self.lr_schedule.step()
        self.ema.update(self.accelerator.unwrap_model(self.model))
        self.step_metrics = self.objective.metrics(terms_all)
        self._smooth({"loss": loss_value, **self.step_metrics})
        return loss_value

    def _smooth(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            if math.isfinite(v):
                self.smoothed[k] = v if k not in self.smoothed else 0.98 * self.smoothed[k] + 0.02 * v

    def _update_posthoc_ema(self) -> None:
        """Power-function EMAs after every step (skipped ones too), snapshots every ``snapshot_every`` steps and at the end."""
        model, every = self.accelerator.unwrap_model(self.model), self.config.posthoc_ema.snapshot_every
        for tracker in self.posthoc_ema:
            tracker.update(model, self.step)
            if self.step % every == 0 or self.step == self.config.optim.steps:
                posthoc_ema.save_snapshot(self.out_dir, tracker)

    def _skip_bad_step(self, step: int) -> float:
        """Drop this step's update (a NaN/Inf loss or gradient); stop after ``MAX_BAD_STEPS`` in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.step_metrics = {}
        self.bad_steps += 1
        self.skipped_steps += 1
        if self.bad_steps >= MAX_BAD_STEPS:
            raise UserError(
                f"the loss or its gradient was NaN/Inf for {MAX_BAD_STEPS} steps in a row (last at step {step}); lower optim.lr or use "
                f"mixed_precision bf16/no instead of fp16; the last good checkpoint in {self.out_dir} is kept"
            )
        return float("nan")

    # ----- checkpoints and exports ------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint (everything needed to continue) and export the EMA model, on the main process only."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        model = self.accelerator.unwrap_model(self.model)
        opt_tensors, opt_meta = ckpt.optimizer_to_flat(self.optimizer.state_dict())
        rng_tensors, rng_meta = ckpt.rng_state()
        state = {"step": self.step, "config": self.config.to_dict(), "objective": self.objective.name,
                 "optimizer": opt_meta, "rng": rng_meta, "ema_updates": self.ema.num_updates,
                 "lr_schedule": self.lr_schedule.state_dict(), "bad_steps": self.bad_steps,
                 "skipped_steps": self.skipped_steps, "smoothed": self.smoothed}
        tensors = {"model": model.state_dict(), "ema": self.ema.model.state_dict(), "optimizer": opt_tensors,
                   "rng": rng_tensors, "objective": self.objective.state_dict()}
        ph_tensors, state["posthoc_ema"] = posthoc_ema.checkpoint_entries(self.posthoc_ema)
        tensors.update(ph_tensors)
        ckpt.save_checkpoint(self.out_dir, tensors, state, keep=self.config.log.keep_checkpoints)
        self.objective.export(self.ema.model, self.out_dir)

    def restore(self, path: Path) -> None:
        tensors, state = ckpt.load_checkpoint(path)
        self.accelerator.unwrap_model(self.model).load_state_dict(tensors["model"])
        self.ema.model.load_state_dict(tensors["ema"])
        self.ema.num_updates = state["ema_updates"]
        self.optimizer.load_state_dict(ckpt.optimizer_from_flat(tensors["optimizer"], state["optimizer"]))
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        ckpt.set_rng_state(tensors["rng"], state["rng"])
        posthoc_ema.load_checkpoint_entries(self.posthoc_ema, tensors, state["posthoc_ema"])
        # checkpoints written before issue 11 named the objective's state after the diffusion timestep sampler
        self.objective.load_state_dict(tensors.get("objective", tensors.get("timestep_sampler", {})))
        self.step, self.bad_steps, self.skipped_steps = state["step"], state["bad_steps"], state["skipped_steps"]
        self.smoothed = dict(state.get("smoothed", {}))

    def save_samples(self) -> Path | None:
        """A preview of the EMA model (``OUT/samples/step_N.*``, the format the modality picks); the scores of
        its samples, if the objective gives any (e.g. prompt adherence), go into log.jsonl with the step."""
        if not self.accelerator.is_main_process:
            return None
        path = self.out_dir / "samples" / f"step_{self.step:07d}"
        path.parent.mkdir(exist_ok=True)
        preview = self.objective.preview(self.ema.model, path)
        if preview is None:
            return None
        if preview.metrics:
            self._log_line({"step": self.step, **preview.metrics})
        return preview.path

    # ----- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        o, log = self.config.optim, self.config.log
        bar = tqdm(total=o.steps, initial=self.step, disable=not (self.progress and self.accelerator.is_main_process),
                   desc="train", unit="step", dynamic_ncols=True, bar_format=BAR_FORMAT)
        started, start_step = _now(), self.step
        previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
        try:
            while self.step < o.steps:
                if self.step > start_step and self.time_limit is not None and self._elapsed(started) > self.time_limit:
                    break
                loss = self.train_step(self.step)
                self.step += 1
                elapsed = self._elapsed(started)
                if self.step == start_step + 1:
                    self._check_time_for_one_step(elapsed)
                self._update_posthoc_ema()
                rate = (self.step - start_step) * o.batch_size / max(elapsed, 1e-9)
                bar.update(1)
                bar.set_postfix(self.progress_postfix(elapsed, start_step, rate))
                self._log_line({"step": self.step, "loss": loss, **self.step_metrics, "images_per_second": rate,
                                "skipped_steps": self.skipped_steps})
                if log.checkpoint_every and self.step % log.checkpoint_every == 0 and self.step < o.steps:
                    self.save()
                if log.sample_every and self.step % log.sample_every == 0:
                    self.save_samples()
        except KeyboardInterrupt:
            bar.close()
            self.save()
            raise TrainingInterrupted(f"interrupted at step {self.step}; checkpoint saved in {self.out_dir}; continue with --resume") from None
        finally:
            bar.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        self.save()
        rate = (self.step - start_step) * o.batch_size / max(_now() - started, 1e-9)
        return TrainResult(self.step, self.smoothed.get("loss", math.nan), rate, self.out_dir, dict(self.smoothed))

    def _elapsed(self, started: float) -> float:
        """Seconds since ``started``; with a time limit on several processes the slowest one's, so all stop together."""
        elapsed = _now() - started
        if self.time_limit is not None and self.accelerator.num_processes > 1:
            elapsed = float(self.accelerator.gather(torch.tensor([elapsed], device=self.accelerator.device)).max())
        return elapsed

    def progress_postfix(self, elapsed: float, start_step: int, rate: float) -> dict[str, str]:
        """The progress bar's smoothed loss, samples per second and ETA (:func:`eta`: steps or time limit, whichever ends first)."""
        seconds, by_time = eta(self.step - start_step, self.config.optim.steps - self.step, elapsed, self.time_limit)
        return {"loss": f"{self.smoothed.get('loss', math.nan):.4f}", "img_s": f"{rate:.1f}",
                "eta": tqdm.format_interval(seconds) + (" (time limit)" if by_time else "")}

    def _check_time_for_one_step(self, elapsed: float) -> None:
        """A time limit that runs out during the run's first step would save a model without progress: refuse it."""
        if self.time_limit is None or elapsed <= self.time_limit:
            return
        left = self.config.optim.steps - self.step + 1
        raise UserError(f"the time limit of {self.time_limit:g} s ran out before the first training step finished "
                        f"(it took {elapsed:.3g} s); give at least {math.ceil(elapsed):d} s for one step, about "
                        f"{math.ceil(elapsed * left):d} s for all {left} steps (--time-limit, optim.time_limit_s); nothing was saved")

    def _log_line(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


def eta(steps_done: int, steps_left: int, elapsed: float, time_limit: float | None) -> tuple[float, bool]:
    """Seconds until the run ends, and whether the time limit (not the step count) ends it.

    At the mean step time ``elapsed / steps_done`` so far: a step starts while ``elapsed <= time_limit``
    (:meth:`Trainer.run`), so ``floor((time_limit - elapsed) / step_time) + 1`` more steps fit in the budget.
    """
    step_time = elapsed / max(steps_done, 1)
    if time_limit is not None and step_time > 0:
        in_budget = math.floor((time_limit - elapsed) / step_time) + 1 if elapsed <= time_limit else 0
        if in_budget < steps_left:
            return in_budget * step_time, True
    return steps_left * step_time, False


def _now() -> float:
    """The trainer's clock (seconds; a function so that tests can replace it)."""
    return time.perf_counter()


def _batch_size(batch: Batch) -> int:
    return int(batch["x"].shape[0]) if isinstance(batch.get("x"), Tensor) else len(next(iter(batch.values())))


def _rows(value: Any, rows: slice | Tensor, device: torch.device | None = None) -> Any:
    """The rows ``rows`` of every tensor / list in a (nested) batch, optionally moved to ``device``."""
    if isinstance(value, dict):
        return {k: _rows(v, rows, device) for k, v in value.items()}
    if isinstance(value, Tensor):
        out = value[rows]
        return out.to(device) if device is not None else out
    if isinstance(value, (list, tuple)):
        picked = value[rows] if isinstance(rows, slice) else [value[int(i)] for i in rows]
        return list(picked)
    return value


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
