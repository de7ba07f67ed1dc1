"""Speed of the difflab UNet against diffusers' UNet2DModel at equal parameter count, on CPU.

Measures, in one run and for each model:
  * training step (forward + MSE loss + backward + AdamW(foreach) step) images/s at batch ``--batch``;
  * sampling forward pass (eval mode, ``torch.inference_mode``) images/s at the same batch;
  * FLOPs per image (``torch.utils.flop_counter.FlopCounterMode``) and, with the machine's fp32
    matmul peak (best large ``torch.mm``), the fraction of that peak each figure reaches.

Fairness: same batch, fp32, same thread count, same optimizer and loss for every model; warm-up
iterations are excluded and each figure is the median of ``--iters`` timed iterations. Models are
timed round-robin (one iteration of each in turn), so load from other processes hits all alike.
diffusers is timed both in contiguous and channels-last memory format and the faster one is the
reference. Prints a Markdown table.

``--precision bf16`` runs both models under bf16 autocast (as ``mixed_precision: bf16`` does in training)
and measures the peak as the best bf16 ``torch.mm``; ``--grad-checkpointing`` turns on difflab's
activation recomputation (diffusers' UNet2DModel is timed without it).

Usage:
    python bench/bench_unet.py                 # about 1-2 minutes on a quiet 2-core machine
    python bench/bench_unet.py --precision bf16
    python bench/bench_unet.py --iters 10 --threads 2
    python bench/bench_unet.py --preset tiny32 --no-diffusers   # the demo model alone
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from difflab.nets.unet import UNet
from difflab.nets.unet_config import UNetConfig

SIZE = 32
DIFFUSERS_KW = dict(
    sample_size=SIZE,
    in_channels=3,
    out_channels=3,
    block_out_channels=(64, 128, 128),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)


@dataclass
class Entry:
    """One model under test and its measurements."""

    name: str
    net: nn.Module
    channels_last: bool
    params: int = 0
    fwd_flops: float = 0.0  # per image
    train_flops: float = 0.0  # per image, forward + backward
    train_s: list[float] = field(default_factory=list)
    sample_s: list[float] = field(default_factory=list)


def forward(net: nn.Module, x: Tensor, t: Tensor) -> Tensor:
    """Call either model and return the output tensor (diffusers wraps it in ``.sample``)."""
    out = net(x, t)
    return out.sample if hasattr(out, "sample") else out


def make_entries(config: UNetConfig, with_diffusers: bool = True) -> list[Entry]:
    """difflab's UNet (channels-last), then diffusers' UNet2DModel contiguous and channels-last."""
    torch.manual_seed(0)
    entries = [Entry("difflab UNet (channels_last)", UNet(config), True)]
    if with_diffusers:
        from diffusers import UNet2DModel  # bench/test-only dependency

        for cl in (False, True):
            torch.manual_seed(0)
            fmt = "channels_last" if cl else "contiguous"
            entries.append(Entry(f"diffusers UNet2DModel ({fmt})", UNet2DModel(**DIFFUSERS_KW), cl))
    for e in entries:
        e.params = sum(p.numel() for p in e.net.parameters())
        if e.channels_last:
            e.net.to(memory_format=torch.channels_last)
    return entries


def count_flops(net: nn.Module, train: bool, batch: int = 1) -> float:
    """FLOPs per image of one forward pass, or of forward + backward when ``train``."""
    x, t = torch.randn(batch, 3, SIZE, SIZE), torch.full((batch,), 10.0)
    with FlopCounterMode(display=False) as counter:
        if train:
            forward(net, x, t).square().mean().backward()
        else:
            with torch.no_grad():
                forward(net, x, t)
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def matmul_peak(n: int, reps: int, clock: Callable[[], float], dtype: torch.dtype = torch.float32) -> float:
    """Best ``torch.mm`` rate in FLOP/s for ``n x n`` matrices of ``dtype`` (``2 n^3`` FLOPs each)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        start = clock()
        torch.mm(a, b)
        best = min(best, clock() - start)
    return 2 * n**3 / best


def autocast(precision: str) -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step_fn(e: Entry, batch: int, precision: str = "fp32") -> Callable[[], None]:
    """A closure doing one training step of ``e.net`` on fixed random data."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=gen)
    noise = torch.randn(batch, 3, SIZE, SIZE, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen).float()
    if e.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(e.net.parameters(), lr=1e-4, foreach=True)  # as difflab's trainer

    def step() -> None:
        e.net.train()
        opt.zero_grad(set_to_none=True)
        with autocast(precision):
            loss = (forward(e.net, x, t).float() - noise).square().mean()
        loss.backward()
        opt.step()

    return step


def sample_step_fn(e: Entry, batch: int, precision: str = "fp32") -> Callable[[], None]:
    """A closure doing one no-grad eval forward pass, as a sampler does at each step."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen).float()
    if e.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        e.net.eval()
        with torch.inference_mode(), autocast(precision):
            forward(e.net, x, t)

    return step


