"""The diffusion objective: ``q(x_t | x_0)`` noising and the regression / VLB loss of :mod:`difflab.losses`.

Per sample: t (and its weight ``1 / (T p_t)``) from the timestep sampler, eps ~ N(0, I) projected by the
model's :class:`~difflab.space.Space`, the conditions with their training-time dropout, then
``w(t) ||target - prediction||^2`` (or the VLB / hybrid loss) averaged over the sample's real dimensions
(its mask). Every parameterization, weighting and loss of :class:`~difflab.training.config.ObjectiveConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.conditioning import drop_mask
from difflab.losses import diffusion_loss
from difflab.schedules import NoiseSchedule
from difflab.training.objectives.base import Batch, Objective, Preview
from difflab.training.timesteps import make_timestep_sampler


class DiffusionObjective(Objective):
    """``pipeline(model)`` builds the sampling pipeline of a network (for the exported folder and previews);
    ``preview_kwargs`` are the pipeline's call arguments for the preview grid; ``preview_metrics(samples)``,
    if given, scores the preview's samples for log.jsonl (e.g. the shapes oracle's prompt adherence)."""

    name = "diffusion"

    def __init__(self, schedule: NoiseSchedule, objective: Any, conditioner: Any, *, dropout: float = 0.1,
                 space: Any = None, pipeline: Callable[[nn.Module], Any] | None = None,
                 preview_kwargs: dict[str, Any] | None = None,
                 preview_metrics: Callable[[Tensor], dict[str, float]] | None = None) -> None:
        from difflab.space import Space

        self.schedule = schedule
        self.config = objective
        self.conditioner = conditioner
        self.dropout = dropout
        self.space = space or Space()
        self.timestep_sampler = make_timestep_sampler(objective.timestep_sampling, schedule)
        self.pipeline = pipeline
        self.preview_kwargs = dict(preview_kwargs or {})
        self.preview_metrics = preview_metrics

    def prepare(self, batch: Batch, generator: torch.Generator) -> Batch:
        x0 = batch["x"]
        t, weights = self.timestep_sampler.sample(len(x0), generator)
        noise = self.space.project(torch.randn(x0.shape, generator=generator), batch.get("mask"))
        drop = drop_mask(len(x0), self.dropout, generator)
        cond = self.conditioner.prepare(batch["cond"], drop, generator)
        return {"x": x0, "mask": batch.get("mask"), "t": t, "weights": weights, "noise": noise, "cond": cond}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        ob, terms = self.config, {}
        x0 = batch["x"]
        cond = self.conditioner.network_kwargs(batch["cond"], x0.device)
        losses = diffusion_loss(model, x0, self.schedule, batch["t"].cpu(), batch["noise"], parameterization=ob.parameterization,
                                weighting=ob.weighting, min_snr_gamma=ob.min_snr_gamma, cond=cond, loss=ob.loss,
                                learn_variance=ob.learn_variance, parts=terms, mask=batch.get("mask"), space=self.space)
        return losses * batch["weights"].to(losses.device, losses.dtype), terms

    def observe(self, batch: Batch, terms: dict[str, Tensor], gather: Callable[[Tensor], Tensor]) -> None:
        """Importance sampling of t learns from every process's VLB terms, so all samplers stay identical."""
        if "vlb" in terms:
            self.timestep_sampler.update(gather(batch["t"].to(terms["vlb"].device)), gather(terms["vlb"]))

    def state_dict(self) -> dict[str, Tensor]:
        return self.timestep_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.timestep_sampler.load_state_dict(state)

    def export(self, model: nn.Module, out_dir: Path) -> None:
        self.pipeline(model).save_pretrained(out_dir)

    def preview(self, model: nn.Module, path: Path) -> Preview:
        pipe = self.pipeline(model)
        out = pipe(seed=0, progress=False, **self.preview_kwargs)
        from difflab.modalities import get_modality

        written = get_modality(pipe.modality).preview(out.samples, path)
        return Preview(written, self.preview_metrics(out.samples) if self.preview_metrics else {})
