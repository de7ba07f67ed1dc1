"""Inpainting on MNIST (issue 13): replacement vs RePaint (any trained model, no retraining) vs a model trained for
inpainting (`--task inpaint`), judged by how often a digit classifier reads the true label in the completed
digits, and seconds per image.

Phases (the two trainings can run at the same time, one per core):
    taskset -c 0 python bench/bench_inpainting.py train-uncond --time-limit 300 &
    taskset -c 1 python bench/bench_inpainting.py train-inpaint --time-limit 300 &
    wait; python bench/bench_inpainting.py eval --threads 2
    python bench/bench_inpainting.py eval --threads 2 --methods replacement --replacement-steps 230   # equal evaluations
Both models: the same small UNet, the first 8,000 MNIST images, the default recipe otherwise. The classifier
(difflab.metrics.domain) trains on the same 8,000. Evaluation: images 9,000 + [0, --eval) with three masks:
the bottom half, the central 14x14 box and random strokes (difflab.data.masks, seed 0); RePaint at --repaint-steps
with jump --jump and --resample resamplings (the paper's 250/10/10 costs 2,410 evaluations per image).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"base_channels": 32, "channel_mults": [1, 2, 2], "num_res_blocks": 1, "attention_levels": [2],
         "head_channels": 32, "norm_groups": 8}


def masks(n: int) -> dict[str, torch.Tensor]:
    """Fill masks (n, 1, 28, 28), True = fill."""
    from difflab.data.masks import random_fill_masks

    half = torch.zeros(n, 1, 28, 28, dtype=torch.bool)
    half[..., 14:, :] = True
    box = torch.zeros(n, 1, 28, 28, dtype=torch.bool)
    box[..., 7:21, 7:21] = True
    return {"half": half, "box": box, "stroke": random_fill_masks(n, 28, 28, torch.Generator().manual_seed(0), ("stroke",))}


def train_phase(task: str, args: argparse.Namespace) -> None:
    from difflab.recipes import train
    from difflab.training import load_config

    torch.set_num_threads(args.threads)
    config = load_config(None, {"task": task, "data.dataset": "mnist", "data.data_dir": str(args.data_dir),
                                "data.num_images": 8000, "model": MODEL, "optim.steps": 100_000,
                                "optim.time_limit_s": args.time_limit, "optim.ema_decay": 0.995,
                                "log.sample_every": 0, "log.checkpoint_every": 0})
    result = train(config, args.out / task, progress=False)
    print(f"{task}: {result.step} steps", flush=True)


def eval_phase(args: argparse.Namespace) -> None:
    from difflab.data import build_dataset
    from difflab.metrics.domain import load_mnist, train_digit_classifier
    from difflab.pipelines.edit import InpaintPipeline

    torch.set_num_threads(args.threads)
    images, labels = load_mnist(args.data_dir)
    classifier = train_digit_classifier(images[:8000], labels[:8000], heldout=500).eval()
    data = build_dataset("mnist", data_dir=str(args.data_dir))
    index = range(9000, 9000 + args.eval)
    truth = torch.stack([data[i]["x"] for i in index])
    y = torch.as_tensor(labels[9000:9000 + args.eval])

    def agreement(x: torch.Tensor) -> float:
        with torch.no_grad():
            return float((classifier((x.clamp(-1, 1) + 1) / 2)[1].argmax(1) == y).float().mean())

    plain, trained = InpaintPipeline.from_pretrained(args.out / "generation"), InpaintPipeline.from_pretrained(args.out / "inpaint")
    methods = {"replacement": (plain, {"method": "replacement", "num_inference_steps": args.replacement_steps}),
               "repaint": (plain, {"method": "repaint", "num_inference_steps": args.repaint_steps, "jump": args.jump,
                                   "resample": args.resample}),
               "trained": (trained, {"method": "trained", "num_inference_steps": args.trained_steps})}
    row = {"date": datetime.date.today().isoformat(), "train_s": args.time_limit, "eval_images": args.eval,
           "replacement_steps": args.replacement_steps,
           "classifier_heldout_accuracy": classifier.config.heldout_accuracy, "originals": agreement(truth), "masks": {}}
    methods = {k: v for k, v in methods.items() if k in args.methods}
    for name, fill in masks(args.eval).items():
        entry = {"masked_input": agreement(torch.where(fill, torch.zeros_like(truth), truth))}
        for method, (pipe, options) in methods.items():
            started = time.perf_counter()
            out = pipe(truth, fill.float(), seed=0, progress=False, **options)
            entry[method] = {"agreement": agreement(out.samples), "nfe": out.nfe,
                             "s_per_image": round((time.perf_counter() - started) / args.eval, 4)}
            print(name, method, entry[method], flush=True)
        row["masks"][name] = entry
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=("train-uncond", "train-inpaint", "eval"))
    p.add_argument("--time-limit", type=float, default=300.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval", type=int, default=100)
    p.add_argument("--replacement-steps", type=int, default=50)
    p.add_argument("--repaint-steps", type=int, default=50)
    p.add_argument("--jump", type=int, default=5)
    p.add_argument("--resample", type=int, default=5)
    p.add_argument("--trained-steps", type=int, default=20)
    p.add_argument("--methods", nargs="+", default=["replacement", "repaint", "trained"],
                   help="which to run (e.g. replacement alone at --replacement-steps 230: RePaint's evaluations)")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_inpaint")
    args = p.parse_args()
    if args.phase == "eval":
        eval_phase(args)
    else:
        train_phase("generation" if args.phase == "train-uncond" else "inpaint", args)


if __name__ == "__main__":
    main()
