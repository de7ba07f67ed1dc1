"""Peak memory of one training step per precision / gradient-checkpointing configuration.

Each configuration runs in a fresh process: build the UNet (``--preset``, default small32) and AdamW,
then measure the high-water mark of four training steps at ``--batch`` (32x32 RGB) above the memory in use
before the first: on a GPU ``torch.cuda.max_memory_allocated`` minus the allocated bytes, on a CPU the
process's peak resident set size (``VmHWM``) minus its resident size before the first step (``VmRSS``). That is what
training needs on top of the weights and the batch: gradients, AdamW's two moments, activations and
temporaries. The child runs with ``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc serves every large tensor
by mmap and returns it on free: the resident size then follows the live tensors (without it, repeated runs
differ by 2x). That makes allocation slower, so speed is measured by bench_unet.py, not here.

    python bench/bench_training_memory.py                 # ~2 min on a 2-core CPU
    python bench/bench_training_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from typing import Any

CONFIGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's current (``VmRSS``) or peak (``VmHWM``) resident set size, from /proc/self/status (Linux).

    Not ``ru_maxrss``: Linux carries the pre-exec high-water mark of the forked parent into it, so a child
    started by a large process would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(model: dict[str, Any], shape: list[int], batch: int, precision: str, checkpointing: bool, device: str) -> dict:
    """Peak extra memory (MiB) of training steps of a UNet ``model`` on inputs ``(batch, *shape)``."""
    import torch

    from difflab.nets.unet import UNet
    from difflab.nets.unet_config import UNetConfig

    torch.manual_seed(0)
    config = UNetConfig.from_dict({**model, "in_channels": shape[0], "gradient_checkpointing": checkpointing})
    net = UNet(config).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, foreach=True)
    x = torch.randn(batch, *shape, device=device)
    t = torch.randint(0, 1000, (batch,), device=device).float()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    cuda = device.startswith("cuda")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=precision != "fp32"):
            loss = (net(x, t).float() - x).square().mean()
        loss.backward()
        opt.step()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resident_bytes()
    step()  # creates the gradients and the optimizer state
    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() if cuda else resident_bytes("VmHWM")) - base
    return {"peak_mib": peak / 2**20, "params": sum(p.numel() for p in net.parameters())}


def measure_in_subprocess(model: dict[str, Any], shape: list[int], batch: int, precision: str = "fp32",
                          checkpointing: bool = False, device: str = "cpu") -> dict:
    """:func:`measure` in a fresh Python process, so that earlier allocations do not hide the peak."""
    job = json.dumps({"model": model, "shape": shape, "batch": batch, "precision": precision,
                      "checkpointing": checkpointing, "device": device})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, __file__, "--one", job], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from difflab.nets.unet_config import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one JSON job in a child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(**json.loads(args.one))))
        return
    model = {k: list(v) if isinstance(v, tuple) else v for k, v in PRESETS[args.preset].items()}
    rows = [(p, c, measure_in_subprocess(model, [3, 32, 32], args.batch, p, c, args.device)) for p, c in CONFIGS]
    print(f"Command: `python bench/bench_training_memory.py --preset {args.preset} --batch {args.batch} "
          f"--device {args.device}`; date {datetime.date.today()}; {rows[0][2]['params'] / 1e6:.2f}M parameters")
    print("\n| precision | gradient checkpointing | peak memory of a training step (MiB) |")
    print("| --- | --- | ---: |")
    for precision, ckpt, r in rows:
        print(f"| {precision} | {'yes' if ckpt else 'no'} | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
