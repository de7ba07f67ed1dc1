"""Training configuration: typed sections, every key validated, loadable from YAML and overridable by flags."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from difflab.data.masks import MASK_KINDS, check_mask_kinds
from difflab.errors import UserError
from difflab.losses import LOSSES, WEIGHTINGS, check_objective
from difflab.process import PARAMETERIZATIONS
from difflab.training.posthoc_ema import SIGMA_REL_MAX
from difflab.training.timesteps import TIMESTEP_SAMPLINGS


TASKS: tuple[str, ...] = ("generation", "super-resolution", "inpaint")
SR_NOISE_AUG = 0.2  # default max augmentation level of super-resolution's low-res input (not tuned yet)


@dataclass
class DataConfig:
    dataset: str = "shapes"  # shapes | digits | mnist | cifar10 | a folder path | any registered dataset
    resolution: Any = None  # a side, or [height, width] for non-square images; None: the dataset's native size
    num_images: int | None = None  # None: the dataset's default size
    data_dir: str | None = None  # for mnist / cifar10
    autoencoder: str | None = None  # a `difflab train-autoencoder` folder: train on its latents (latent diffusion)
    exclude: list | None = None  # shapes only: (shape, colour) pairs held out of training, e.g. [[circle, blue]]
    low_res_factor: int | None = None  # pair each sample with itself downsampled by this factor (cond "low_res")
    options: dict = field(default_factory=dict)  # more keyword arguments of the dataset's builder


@dataclass
class ConditioningConfig:
    kind: str = "none"  # none | class | text
    dropout: float = 0.1  # probability of training a sample with the null condition (for classifier-free guidance)
    text_encoder: str = "minilm"  # minilm | clip:/dir | t5:/dir | bert:/dir | a local model directory
    concat: str | None = None  # a condition of the items (e.g. low_res) joined to the network input
    concat_noise_aug: float | None = None  # max noise-conditioning augmentation level of the concat condition, a fraction of T in [0, 1] (CDM); None: 0.2 for super-resolution, else 0
    concat_resize: str | None = None  # how the network upsamples the concat condition: bilinear | nearest | bicubic; None: bicubic for super-resolution (SR3), else bilinear
    concat_masks: list | None = None  # inpainting: kinds of the random training masks (box, stroke, half, border); None: all four for task inpaint


@dataclass
class ObjectiveConfig:
    """What the network learns. The defaults are issue 12's recipe (v, min-SNR; docs/benchmarks.md, section 2)."""

    parameterization: str = "v"  # eps | x0 | v | edm (Karras et al. 2022 preconditioning)
    weighting: str = "auto"  # auto (min_snr, or uniform for loss vlb) | uniform | min_snr (Hang et al. 2023) | min_snr_v (see difflab.losses)
    min_snr_gamma: float = 5.0
    learn_variance: bool = False  # network outputs 2C channels: prediction and variance (Nichol & Dhariwal 2021)
    loss: str = "simple"  # simple | hybrid | vlb (hybrid needs learn_variance)
    timestep_sampling: str = "uniform"  # uniform | importance (importance: loss vlb or hybrid only) | lognormal (EDM)

    def __post_init__(self) -> None:
        if self.weighting == "auto":  # the VLB carries its own weights; every regression loss gets min-SNR
            self.weighting = "uniform" if self.loss == "vlb" else "min_snr"


@dataclass
class OptimConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    warmup_steps: int = 100
    grad_clip: float = 1.0
    grad_accum_steps: int = 1  # micro-batches per step: same result, 1/N of the activation memory
    ema_decay: float = 0.999
    mixed_precision: str = "auto"  # auto (bf16 on a GPU that supports it, else no) | no | fp16 | bf16 (Accelerate)
    channels_last: bool = False  # 2-D convolutional networks train in channels-last memory format (no faster on CPU: docs/benchmarks.md, section 2)
    time_limit_s: float | None = None  # seconds of training after which the run stops and saves (None: run all steps)


@dataclass
class LogConfig:
    sample_every: int = 500  # steps between sample grids (0: never)
    checkpoint_every: int = 500  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept in OUT/checkpoints (older ones are deleted)
    num_samples: int = 16
    sample_steps: int = 20
    sampler: str = "dpmpp_2m"
    adherence: bool = True  # shapes + text: the shapes oracle's prompt adherence of each preview, into log.jsonl


@dataclass
class PostHocEMAConfig:
    """Power-function EMA snapshots for post-hoc EMA (Karras et al. 2024, EDM2 sec. 3); see docs/posthoc_ema.md."""

    sigma_rels: list = field(default_factory=lambda: [0.05, 0.1])  # EMA lengths of the trackers (EDM2 uses 0.05, 0.10)
    snapshot_every: int = 0  # steps between snapshots into OUT/ema_snapshots (0: off)


