"""SR3 super-resolution against bicubic interpolation (issue 13): train `--task super-resolution` on the first
9,000 images of a dataset for a wall-clock budget, then upscale the held-out images 9,000-9,499 and score both
against the truth: PSNR, SSIM (difflab.metrics.fidelity) and the consistency error ||downsample(SR) - LR||^2.

Usage (one core, one thread; results appended to runs/bench_sr/results.jsonl and printed as a Markdown row):
    taskset -c 0 python bench/bench_super_resolution.py --dataset mnist --scale 2 --time-limit 600 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = range(9000, 9500)
MODEL = {"base_channels": 32, "channel_mults": [1, 2, 2], "num_res_blocks": 1, "attention_levels": [2],
         "head_channels": 32, "norm_groups": 8}  # a CPU-sized layout; 28 and 32 px both divide by its factor 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("mnist", "cifar10"), default="mnist")
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds of training")
    p.add_argument("--steps", type=int, default=100_000, help="upper bound on optimizer steps")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", type=Path, default=None, help="default ../shared/data/<dataset>")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_sr")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from difflab.data import build_dataset
    from difflab.metrics.fidelity import bicubic_upscale, consistency_error, psnr, ssim
    from difflab.pipelines.upscale import UpscalePipeline
    from difflab.recipes import train
    from difflab.training import load_config

    data_dir = args.data_dir or ROOT.parent / "shared" / "data" / args.dataset
    run = args.out / f"{args.dataset}_x{args.scale}_{int(args.time_limit)}s"
    if not (run / "model_index.json").is_file():
        config = load_config(None, {"task": "super-resolution", "data.dataset": args.dataset, "data.data_dir": str(data_dir),
                                    "data.num_images": 9000, "data.low_res_factor": args.scale, "model": MODEL,
                                    "optim.steps": args.steps, "optim.time_limit_s": args.time_limit,
                                    "optim.ema_decay": 0.995, "log.sample_every": 0, "log.checkpoint_every": 0})
        started = time.perf_counter()
        result = train(config, run, progress=False)
        print(f"trained {result.step} steps in {time.perf_counter() - started:.0f} s", flush=True)
    steps_done = len((run / "log.jsonl").read_text().splitlines())
    data = build_dataset(args.dataset, data_dir=str(data_dir))
    truth = torch.stack([data[i]["x"] for i in HELD_OUT])
    low = torch.nn.functional.avg_pool2d(truth, args.scale)  # as training made its inputs
    pipe = UpscalePipeline.from_pretrained(run)
    started = time.perf_counter()
    sr = torch.cat([pipe(low[i:i + 100], args.sample_steps, args.sampler, seed=i, progress=False).samples
                    for i in range(0, len(low), 100)])
    seconds = (time.perf_counter() - started) / len(low)
    bicubic = bicubic_upscale(low, args.scale)
    row = {"date": datetime.date.today().isoformat(), "dataset": args.dataset, "scale": args.scale,
           "train_s": args.time_limit, "steps": steps_done, "sampler": args.sampler, "nfe": args.sample_steps,
           "s_per_image": round(seconds, 4), "threads": args.threads}
    for name, images in (("sr3", sr), ("bicubic", bicubic)):
        row[name] = {"psnr": round(float(psnr(images, truth).mean()), 3), "ssim": round(float(ssim(images, truth).mean()), 4),
                     "consistency": round(float(consistency_error(images, low).mean()), 6)}
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    for name in ("sr3", "bicubic"):
        r = row[name]
        print(f"| {args.dataset} x{args.scale} | {name} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['consistency']:.2e} |")


if __name__ == "__main__":
    main()
