"""The demo recipe's ablation (docs/benchmarks.md, section 2): train the demo config with overrides for a fixed
number of steps, then score prompt adherence with the shapes oracle on the 8 demo prompts x 8 and on 64 held-out
captions (``sample_specs(64, seed=777)``), ``dpmpp_2m``, 20 steps, seed 0, at each guidance scale.

Usage (one thread per run, two runs at a time, one per core, as the table was measured):
    taskset -c 0 python bench/bench_demo_ablation.py NAME STEPS '{"objective.weighting": "min_snr", ...}' \
        --threads 1 --guidance 3
``--x0-offset C`` trains with the x0 weight min(SNR + C, gamma) (C = 0: min-SNR, C = 1: ``min_snr_v``), a
weighting this script registers for the ablation only. One JSON line per guidance scale is appended to
``runs/demo_ablation/results.jsonl``. The check on fresh captions of the committed demo:
    python bench/bench_demo_ablation.py fresh 0 --model runs/demo --held-count 256 --held-seed 2026 --sample-seed 1 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("steps", type=int)
    p.add_argument("overrides", nargs="?", default="{}", help="dotted-key JSON overrides of configs/demo.yaml")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0])
    p.add_argument("--x0-offset", type=float, default=None)
    p.add_argument("--out", type=Path, default=Path("runs/demo_ablation"))
    p.add_argument("--model", type=Path, default=None, help="score this trained folder (e.g. runs/demo) instead of training")
    p.add_argument("--held-count", type=int, default=64, help="held-out captions (sample_specs(N, seed))")
    p.add_argument("--held-seed", type=int, default=777)
    p.add_argument("--sample-seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    overrides = json.loads(args.overrides)
    if args.x0_offset is not None:
        import difflab.losses as losses
        import difflab.training.config as config_module

        @losses.register_weighting("min_snr_offset")
        def _offset(snr: torch.Tensor, parameterization: str, gamma: float) -> torch.Tensor:
            return (snr + args.x0_offset).clamp(max=gamma) * losses.x0_error_per_target_error(parameterization, snr)

        config_module.WEIGHTINGS = tuple(losses._WEIGHTINGS)
        overrides["objective.weighting"] = "min_snr_offset"

    from difflab.cli.demo import DEMO_PROMPTS, demo_config_path
    from difflab.data.shapes import sample_specs
    from difflab.data.shapes_spec import caption, parse_caption
    from difflab.metrics.shapes_adherence import spec_adherence
    from difflab.pipelines.diffusion import DiffusionPipeline
    from difflab.recipes import train
    from difflab.training import load_config

    run, train_s = args.model or args.out / args.name, None
    if args.model is None:
        config = load_config(demo_config_path(), {**overrides, "optim.steps": args.steps,
                                                  "log.sample_every": args.steps, "log.checkpoint_every": args.steps})
        started = time.perf_counter()
        train(config, run)
        train_s = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = DiffusionPipeline.from_pretrained(run)
    sets = {"demo": [q for q in DEMO_PROMPTS for _ in range(8)],
            "held": [caption(s) for s in sample_specs(args.held_count, seed=args.held_seed)]}
    for w in args.guidance:
        row = {"name": args.name, "steps": args.steps, "overrides": overrides, "x0_offset": args.x0_offset,
               "threads": args.threads, "train_s": train_s, "guidance": w, "held_seed": args.held_seed}
        for tag, prompts in sets.items():
            out = pipe(num_images=len(prompts), num_inference_steps=20, sampler="dpmpp_2m", seed=args.sample_seed, prompt=prompts,
                       guidance_scale=w, progress=False)
            scores = spec_adherence(out.samples, [parse_caption(q) for q in prompts], pipe.resolution)
            row[tag] = {k: round(v, 3) for k, v in scores.items() if not k.startswith("oracle")}
        print(json.dumps(row), flush=True)
        with open(args.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
