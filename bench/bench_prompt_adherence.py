"""Prompt adherence on the shapes benchmark (issue 5): does a generated image show what its prompt asks?

1. Train a text-conditional model on captioned shapes with some (shape, colour) pairs held out.
2. Train the shapes oracle on real rendered shapes and report its accuracy on held-out real images.
3. For held-out prompts (the excluded pairs at every position), sample with classifier-free guidance at
   several scales; score shape+colour adherence with the oracle, and diversity as the mean pairwise
   pixel distance between samples of the same prompt.
4. Classifier guidance on class labels: the same model's unconditional branch (empty prompt; it is
   trained with condition dropout) guided by a noise-aware shape classifier at several scales; score the
   shape accuracy.
Writes a Markdown table to stdout and a plot to docs/img/prompt_adherence.png.

    python bench/bench_prompt_adherence.py --steps 6000      # the figures in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import time
from pathlib import Path

import torch

from difflab.data.shapes_spec import POSITIONS, VOCABULARIES, ShapeSpec, caption
from difflab.metrics.shapes_oracle import attribute_hits, train_oracle
from difflab.nets.classifier import NoisyClassifier
from difflab.pipelines.diffusion import DiffusionPipeline
from difflab.recipes import train
from difflab.training import TrainConfig
from difflab.training.classifier import train_classifier

HELD_OUT = [("circle", "blue"), ("square", "yellow"), ("triangle", "magenta")]
MODEL = {"base_channels": 32, "channel_mults": [1, 2, 2], "num_res_blocks": 1, "attention_levels": [2], "norm_groups": 8}


def held_out_prompts() -> list[ShapeSpec]:
    return [ShapeSpec(shape, color, "large", pos, "black" if color != "blue" else "white")
            for (shape, color), pos in itertools.product(HELD_OUT, POSITIONS)]


def adherence(oracle, samples: torch.Tensor, specs: list[ShapeSpec], attributes: tuple[str, ...]) -> float:
    """Fraction of samples with every listed attribute as their spec says."""
    hits = torch.stack(list(attribute_hits(oracle, samples, specs, attributes).values())).all(0)
    return hits.float().mean().item()


def diversity(samples: torch.Tensor, per_prompt: int) -> float:
    groups = samples.flatten(1).split(per_prompt)
    return torch.stack([torch.pdist(g).mean() for g in groups]).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000, help="diffusion training steps")
    ap.add_argument("--weighting", default="min_snr", help="loss weighting: uniform or min_snr")
    ap.add_argument("--classifier-steps", type=int, default=1500)
    ap.add_argument("--oracle-steps", type=int, default=400)
    ap.add_argument("--per-prompt", type=int, default=8)
    ap.add_argument("--scales", default="1,2,3,5,8")
    ap.add_argument("--classifier-scales", default="0,1,3,10")
    ap.add_argument("--out", default="runs/bench_adherence")
    args = ap.parse_args()
    out, started = Path(args.out), time.perf_counter()
    config = TrainConfig.from_dict({
        "data": {"dataset": "shapes", "resolution": 32, "num_images": 20000, "exclude": [list(p) for p in HELD_OUT]},
        "model": MODEL, "schedule": {"kind": "cosine"}, "objective": {"parameterization": "v", "weighting": args.weighting},
        "conditioning": {"kind": "text", "dropout": 0.1},
        "optim": {"steps": args.steps, "lr": 1e-3, "ema_decay": 0.999},
        "log": {"sample_every": 0, "checkpoint_every": 1000, "sampler": "dpmpp_2m"}})
    model_dir = out / "model"
    if not (model_dir / "model_index.json").exists():  # a complete pipeline folder (the index is written last)
        train(config, model_dir)
    oracle, report = train_oracle(32, num_images=12000, steps=args.oracle_steps, batch_size=128, width=32)
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    specs = [s for s in held_out_prompts() for _ in range(args.per_prompt)]
    prompts = [caption(s) for s in specs]
    rows = []
    for w in [float(v) for v in args.scales.split(",")]:
        x = pipe(num_images=len(specs), num_inference_steps=20, sampler="dpmpp_2m", seed=0, prompt=prompts,
                 guidance_scale=w).samples
        rows.append(("CFG", w, adherence(oracle, x, specs, ("shape", "color")), diversity(x, args.per_prompt)))
    clf_dir = out / "classifier"
    if not (clf_dir / "model.safetensors").exists():
        train_classifier("shapes", pipe.schedule, clf_dir, steps=args.classifier_steps, resolution=32, num_images=20000)
    classifier = NoisyClassifier.from_pretrained(clf_dir)
    shape_specs = [ShapeSpec(shape, "red", "large", "center", "black") for shape in VOCABULARIES["shape"]
                   for _ in range(2 * args.per_prompt)]
    labels = [VOCABULARIES["shape"].index(s.shape) for s in shape_specs]
    for s in [float(v) for v in args.classifier_scales.split(",")]:
        x = pipe(num_images=len(labels), num_inference_steps=20, sampler="dpmpp_2m", seed=0, prompt="",
                 classifier=classifier, class_labels=labels, classifier_scale=s).samples
        rows.append(("classifier", s, adherence(oracle, x, shape_specs, ("shape",)), diversity(x, 2 * args.per_prompt)))
    print(f"Command: `python bench/bench_prompt_adherence.py --steps {args.steps}`; date {datetime.date.today()}; "
          f"{time.perf_counter() - started:.0f} s; oracle accuracy on real images: "
          + ", ".join(f"{k} {100 * v:.1f}%" for k, v in report.accuracy.items()))
    print("\n| guidance | scale | adherence (CFG: shape+colour on held-out prompts; classifier: shape) | diversity |")
    print("| --- | ---: | ---: | ---: |")
    for kind, scale, adh, div in rows:
        print(f"| {kind} | {scale:g} | {100 * adh:.1f}% | {div:.2f} |")
    plot(rows, Path("docs/img/prompt_adherence.png"))


def plot(rows: list[tuple[str, float, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for kind in ("CFG", "classifier"):
        pts = [r for r in rows if r[0] == kind]
        axes[0].plot([r[1] for r in pts], [100 * r[2] for r in pts], "o-", label=kind)
        axes[1].plot([r[1] for r in pts], [r[3] for r in pts], "o-", label=kind)
    axes[0].set(xlabel="guidance scale", ylabel="adherence (%)")
    axes[1].set(xlabel="guidance scale", ylabel="diversity (mean pairwise L2)")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
