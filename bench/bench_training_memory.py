"""Peak memory of one training step per precision / gradient-checkpointing configuration.

Each configuration runs in a fresh process: build the UNet (``--preset``, default small32) and AdamW,
take one warm-up step, then measure the high-water mark of three more training steps at ``--batch``
(32x32 RGB). On a GPU this is ``torch.cuda.max_memory_allocated``; on a CPU the rise of the process's peak
resident set size (``ru_maxrss``) over its size before the first step, i.e. what the step itself needs
(activations, gradients, optimizer state) on top of the weights. Also prints each step's time.

    python bench/bench_training_memory.py                 # ~2 min on a 2-core CPU
    python bench/bench_training_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import time

CONFIGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def measure(preset: str, batch: int, precision: str, checkpointing: bool, device: str) -> dict:
    import torch

    from difflab.nets.unet import UNet
    from difflab.nets.unet_config import UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig.preset(preset, gradient_checkpointing=checkpointing)).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, foreach=True)
    x = torch.randn(batch, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (batch,), device=device).float()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=precision != "fp32"):
            loss = (net(x, t).float() - x).square().mean()
        loss.backward()
        opt.step()

    step()  # the optimizer state exists after the first step
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_mib": peak / 2**20, "step_s": min(times), "params": sum(p.numel() for p in net.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: "precision,checkpointing" in a child process
    args = ap.parse_args()
    if args.one:
        precision, ckpt = args.one.split(",")
        print(json.dumps(measure(args.preset, args.batch, precision, ckpt == "1", args.device)))
        return
    rows = []
    for precision, ckpt in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch),
                              "--device", args.device, "--one", f"{precision},{int(ckpt)}"],
                             capture_output=True, text=True, check=True)
        rows.append((precision, ckpt, json.loads(out.stdout.strip().splitlines()[-1])))
    print(f"Command: `python bench/bench_training_memory.py --preset {args.preset} --batch {args.batch} "
          f"--device {args.device}`; date {datetime.date.today()}; {rows[0][2]['params'] / 1e6:.2f}M parameters")
    print("\n| precision | gradient checkpointing | peak memory of a training step (MiB) | step time (s) | images/s |")
    print("| --- | --- | ---: | ---: | ---: |")
    for precision, ckpt, r in rows:
        print(f"| {precision} | {'yes' if ckpt else 'no'} | {r['peak_mib']:.0f} | {r['step_s']:.2f} | {args.batch / r['step_s']:.1f} |")


if __name__ == "__main__":
    main()