@dataclass
class TrainConfig:
    seed: int = 0
    task: str = "generation"  # generation | super-resolution (SR3: conditioned on data.low_res_factor-downsampled copies) | inpaint (Palette: on masked copies)
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)  # the network's config fields (+ _class_name, default UNet); data-given fields are filled in
    schedule: dict[str, Any] = field(default_factory=lambda: {"kind": "cosine", "num_timesteps": 1000})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    posthoc_ema: PostHocEMAConfig = field(default_factory=PostHocEMAConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        config = _build(cls, raw, "")
        config.resolve_task()
        config.validate()
        return config

    def resolve_task(self) -> None:
        """Fill the keys a task fixes. super-resolution (SR3, Saharia et al. 2021): the items gain their
        ``data.low_res_factor``-downsampled copy ``low_res``, which the network sees upsampled bicubically and
        concatenated to x_t, noise-augmented in training up to ``SR_NOISE_AUG`` unless set (CDM, Ho et al. 2021).
        inpaint (Palette, Saharia et al. 2022): the items carry their own picture as ``image``, and every training
        step conditions on it masked by fresh random masks of ``conditioning.concat_masks`` (default: all kinds)."""
        c = self.conditioning
        _check(self.task in TASKS, "task", self.task, f"use one of {', '.join(TASKS)}")
        if self.task == "super-resolution":
            _check(self.data.low_res_factor is not None, "data.low_res_factor", None,
                   "super-resolution needs its scale: --scale 2 or 4 (data.low_res_factor)")
            _check(c.concat in (None, "low_res"), "conditioning.concat", c.concat,
                   "super-resolution conditions on low_res; remove the key")
            c.concat = "low_res"
            c.concat_resize = c.concat_resize or "bicubic"
            c.concat_noise_aug = SR_NOISE_AUG if c.concat_noise_aug is None else c.concat_noise_aug
        if self.task == "inpaint":
            _check(c.concat in (None, "image"), "conditioning.concat", c.concat,
                   "inpainting conditions on the masked picture; remove the key")
            _check(self.data.low_res_factor is None, "data.low_res_factor", self.data.low_res_factor,
                   "inpainting models fill masked pictures at full resolution; remove the key (or use --task super-resolution)")
            c.concat, c.concat_masks = "image", list(c.concat_masks or MASK_KINDS)
        else:
            _check(c.concat_masks is None, "conditioning.concat_masks", c.concat_masks, "random masks train inpainting models: add --task inpaint")
        c.concat_resize = c.concat_resize or "bilinear"
        c.concat_noise_aug = 0.0 if c.concat_noise_aug is None else c.concat_noise_aug

    def validate(self) -> None:
        o, log = self.optim, self.log
        _check(o.steps >= 1, "optim.steps", o.steps, "must be >= 1")
        _check(o.batch_size >= 1, "optim.batch_size", o.batch_size, "must be >= 1")
        _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
        _check(o.grad_accum_steps >= 1, "optim.grad_accum_steps", o.grad_accum_steps, "must be >= 1")
        _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
        _check(len(o.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas), "optim.betas",
               o.betas, "give two numbers in [0, 1), e.g. [0.9, 0.999]")
        _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
        _check(0 <= o.ema_decay < 1, "optim.ema_decay", o.ema_decay, "must lie in [0, 1)")
        _check(o.mixed_precision in ("auto", "no", "fp16", "bf16"), "optim.mixed_precision", o.mixed_precision,
               "use auto, no, fp16 or bf16")
        _check(o.time_limit_s is None or (isinstance(o.time_limit_s, (int, float)) and not isinstance(o.time_limit_s, bool)
                                          and o.time_limit_s > 0), "optim.time_limit_s", o.time_limit_s,
               "give seconds > 0 (e.g. 3600), or null for no limit")
        _check(self.objective.parameterization in PARAMETERIZATIONS, "objective.parameterization",
               self.objective.parameterization, f"use one of {', '.join(PARAMETERIZATIONS)}")
        _check(self.objective.weighting in WEIGHTINGS, "objective.weighting", self.objective.weighting,
               f"use one of {', '.join(WEIGHTINGS)}")
        _check(self.objective.min_snr_gamma > 0, "objective.min_snr_gamma", self.objective.min_snr_gamma, "must be > 0; 5 is usual")
        self._validate_loss()
        c = self.conditioning
        _check(c.kind in ("none", "class", "text"), "conditioning.kind", c.kind, "use none, class or text")
        _check(0 <= c.dropout <= 1, "conditioning.dropout", c.dropout, "must lie in [0, 1]; 0.1 is usual")
        for name in ("sample_every", "checkpoint_every"):
            _check(getattr(log, name) >= 0, f"log.{name}", getattr(log, name), "must be >= 0")
        _check(log.keep_checkpoints >= 1, "log.keep_checkpoints", log.keep_checkpoints, "must be >= 1")
        _check(log.num_samples >= 1, "log.num_samples", log.num_samples, "must be >= 1")
        _check(log.sample_steps >= 1, "log.sample_steps", log.sample_steps, "must be >= 1")
        p = self.posthoc_ema
        _check(p.snapshot_every >= 0, "posthoc_ema.snapshot_every", p.snapshot_every, "must be >= 0 (0: off)")
        _check(len(p.sigma_rels) > 0 and len(set(p.sigma_rels)) == len(p.sigma_rels) and all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < SIGMA_REL_MAX for s in p.sigma_rels),
            "posthoc_ema.sigma_rels", p.sigma_rels, f"give distinct EMA lengths in (0, {SIGMA_REL_MAX:.5f}), e.g. [0.05, 0.1]")
        if self.data.exclude:
            _check(self.data.dataset == "shapes", "data.exclude", self.data.exclude, "held-out combinations exist only for the shapes dataset")
            _check(all(isinstance(p, (list, tuple)) and len(p) == 2 for p in self.data.exclude), "data.exclude",
                   self.data.exclude, "give (shape, colour) pairs, e.g. [[circle, blue]]")
        if self.data.resolution is not None:
            sides = self.data.resolution if isinstance(self.data.resolution, (list, tuple)) else [self.data.resolution]
            _check(len(sides) in (1, 2) and all(isinstance(r, int) and not isinstance(r, bool) and r >= 4 for r in sides),
                   "data.resolution", self.data.resolution, "give a side >= 4 or [height, width], e.g. 32 or [32, 48]")
        if self.data.low_res_factor is not None:
            _check(self.data.low_res_factor >= 2, "data.low_res_factor", self.data.low_res_factor, "must be >= 2 (e.g. 4)")
        aug = self.conditioning.concat_noise_aug
        _check(aug is None or (isinstance(aug, (int, float)) and not isinstance(aug, bool) and 0 <= aug <= 1),
               "conditioning.concat_noise_aug", aug, "give a level in [0, 1] (0: no augmentation; 0.2 is usual)")
        if self.conditioning.concat_masks is not None:
            check_mask_kinds(self.conditioning.concat_masks)
        _check(self.conditioning.concat_resize in (None, "bilinear", "nearest", "bicubic"), "conditioning.concat_resize",
               self.conditioning.concat_resize, "use bilinear, nearest or bicubic")


    def _validate_loss(self) -> None:
        ob = self.objective
        _check(ob.loss in LOSSES, "objective.loss", ob.loss, f"use one of {', '.join(LOSSES)}")
        _check(ob.timestep_sampling in TIMESTEP_SAMPLINGS, "objective.timestep_sampling", ob.timestep_sampling,
               f"use one of {', '.join(TIMESTEP_SAMPLINGS)}")
        _check(ob.timestep_sampling != "importance" or ob.loss in ("vlb", "hybrid"), "objective.timestep_sampling",
               ob.timestep_sampling, "importance sampling weighs the VLB terms: use it with loss vlb or hybrid")
        _check(ob.timestep_sampling != "lognormal" or ob.loss == "simple", "objective.timestep_sampling",
               ob.timestep_sampling, "log-normal noise levels are fractional times; the VLB needs integer steps: use loss simple")
        check_objective(ob.loss, ob.learn_variance, ob.weighting)


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise UserError(f"config value {key}={value!r} is out of range: {rule}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Build a dataclass from a dict, rejecting unknown keys and casting scalars to the field type."""
    if not isinstance(raw, dict):
        raise UserError(f"config section {prefix or 'top level'} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f" in section {prefix.rstrip('.')}" if prefix else ""
        raise UserError(f"unknown config key {prefix}{unknown[0]}{where}; valid keys: {', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), value, f"{prefix}{name}.")
        else:
            values[name] = _cast(value, default, f"{prefix}{name}")
    return cls(**values)


def _cast(value: Any, default: Any, key: str) -> Any:
    if value is None or default is None or isinstance(default, (dict, str)):
        if isinstance(default, dict) and not isinstance(value, dict):
            raise UserError(f"config key {key} must be a mapping, got {value!r}")
        return value
    if isinstance(default, list) and not isinstance(value, (list, tuple)):
        raise UserError(f"config key {key} must be a list, got {value!r}")
    try:
        if isinstance(default, bool):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        return type(default)(value)
    except (TypeError, ValueError):
        raise UserError(f"config key {key} must be a {type(default).__name__}, got {value!r}") from None


def load_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None
) -> TrainConfig:
    """Read a YAML config (else start from ``base`` or the defaults) and apply dotted overrides like ``{"optim.steps": 10}``."""
    raw: dict[str, Any] = copy.deepcopy(base) if base else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist; pass an existing YAML file to --config")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            kind = "a list" if isinstance(raw, list) else f"a {type(raw).__name__} ({raw!r:.40})"
            raise UserError(f"config file {path} must be a mapping of sections (seed, data, model, ...), got {kind}")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return TrainConfig.from_dict(raw)
