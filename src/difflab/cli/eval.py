"""``difflab eval``: sample a model (or read a folder), score the images, write JSON + Markdown (+ a plot).

The metrics themselves live in :mod:`difflab.metrics` (``evaluate``) and :mod:`difflab.likelihood`;
this module only resolves the command's inputs (model, images, reference, domain classifier), samples
at each step count, and writes the reports.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
from torch import Tensor

from difflab.errors import UserError
from difflab.metrics.evaluation import (
    DOMAIN_METRICS,
    METRICS,
    NEEDS_REFERENCE,
    parse_metrics,
)

EXTRA_METRICS = ("nll", "clipscore")
ALIASES = {"pr": ("precision", "recall")}
VALUE_RANGE = (-1.0, 1.0)  # model samples and dataset images are both in [-1, 1]
NLL_RTOL = 1e-3  # PF-ODE tolerance: bits/dim to ~1e-2 at a fraction of the default cost
DOMAIN_TRAIN_IMAGES = 10000  # images a domain classifier is trained on (last fifth held out)
VLB_TIMESTEPS = 50  # timestep subset of the VLB's T-1 KL terms (unbiased, Nichol & Dhariwal 2021 sec. 2)


def split_metrics(text: str) -> tuple[list[str], list[str]]:
    """(library metric names, extra names among ``nll``/``clipscore``); ``pr`` = precision + recall."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    valid = ", ".join([*METRICS, *EXTRA_METRICS, "pr", "prdc"])
    library: list[str] = []
    extra = [n for n in EXTRA_METRICS if n in names]
    for name in names:
        if name in EXTRA_METRICS:
            continue
        try:
            library += [m for m in parse_metrics(list(ALIASES.get(name, (name,)))) if m not in library]
        except UserError:
            raise UserError(f"unknown metric {name!r} in --metrics; choose from {valid}") from None
    if not library and not extra:
        raise UserError(f"--metrics is empty; choose from {valid}")
    return library, extra


@dataclass
class Reference:
    """What the generated images are compared with: a dataset (tensor + captions/labels) or a path."""

    source: Any  # tensor (N, C, H, W) in [-1, 1], a folder path or a statistics .npz path
    description: str
    cache_name: str | None = None
    dataset: Any = None  # the difflab dataset when one was built (for nll, captions, domain training)
    captions: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    full_dataset: Any = None  # zero-argument builder of the whole dataset (to train a domain classifier)


def _dataset_tensor(ds: Any, n: int) -> Tensor:
    if hasattr(ds, "images"):
        return ds.images()[:n]
    return torch.stack([ds[i]["x"] for i in range(n)])


def resolve_reference(reference: str | None, model_config: dict[str, Any] | None, resolution: int | None,
                      num_reference: int, data_dir: str | None) -> Reference | None:
    """The ``--reference`` value, else the dataset the model was trained on; None when neither exists."""
    from difflab.data import build_dataset, dataset_names

    name = reference if reference is not None else (model_config or {}).get("dataset")
    if name is None:
        return None
    name = str(name)
    if name.endswith(".npz") and Path(name).is_file():
        return Reference(name, f"statistics file {name}")
    is_folder = name not in dataset_names()
    if is_folder and not Path(name).expanduser().exists():
        raise UserError(f"--reference {name!r} is neither a dataset ({', '.join(dataset_names())}) nor an "
                        "existing folder or .npz; pass one of those")
    ds = build_dataset(name, resolution, data_dir=data_dir, num_images=None if is_folder else num_reference)
    n = min(num_reference, len(ds))
    items = [ds[i] for i in range(n)]
    origin = "--reference" if reference is not None else "the model's training set"
    if is_folder:  # read the folder itself (each image at its own size), cached per folder by evaluate
        return Reference(name, f"folder {name} ({origin})", None, ds,
                         [it["cond"]["caption"] for it in items], [it["cond"]["label"] for it in items])
    res = ds.resolution
    return Reference(_dataset_tensor(ds, n), f"{name} {res}x{res}, first {n} images ({origin})",
                     f"{name}-{getattr(ds, 'split', 'all')}-n{n}", ds,
                     [it["cond"]["caption"] for it in items], [it["cond"]["label"] for it in items],
                     lambda: build_dataset(name, resolution, data_dir=data_dir))


