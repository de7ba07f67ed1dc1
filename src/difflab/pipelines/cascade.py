"""CascadePipeline: an Imagen-like cascade (Ho et al. 2021, "Cascaded Diffusion Models"; Saharia et al. 2022,
Imagen): a base model at low resolution, then one or more super-resolution stages, each a pipeline folder
listed in the cascade's ``model_index.json``::

    model_index.json  {"_class_name": "CascadePipeline", "_difflab_format": 2, "cascade": {"stages": ["base", "sr1"]},
                       "base": ["difflab", "DiffusionPipeline"], "sr1": ["difflab", "DiffusionPipeline"]}
    base/, sr1/       pipeline folders (a `difflab train` run folder is one)

Each stage has its own sampler, steps, guidance and, for the super-resolution stages, the noise-conditioning
augmentation level at sampling (``aug_level``; Ho et al. 2021, sec. 4.3, found a non-zero level essential).
The base stage's class labels or prompt are passed on to every later stage that is conditioned likewise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from difflab.errors import UserError
from difflab.io.pipeline_folder import read_pipeline_folder, write_index
from difflab.pipelines.diffusion import DiffusionPipeline, PipelineOutput
from difflab.pipelines.upscale import UpscalePipeline

CLASS_NAME = "CascadePipeline"
STAGE_OPTIONS = ("num_inference_steps", "sampler", "guidance_scale", "aug_level", "eta")


class CascadePipeline:
    """``stages``: a :class:`DiffusionPipeline` (the base) followed by :class:`UpscalePipeline` stages, each
    taking the previous stage's output size. ``names``: the stage folders' names (default base, sr1, sr2, ...)."""

    def __init__(self, stages: list[DiffusionPipeline], names: list[str] | None = None) -> None:
        if len(stages) < 2:
            raise UserError(f"a cascade needs a base model and at least one super-resolution stage, got {len(stages)} stage(s)")
        self.names = list(names) if names is not None else ["base", *(f"sr{i}" for i in range(1, len(stages)))]
        if len(self.names) != len(stages) or len(set(self.names)) != len(self.names):
            raise UserError(f"give one distinct name per stage, got {self.names} for {len(stages)} stages")
        self.stages = [stages[0], *(_as_upscaler(stage, name) for stage, name in zip(stages[1:], self.names[1:]))]
        size = tuple(self.stages[0].sample_shape[1:])
        for name, stage in zip(self.names[1:], self.stages[1:]):
            trained_in = tuple(n // stage.scale for n in stage.sample_shape[1:])
            if size != trained_in:
                raise UserError(f"stage {name} upscales {trained_in[-1]}x{trained_in[0]} inputs but the stage before it makes "
                                f"{size[-1]}x{size[0]} images; chain stages whose sizes meet")
            size = tuple(stage.sample_shape[1:])

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "CascadePipeline":
        class_name, settings, specs = read_pipeline_folder(path)
        if class_name != CLASS_NAME:
            raise UserError(f"{path} holds a {class_name}, not a {CLASS_NAME}; load it with {class_name}.from_pretrained")
        names = (settings.get("cascade") or {}).get("stages") or []
        missing = [n for n in names if n not in specs]
        if missing:
            raise UserError(f"{path}/model_index.json lists stage {missing[0]!r} but names no folder for it")
        stages = [(DiffusionPipeline if k == 0 else UpscalePipeline).from_pretrained(specs[n].path, device)
                  for k, n in enumerate(names)]
        return cls(stages, names)

    def save_pretrained(self, path: str | Path) -> None:
        """Write every stage into ``path/<name>`` and then the cascade's index."""
        path = Path(path)
        for name, stage in zip(self.names, self.stages):
            stage.save_pretrained(path / name)
        write_cascade_index(path, self.names)

    @torch.no_grad()
    def __call__(
        self,
        num_images: int = 1,
        seed: int | None = None,
        progress: bool = True,
        *,
        class_labels: Any = None,
        prompt: Any = None,
        negative_prompt: Any = None,
        stage_options: list[dict[str, Any]] | None = None,
    ) -> PipelineOutput:
        """Sample ``num_images`` at the last stage's resolution. ``stage_options``: one dict per stage with any of
        :data:`STAGE_OPTIONS` (default 50 steps, the stage's sampler, guidance 1, aug_level 0). Image i of stage k
        uses seed ``seed + i`` (each stage draws its own noise from fresh generators of those seeds). Every
        stage's output: :meth:`run_stages`."""
        return self.run_stages(num_images, seed, progress, class_labels=class_labels, prompt=prompt,
                               negative_prompt=negative_prompt, stage_options=stage_options)[-1]

    @torch.no_grad()
    def run_stages(self, num_images: int = 1, seed: int | None = None, progress: bool = True, *, class_labels: Any = None,
                   prompt: Any = None, negative_prompt: Any = None,
                   stage_options: list[dict[str, Any]] | None = None) -> list[PipelineOutput]:
        """Every stage's output, base first (the arguments of :meth:`__call__`)."""
        options = stage_options or [{} for _ in self.stages]
        if len(options) != len(self.stages):
            raise UserError(f"stage_options has {len(options)} entries for {len(self.stages)} stages; give one dict per stage")
        for name, opts in zip(self.names, options):
            unknown = sorted(set(opts) - set(STAGE_OPTIONS))
            if unknown:
                raise UserError(f"unknown option(s) {unknown} for stage {name}; valid: {', '.join(STAGE_OPTIONS)}")
        if options[0].get("aug_level"):
            raise UserError("aug_level applies to the super-resolution stages, not to the base")
        seed = 0 if seed is None else seed
        outputs: list[PipelineOutput] = []
        for k, (stage, opts) in enumerate(zip(self.stages, options)):
            opts = dict(opts)
            steps = opts.pop("num_inference_steps", 50)
            conditions = _conditions(stage, class_labels, prompt, negative_prompt)
            if k == 0:
                out = stage(num_images=num_images, num_inference_steps=steps, seed=seed, progress=progress, **conditions, **opts)
            else:
                out = stage(outputs[-1].samples.to(stage.device), steps, seed=seed, progress=progress, **conditions, **opts)
            outputs.append(out)
        return outputs


def _as_upscaler(stage: DiffusionPipeline, name: str) -> UpscalePipeline:
    if not isinstance(stage, UpscalePipeline):
        raise UserError(f"stage {name} must be an UpscalePipeline; load it with UpscalePipeline.from_pretrained")
    stage.scale  # a one-line error unless it was trained for super-resolution
    return stage


def _conditions(stage: DiffusionPipeline, class_labels: Any, prompt: Any, negative_prompt: Any) -> dict[str, Any]:
    """The base's condition for a stage conditioned the same way; nothing for an unconditional stage."""
    kind = stage.conditioner.kind
    if kind == "class":
        return {"class_labels": class_labels}
    if kind == "text":
        return {"prompt": prompt, "negative_prompt": negative_prompt}
    return {}


def write_cascade_index(path: Path, names: list[str]) -> None:
    """The cascade's ``model_index.json`` naming its stage folders (written after them)."""
    # the order sits in a mapping: a two-name list would read as a component entry [library, class]
    write_index(path, CLASS_NAME, {name: ["difflab", "DiffusionPipeline"] for name in names}, {"cascade": {"stages": list(names)}})
