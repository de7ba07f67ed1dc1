"""Latent against pixel-space diffusion on captioned shapes at the same output resolution (32x32) and CPU budget.

1. Train a KL autoencoder (factor 4: 32x32x3 images <-> 8x8x4 latents) for ``--ae-budget-s`` seconds.
2. Train two text-conditional diffusion models with the same UNet hyper-parameters, one on 32x32x3 pixels and
   one on the 8x8x4 latents, each for ``--budget-s`` seconds of training (the step count is set from a short
   throughput probe), with the same held-out (shape, colour) pairs as the prompt-adherence benchmark.
3. Report per model: training images/s, sampling ms per image (20 DPM-Solver++(2M) steps, guidance 3, batch
   32, decoding included), peak memory of a training step (fresh process, see bench_training_memory.py), FID
   (Inception pool3, ``--fid-images`` samples for training captions against as many real images), and prompt
   adherence (oracle, held-out prompts, several guidance scales) as in bench_prompt_adherence.py.

    python bench/bench_latent.py                          # ~45 min on one CPU core
    python bench/bench_latent.py --ae-budget-s 60 --budget-s 60 --fid-images 32 --out runs/bench_latent_smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import time
from pathlib import Path

import torch

from bench_prompt_adherence import HELD_OUT, MODEL, adherence, diversity, held_out_prompts
from bench_training_memory import measure_in_subprocess
from difflab.data import build_dataset
from difflab.data.shapes_spec import caption
from difflab.metrics import evaluate
from difflab.metrics.shapes_oracle import train_oracle
from difflab.pipelines.diffusion import DiffusionPipeline
from difflab.recipes import train
from difflab.training import TrainConfig
from difflab.training.autoencoder import train_autoencoder

AE_CONFIG = {"base_channels": 32, "channel_mults": (1, 2, 2), "latent_channels": 4, "norm_groups": 8}
BATCH = 32


def diffusion_config(steps: int, autoencoder: Path | None) -> TrainConfig:
    data = {"dataset": "shapes", "resolution": 32, "num_images": 20000, "exclude": [list(p) for p in HELD_OUT]}
    if autoencoder is not None:
        data["autoencoder"] = str(autoencoder)
    return TrainConfig.from_dict({
        "data": data, "model": MODEL, "schedule": {"kind": "cosine"},
        "objective": {"parameterization": "v", "weighting": "min_snr"},
        "conditioning": {"kind": "text", "dropout": 0.1},
        "optim": {"steps": steps, "batch_size": BATCH, "lr": 1e-3, "ema_decay": 0.999},
        "log": {"sample_every": 0, "checkpoint_every": 0}})


def steps_for_budget(out: Path, autoencoder: Path | None, budget_s: float, probe_steps: int = 20) -> tuple[int, float]:
    """Training steps that fill ``budget_s`` seconds, from the throughput of a short probe run."""
    result = train(diffusion_config(probe_steps, autoencoder), out, progress=False)
    return max(probe_steps, int(budget_s * result.images_per_second / BATCH)), result.images_per_second


def sampling_ms_per_image(pipe: DiffusionPipeline, prompts: list[str]) -> float:
    prompts = (prompts * BATCH)[:BATCH]
    pipe(num_images=4, num_inference_steps=2, seed=0, prompt=prompts[:4], progress=False)  # warm-up
    start = time.perf_counter()
    pipe(num_images=BATCH, num_inference_steps=20, sampler="dpmpp_2m", seed=0, prompt=prompts,
         guidance_scale=3.0, progress=False)
    return 1000 * (time.perf_counter() - start) / BATCH


def quality(pipe: DiffusionPipeline, oracle, real: torch.Tensor, captions: list[str], scales: list[float],
            per_prompt: int) -> dict:
    x = pipe.in_batches(len(captions), 64, seed=0, prompt=captions, num_inference_steps=20, sampler="dpmpp_2m",
                        guidance_scale=3.0, progress=False).samples
    fid = evaluate(x, ["fid"], reference=real, value_range=(-1, 1), progress=False)["metrics"]["fid"]["value"]
    specs = [s for s in held_out_prompts() for _ in range(per_prompt)]
    rows = []
    for w in scales:
        y = pipe(num_images=len(specs), num_inference_steps=20, sampler="dpmpp_2m", seed=0,
                 prompt=[caption(s) for s in specs], guidance_scale=w, progress=False).samples
        rows.append({"scale": w, "adherence": adherence(oracle, y, specs, ("shape", "color")),
                     "diversity": diversity(y, per_prompt)})
    return {"fid": fid, "adherence": rows}


@torch.no_grad()
def autoencoder_ceiling(vae_dir: Path, oracle, per_prompt: int) -> tuple[float, float]:
    """Oracle shape+colour adherence of real renderings of the held-out prompts, as they are and after an
    encode/decode round trip: the most a latent model can reach with this autoencoder."""
    from difflab.data.shapes_render import render_specs
    from difflab.nets.autoencoder import AutoencoderKL

    specs = [s for s in held_out_prompts() for _ in range(per_prompt)]
    x = torch.from_numpy(render_specs(specs, 32)).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = AutoencoderKL.from_pretrained(vae_dir)
    recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    return adherence(oracle, x, specs, ("shape", "color")), adherence(oracle, recon, specs, ("shape", "color"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ae-budget-s", type=float, default=480)
    ap.add_argument("--budget-s", type=float, default=720, help="training seconds per diffusion model")
    ap.add_argument("--fid-images", type=int, default=256)
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--scales", default="1,3,5")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_latent"))
    args = ap.parse_args()
    started, out = time.perf_counter(), args.out
    data = build_dataset("shapes", 32, num_images=20000, seed=0, exclude=[tuple(p) for p in HELD_OUT])
    vae_dir = out / "vae"
    if not (vae_dir / "model.safetensors").exists():
        train_autoencoder(data, vae_dir, AE_CONFIG, steps=1_000_000, batch_size=32, lr=4e-4, time_limit=args.ae_budget_s,
                          progress=False)
    oracle, report = train_oracle(32, num_images=12000, steps=400, batch_size=128, width=32, progress=False)
    real_set = build_dataset("shapes", 32, num_images=args.fid_images, seed=99)
    real = torch.stack([real_set[i]["x"] for i in range(len(real_set))])
    captions = [real_set[i]["cond"]["caption"] for i in range(len(real_set))]
    results = {}
    for name, ae in (("pixel", None), ("latent", vae_dir)):
        model_dir = out / name
        if not (model_dir / "model_index.json").exists():  # a complete pipeline folder (the index is written last)
            shutil.rmtree(out / f"{name}_probe", ignore_errors=True)
            steps, _ = steps_for_budget(out / f"{name}_probe", ae, args.budget_s)
            t0 = time.perf_counter()
            result = train(diffusion_config(steps, ae), model_dir, progress=False)
            (model_dir / "bench.json").write_text(json.dumps({"steps": steps, "train_s": time.perf_counter() - t0,
                                                               "images_per_second": result.images_per_second}))
        info = json.loads((model_dir / "bench.json").read_text())
        pipe = DiffusionPipeline.from_pretrained(model_dir)
        shape = [pipe.unet.config.in_channels, pipe.resolution, pipe.resolution]
        model = {k: v for k, v in pipe.unet.config.to_dict().items() if k != "in_channels"}
        memory = measure_in_subprocess(model, shape, BATCH)
        results[name] = {**info, "sample_ms": sampling_ms_per_image(pipe, captions), "peak_mib": memory["peak_mib"],
                         "params": memory["params"], **quality(pipe, oracle, real, captions,
                                                               [float(s) for s in args.scales.split(",")], args.per_prompt)}
    print(f"Command: `python bench/bench_latent.py --ae-budget-s {args.ae_budget_s:g} --budget-s {args.budget_s:g} "
          f"--fid-images {args.fid_images}`; date {datetime.date.today()}; {time.perf_counter() - started:.0f} s; "
          f"torch threads {torch.get_num_threads()}; oracle accuracy on real images: "
          + ", ".join(f"{k} {100 * v:.1f}%" for k, v in report.accuracy.items()))
    print("\n| model | UNet input | params | training steps in budget | train img/s | sample ms/img (20 steps) | "
          "peak MiB / train step | FID (n=%d) | adherence at w = %s |" % (args.fid_images, args.scales))
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, r in results.items():
        shape = "8x8x4 latents" if name == "latent" else "32x32x3 pixels"
        adh = " / ".join(f"{100 * a['adherence']:.0f}%" for a in r["adherence"])
        print(f"| {name} | {shape} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['images_per_second']:.1f} | "
              f"{r['sample_ms']:.1f} | {r['peak_mib']:.0f} | {r['fid']:.1f} | {adh} |")
    real, recon = autoencoder_ceiling(vae_dir, oracle, args.per_prompt)
    print(f"\nOracle shape+colour adherence of real renderings of the held-out prompts: {100 * real:.1f}% as rendered, "
          f"{100 * recon:.1f}% after the autoencoder's encode/decode round trip.")
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