def domain_classifier(domain_model: str | None, names: list[str], ref: Reference | None, out: Path) -> tuple[Any, str]:
    """(classifier or folder, how it was obtained) for domain_fid/domain_is; trains one on the reference."""
    if not DOMAIN_METRICS & set(names):
        return None, ""
    if domain_model is not None:
        return domain_model, f"domain classifier from {domain_model}"
    ds = None if ref is None else (ref.full_dataset() if ref.full_dataset is not None else ref.dataset)
    if ds is None or getattr(ds, "channels", 0) != 1 or getattr(ds, "num_classes", None) is None:
        raise UserError("domain_fid/domain_is need --domain-model DIR, or a labelled 1-channel reference "
                        "dataset (digits, mnist) to train a digit classifier on")
    import numpy as np

    from difflab.data import tensor_to_uint8
    from difflab.metrics.domain import train_digit_classifier

    n = min(len(ds), DOMAIN_TRAIN_IMAGES)
    pixels = tensor_to_uint8(_dataset_tensor(ds, n))[:, 0].numpy()
    labels = np.array([ds[i]["cond"]["label"] for i in range(n)])
    heldout = max(1, n // 5)
    model = train_digit_classifier(pixels, labels, heldout=heldout, dataset=f"{ref.description.split()[0]}[0:{n - heldout}]")
    model.save_pretrained(out / "domain_classifier")
    acc = model.config.heldout_accuracy
    return model, (f"domain classifier trained here on the reference dataset's first {n - heldout} images "
                   f"(held-out accuracy {acc:.3f} on the next {heldout}); saved to {out / 'domain_classifier'}")


def generate(pipe: Any, num: int, steps: int, sampler: str | None, seed: int, batch_size: int,
             ref: Reference | None, progress: bool) -> tuple[Tensor, int]:
    """``num`` samples at ``steps``; image i uses seed + i; conditional models get the reference's captions/labels."""
    kind = pipe.conditioner.kind
    if kind != "none" and (ref is None or len(ref.captions if kind == "text" else ref.labels) < num):
        raise UserError(f"a {kind}-conditional model is sampled with the reference's {'captions' if kind == 'text' else 'labels'}; "
                        f"pass a --reference dataset with at least {num} of them")
    cond: dict[str, Any] = {}
    if kind == "text":
        cond["prompt"] = ref.captions[:num]
    elif kind == "class":
        cond["class_labels"] = ref.labels[:num]
    out = pipe.in_batches(num, batch_size, seed=seed, num_inference_steps=steps, sampler=sampler, progress=progress, **cond)
    return out.samples, out.nfe


def load_clip_model(pipe: Any, clip_model: str | None, device: str) -> Any:
    """The CLIP model for clipscore (checked before any sampling), via ``difflab.metrics.clipscore``."""
    try:
        module = importlib.import_module("difflab.metrics.clipscore")
    except ImportError:
        module = None
    if module is None or not hasattr(module, "clip_score"):
        raise UserError("clipscore is not available yet (difflab.metrics.clipscore is missing); drop it from --metrics")
    if pipe is None or pipe.conditioner.kind != "text":
        raise UserError("clipscore needs a text-conditional --model (it is sampled with the reference dataset's captions)")
    if clip_model is None:
        raise UserError("clipscore needs --clip-model DIR: a transformers CLIP folder or a difflab ShapesCLIP "
                        "(train_shapes_clip(...).save_pretrained(DIR))")
    return module.load_clip(clip_model, device)


def clip_metric(images: Tensor, prompts: list[str], model: Any, name: str) -> dict[str, Any]:
    """CLIPScore (Hessel et al. 2021) of image i with prompt i: ``difflab.metrics.clipscore.clip_score``."""
    from difflab.metrics.clipscore import clip_score

    result = clip_score(images, prompts, model)
    return {"value": result["mean"], "std": result["std"], "num_images": result["num_images"],
            "clip_model": name, "label": result["label"], "per_image": result["per_image"]}


def nll_metrics(pipe: Any, ref: Reference | None, num: int, batch_size: int, seed: int, progress: bool) -> dict[str, Any]:
    """Bits/dim of ``num`` reference images: PF-ODE (Hutchinson divergence, rtol 1e-3) and the DDPM VLB."""
    from tqdm.auto import tqdm

    from difflab.likelihood import ode_log_likelihood, vlb_bits_per_dim

    if ref is None or ref.dataset is None:
        raise UserError("nll needs reference images at the model's resolution: pass --reference DATASET_OR_FOLDER")
    ds, res, ch = ref.dataset, pipe.resolution, pipe.unet.config.in_channels
    if (ds.resolution, ds.channels) != (res, ch):
        raise UserError(f"nll: the reference is {ds.channels}x{ds.resolution}x{ds.resolution} but the model takes "
                        f"{ch}x{res}x{res}; pass a --reference at the model's resolution")
    x = _dataset_tensor(ds, min(num, len(ds)))
    ode, vlb = [], []
    vlb_t = min(VLB_TIMESTEPS, pipe.schedule.T - 1)
    for first in tqdm(range(0, len(x), batch_size), desc="nll", disable=not progress):
        xb = x[first:first + batch_size]
        gen = [torch.Generator().manual_seed(seed + first + i) for i in range(len(xb))]
        den = pipe.denoiser(len(xb))
        ode.append(ode_log_likelihood(den, xb, divergence="hutchinson", rtol=NLL_RTOL, atol=NLL_RTOL,
                                      dequantize_data=True, generator=gen).bits_per_dim.detach())
        with torch.no_grad():
            vlb.append(vlb_bits_per_dim(den, xb, num_timesteps=vlb_t, subset_seed=seed, generator=gen).bits_per_dim)
    out = {}
    for name, values, label in (
        ("nll", torch.cat(ode).double(), f"bits/dim, PF-ODE (Song et al. 2021), Hutchinson divergence, rtol {NLL_RTOL:g}, uniform dequantization"),
        ("nll_vlb", torch.cat(vlb).double(), f"bits/dim, DDPM variational bound (Ho et al. 2020), {vlb_t} of {pipe.schedule.T - 1} KL terms"),
    ):
        out[name] = {"value": float(values.mean()), "std": float(values.std()) if len(values) > 1 else 0.0,
                     "num_images": len(values), "label": label}
    return out


def plot_vs_nfe(runs: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """PNG of ``metric`` against NFE, one point per step count."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("the metric-vs-NFE plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((r["nfe"], r["metrics"][metric]["value"]) for r in runs if metric in r["metrics"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
    ax.set_xlabel("network evaluations per image (NFE)")
    ax.set_ylabel(metric)
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _header(run: dict[str, Any]) -> str:
    lines = ["# difflab eval", ""] + [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}"
                                       for k, v in run.items() if v is not None]
    return "\n".join(lines) + "\n\n"


def write_outputs(out: Path, run: dict[str, Any], results: list[dict[str, Any]]) -> list[Path]:
    """One ``write_report`` per step count (``metrics`` alone, ``metrics_steps<N>`` for several) + summary + plot."""
    from difflab.metrics.report import write_report

    written: list[Path] = []
    for res in results:
        stem = "metrics" if len(results) == 1 else f"metrics_steps{res['steps']}"
        header = {**run, "steps": res.get("steps"), "nfe": res.get("nfe")}
        json_path, md_path = write_report({"run": header, **res}, out, stem)
        md_path.write_text(_header(header) + md_path.read_text().split("\n", 1)[1])
        written += [json_path, md_path]
    if len(results) > 1:
        import json

        summary = {"run": run, "results": [{"steps": r["steps"], "nfe": r["nfe"],
                                            "metrics": {k: v["value"] for k, v in r["metrics"].items()}}
                                           for r in results]}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        names = list(results[0]["metrics"])
        rows = ["| steps | NFE | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 2)]
        rows += [f"| {r['steps']} | {r['nfe']} | " + " | ".join(f"{r['metrics'][n]['value']:.4f}" for n in names) + " |"
                 for r in results]
        (out / "summary.md").write_text(_header(run) + "\n".join(rows) + "\n")
        metric = "fid" if "fid" in names else names[0]
        written += [out / "summary.json", out / "summary.md", plot_vs_nfe(results, metric, out / f"{metric}_vs_nfe.png")]
    return written


def _parse_steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--steps must be integers separated by commas (e.g. 5,10,20), got {text!r}") from None
    if not steps or min(steps) < 1:
        raise UserError(f"--steps must be positive integers, got {text!r}")
    return list(dict.fromkeys(steps))


def _first_image_size(folder: str) -> int:
    from PIL import Image

    from difflab.metrics.preprocess import list_image_files

    files = list_image_files(folder)
    if not files:
        raise UserError(f"--images {folder!r} holds no images; pass a folder of PNG/JPEG files")
    with Image.open(files[0]) as im:
        return im.size[1]


@dataclass
class EvalOptions:
    """Everything ``difflab eval`` was asked, after parsing."""

    model: str | None
    images: str | None
    metrics: str
    num_samples: int
    sampler: str | None
    steps: str
    reference: str | None
    num_reference: int | None
    data_dir: str | None
    domain_model: str | None
    clip_model: str | None
    out: str
    seed: int
    batch_size: int
    cache_dir: str | None
    inception_weights: str | None
    device: str
    progress: bool = True


def _command_line(flags: dict[str, Any]) -> str:
    """The command as it could be re-run: ``difflab eval`` plus every flag that has a value."""
    words = ["difflab", "eval"]
    for key, value in flags.items():
        if value is not None:
            words += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(words)


def run_eval(opts: EvalOptions, command: str = "") -> list[Path]:
    """Resolve the inputs, sample at each step count, score, and write the reports into ``opts.out``."""
    from difflab.metrics.evaluation import evaluate

    if (opts.model is None) == (opts.images is None):
        raise UserError("pass exactly one of --model DIR (sample a model) or --images FOLDER (score a folder)")
    if opts.num_samples < 1 or opts.batch_size < 1:
        raise UserError(f"--num-samples and --batch-size must be >= 1, got {opts.num_samples} and {opts.batch_size}")
    library, extra = split_metrics(opts.metrics)
    if opts.images is not None and ("nll" in extra or "clipscore" in extra):
        raise UserError(f"{' and '.join(m for m in extra)} need a model: pass --model DIR instead of --images")
    steps = _parse_steps(opts.steps)
    pipe = None
    if opts.model is not None:
        from difflab.pipelines.diffusion import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(opts.model, device=opts.device)
    resolution = pipe.resolution if pipe is not None else _first_image_size(opts.images)
    model_config = {"dataset": pipe.extra_config.get("dataset")} if pipe is not None else None
    ref = resolve_reference(opts.reference, model_config, resolution, opts.num_reference or opts.num_samples,
                            opts.data_dir)
    needs = sorted((NEEDS_REFERENCE & set(library)) | ({"nll"} & set(extra)))
    if needs and ref is None:
        raise UserError(f"{', '.join(needs)} need a reference: pass --reference DATASET_OR_FOLDER (the model folder "
                        "names no training dataset)" if pipe is not None else
                        f"{', '.join(needs)} need a reference: pass --reference DATASET_OR_FOLDER")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    domain, domain_note = domain_classifier(opts.domain_model, library, ref, out)
    clip = load_clip_model(pipe, opts.clip_model, opts.device) if "clipscore" in extra else None
    run = {"command": command or None, "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "model": opts.model, "images": opts.images,
           "sampler": (opts.sampler or pipe.sampler) if pipe is not None else None,
           "num_samples": opts.num_samples, "seed": opts.seed if pipe is not None else None,
           "reference": ref.description if ref is not None else None, "domain_classifier": domain_note or None}
    shared = nll_metrics(pipe, ref, opts.num_samples, opts.batch_size, opts.seed, opts.progress) if "nll" in extra else {}
    results = []
    for n_steps in (steps if pipe is not None and (library or "clipscore" in extra) else [None]):
        if n_steps is None:
            images, nfe = opts.images, None
        else:
            images, nfe = generate(pipe, opts.num_samples, n_steps, opts.sampler, opts.seed, opts.batch_size, ref,
                                   opts.progress)
        metrics: dict[str, Any] = {}
        result: dict[str, Any] = {}
        if library:
            result = evaluate(images, library, ref.source if ref is not None else None, batch_size=opts.batch_size,
                              value_range=VALUE_RANGE, weights=opts.inception_weights, domain_model=domain,
                              cache_dir=opts.cache_dir, reference_name=ref.cache_name if ref is not None else None,
                              device=opts.device, progress=opts.progress)
            metrics = result.pop("metrics")
        if clip is not None:
            metrics["clipscore"] = clip_metric(images, ref.captions[:opts.num_samples], clip, str(opts.clip_model))
        results.append({"steps": n_steps, "nfe": nfe, "metrics": {**metrics, **shared}, **result})
    return write_outputs(out, run, results)


@click.command("eval")
@click.option("--model", "model", default=None, type=click.Path(), help="A model folder written by `difflab train --out` (sampled here).")
@click.option("--images", "images", default=None, type=click.Path(), help="Score this folder of images instead of sampling a model.")
@click.option("--metrics", default="fid", show_default=True, help=f"Comma list of {', '.join([*METRICS, *EXTRA_METRICS])}; pr = precision,recall; prdc = all four.")
@click.option("--num-samples", type=int, default=1000, show_default=True, help="Images to generate (and reference images for nll).")
@click.option("--sampler", default=None, help="Sampler name (see `difflab samplers`).  [default: the model's]")
@click.option("--steps", default="50", show_default=True, help="Sampling steps; a comma list (5,10,20) evaluates each and plots the metric against NFE.")
@click.option("--reference", default=None, help="shapes | digits | mnist | cifar10 | a folder | a statistics .npz.  [default: the model's training dataset]")
@click.option("--num-reference", type=int, default=None, help="Reference images taken from a dataset.  [default: --num-samples]")
@click.option("--data-dir", default=None, help="Folder with the MNIST / CIFAR-10 files.  [default: $DIFFLAB_DATA_DIR]")
@click.option("--domain-model", default=None, type=click.Path(), help="Digit classifier folder for domain_fid/domain_is.  [default: train one on the reference]")
@click.option("--clip-model", default=None, type=click.Path(), help="CLIP folder for clipscore (transformers CLIP or difflab ShapesCLIP).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output folder for metrics.json/.md (and the plot).")
@click.option("--seed", type=int, default=0, show_default=True, help="Image i uses seed SEED + i, whatever the batch.")
@click.option("--batch-size", type=int, default=50, show_default=True, help="Images per forward pass.")
@click.option("--cache-dir", default=None, type=click.Path(), help="Reference statistics cache.  [default: $DIFFLAB_CACHE/metrics]")
@click.option("--inception-weights", default=None, type=click.Path(), help="Inception weight file (see docs/metrics.md).  [default: searched]")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
def eval_command(no_progress: bool, **flags: Any) -> None:
    """Score a model (sampled at one or more step counts) or a folder of images: FID, IS, PR, NLL, ..."""
    written = run_eval(EvalOptions(**flags, progress=not no_progress), _command_line(flags))
    click.echo("wrote " + ", ".join(str(p) for p in written))