def time_round_robin(
    steps: list[Callable[[], None]], warmup: int, iters: int, clock: Callable[[], float]
) -> list[list[float]]:
    """Run each step in turn ``warmup + iters`` times; return the timed durations per step."""
    times: list[list[float]] = [[] for _ in steps]
    for i in range(warmup + iters):
        for j, step in enumerate(steps):
            start = clock()
            step()
            if i >= warmup:
                times[j].append(clock() - start)
    return times


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where available, else the platform's machine string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_note() -> str:
    """The 1-minute load average against the core count: timings are only clean when it is low."""
    if not hasattr(os, "getloadavg"):
        return ""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    busy = " (busy machine: figures are noisy, multi-thread ones the most)" if load > cores + 1 else ""
    return f"; load average {load:.1f} on {cores} cores at the end{busy}"


def report(entries: list[Entry], batch: int, peak: float, clock: str, argv: list[str], precision: str = "fp32") -> str:
    """The Markdown report: settings, then one row per model; ratios are to the faster diffusers."""

    def rate(seconds: list[float]) -> float:
        return batch / statistics.median(seconds)

    others = entries[1:]
    best_train = max((rate(e.train_s) for e in others), default=None)
    best_sample = max((rate(e.sample_s) for e in others), default=None)
    lines = [
        f"Command: `{' '.join(['python bench/bench_unet.py', *argv])}`",
        "",
        f"Date: {datetime.date.today().isoformat()}; torch {torch.__version__}; "
        f"threads {torch.get_num_threads()}; clock {clock}; CPU: {cpu_name()}; "
        f"batch {batch}, {SIZE}x{SIZE} RGB, {precision}; {precision} matmul peak {peak / 1e9:.1f} GFLOP/s{load_note()}",
        "",
        "| model | params | GFLOP/img fwd | train img/s | train % peak | vs diffusers | "
        "sample img/s | sample % peak | vs diffusers |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in entries:
        train, sample = rate(e.train_s), rate(e.sample_s)
        vs_train = f"{train / best_train:.2f}x" if best_train else "-"
        vs_sample = f"{sample / best_sample:.2f}x" if best_sample else "-"
        lines.append(
            f"| {e.name} | {e.params / 1e6:.3f}M | {e.fwd_flops / 1e9:.3f} | {train:.1f} | "
            f"{100 * train * e.train_flops / peak:.1f}% | {vs_train} | {sample:.1f} | "
            f"{100 * sample * e.fwd_flops / peak:.1f}% | {vs_sample} |"
        )
    mismatch = [e.name for e in others if abs(e.params / entries[0].params - 1) > 0.05]
    if mismatch:
        names = ", ".join(mismatch)
        lines.append(f"\nWARNING: parameter counts differ from difflab's by more than 5%: {names}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per model and task (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--preset", default="small32", help="difflab UNetConfig preset (default small32)")
    p.add_argument(
        "--no-diffusers",
        action="store_true",
        help="time difflab only (e.g. --preset tiny32 for the demo model)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time (default); cpu: process CPU time, steadier on a busy shared "
        "machine (use with --threads 1)",
    )
    p.add_argument("--peak-size", type=int, default=2048, help="matrix size for the matmul peak")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="fp32, or bf16 autocast for every model")
    p.add_argument("--grad-checkpointing", action="store_true", help="difflab's UNet recomputes activations in backward")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = UNetConfig.preset(args.preset, gradient_checkpointing=args.grad_checkpointing)
    entries = make_entries(config, with_diffusers=not args.no_diffusers)
    flops: dict[str, tuple[float, float]] = {}  # by architecture: both diffusers entries share one
    for e in entries:
        arch = type(e.net).__name__
        if arch not in flops:
            flops[arch] = count_flops(e.net, train=False), count_flops(e.net, train=True)
        e.fwd_flops, e.train_flops = flops[arch]
        gflop = e.fwd_flops / 1e9
        print(f"{e.name}: {e.params:,} parameters, {gflop:.3f} GFLOP/image forward", file=sys.stderr)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    peak = matmul_peak(args.peak_size, reps=10, clock=clock, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)
    steps = [train_step_fn(e, args.batch, args.precision) for e in entries]
    for e, ts in zip(entries, time_round_robin(steps, args.warmup, args.iters, clock)):
        e.train_s = ts
    steps = [sample_step_fn(e, args.batch, args.precision) for e in entries]
    times = time_round_robin(steps, args.warmup, args.iters, clock)
    for e, ts in zip(entries, times):
        e.sample_s = ts
    print(report(entries, args.batch, peak, args.clock, argv, args.precision))


if __name__ == "__main__":
    main(sys.argv[1:])
