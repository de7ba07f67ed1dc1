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

``--diffusers-layout difflab`` builds diffusers' ``UNet2DModel`` with difflab's layout instead of the
example-style one of equal parameter count: the same levels and channels per level, the same residual
blocks per level (``UNet2DModel`` takes one ``layers_per_block``, so it is built with the largest and the
surplus blocks of the other levels are dropped), attention (``AttnDownBlock2D`` / ``AttnUpBlock2D``) only at
difflab's ``attention_levels``, mid-block attention as difflab's, scale-shift time conditioning, one GroupNorm
group count dividing every width (difflab clips its count per layer) and difflab's channels per head. The
two networks then have nearly the same parameters and FLOPs (left over: diffusers' upsampling conv keeps the
coarse width and its first decoder block per level is wider), so their throughput ratio isolates the
implementation from the architecture.

``--difflab-formats`` times difflab's UNet alone in three forms: contiguous, channels-last, and channels-last
under ``torch.compile`` (inductor, default mode; compilation happens in the warm-up iterations and is not
timed), with ratios against the contiguous one: whether the trainer should switch either on for a CPU.

``--precision bf16`` runs both models under bf16 autocast (as ``mixed_precision: bf16`` does in training)
and measures the peak as the best bf16 ``torch.mm``; ``--grad-checkpointing`` turns on difflab's
activation recomputation (diffusers' UNet2DModel is timed without it).

Usage:
    python bench/bench_unet.py                 # about 1-2 minutes on a quiet 2-core machine
    python bench/bench_unet.py --precision bf16
    python bench/bench_unet.py --iters 10 --threads 2
    python bench/bench_unet.py --preset tiny32 --no-diffusers   # the demo model alone
    python bench/bench_unet.py --diffusers-layout difflab      # like for like: same layout, same FLOPs
    python bench/bench_unet.py --preset patch32 --difflab-formats --threads 1 --warmup 3   # memory format, compile
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

from difflab.nets.attention import num_heads_for
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

LAYOUTS = {
    "example": "example-style (DownBlock2D / AttnDownBlock2D / DownBlock2D, block_out_channels (64, 128, 128), "
               "layers_per_block 2), equal parameters",
    "difflab": "difflab's (same levels, widths, blocks per level, attention levels, head width; scale-shift)",
}


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


def difflab_layout_kwargs(config: UNetConfig) -> dict:
    """UNet2DModel arguments with ``config``'s levels, widths, attention levels, head width and norm groups
    (residual blocks: the largest per-level count; :func:`drop_surplus_blocks` trims the other levels)."""
    chans = [config.base_channels * m for m in config.channel_mults]
    attn = set(config.attention_levels)
    groups = max(g for g in range(1, config.norm_groups + 1) if all(c % g == 0 for c in chans))
    attn_chans = [chans[i] for i in sorted(attn)] + ([chans[-1]] if config.mid_attention else [])
    head_dims = {c // num_heads_for(c, config.head_channels) for c in attn_chans}
    return dict(
        sample_size=SIZE, in_channels=config.in_channels, out_channels=config.resolved_out_channels,
        block_out_channels=tuple(chans), layers_per_block=max(config.res_blocks_per_level()),
        down_block_types=tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(len(chans))),
        up_block_types=tuple("AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(len(chans)))),
        norm_num_groups=groups, attention_head_dim=head_dims.pop() if len(head_dims) == 1 else config.head_channels,
        resnet_time_scale_shift="scale_shift", add_attention=config.mid_attention, dropout=config.dropout,
    )


def drop_surplus_blocks(net: nn.Module, blocks: tuple[int, ...]) -> None:
    """Keep ``blocks[l]`` resnets (and their attentions) in down level l and ``blocks[l] + 1`` in up level l.

    A down block's resnet j reads the previous one's width, so its first ``n`` are kept. An up block's last
    resnet reads the skip from the level above (its ``in_channels``), the others the level's own skips, so
    its first ``n`` and its last are kept. UNet2DModel's forward counts the skips from ``len(resnets)``.
    """
    def keep(block: nn.Module, idx: list[int]) -> None:
        for name in ("resnets", "attentions"):
            mods = getattr(block, name, None)
            if mods is not None:
                setattr(block, name, nn.ModuleList([mods[i] for i in idx]))

    most = max(blocks)
    for level, n in enumerate(blocks):
        keep(net.down_blocks[level], list(range(n)))
        keep(net.up_blocks[len(blocks) - 1 - level], [*range(n), most])


def diffusers_net(config: UNetConfig, layout: str) -> nn.Module:
    from diffusers import UNet2DModel  # bench/test-only dependency

    if layout == "example":
        return UNet2DModel(**DIFFUSERS_KW)
    net = UNet2DModel(**difflab_layout_kwargs(config))
    drop_surplus_blocks(net, config.res_blocks_per_level())
    return net


def make_entries(config: UNetConfig, with_diffusers: bool = True, layout: str = "example") -> list[Entry]:
    """difflab's UNet (channels-last), then diffusers' UNet2DModel contiguous and channels-last."""
    torch.manual_seed(0)
    entries = [Entry("difflab UNet (channels_last)", UNet(config), True)]
    if with_diffusers:
        suffix = ", difflab layout" if layout == "difflab" else ""
        for cl in (False, True):
            torch.manual_seed(0)
            fmt = "channels_last" if cl else "contiguous"
            entries.append(Entry(f"diffusers UNet2DModel{suffix} ({fmt})", diffusers_net(config, layout), cl))
    for e in entries:
        e.params = sum(p.numel() for p in e.net.parameters())
        if e.channels_last:
            e.net.to(memory_format=torch.channels_last)
    return entries


def difflab_format_entries(config: UNetConfig) -> list[Entry]:
    """difflab's UNet contiguous, channels-last, and channels-last compiled (same initial weights)."""
    entries = []
    for name, channels_last, compiled in (("contiguous", False, False), ("channels_last", True, False),
                                          ("channels_last + torch.compile", True, True)):
        torch.manual_seed(0)
        net = UNet(config)
        if channels_last:
            net.to(memory_format=torch.channels_last)
        entries.append(Entry(f"difflab UNet ({name})", torch.compile(net) if compiled else net, channels_last))
        entries[-1].params = sum(p.numel() for p in net.parameters())
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


def report(entries: list[Entry], batch: int, peak: float, clock: str, argv: list[str], precision: str = "fp32",
           layout: str = "example", formats: bool = False) -> str:
    """The Markdown report: settings, then one row per model; ratios are to the faster diffusers (with
    ``formats``, to the contiguous difflab UNet: the column then reads "vs contiguous")."""

    def rate(seconds: list[float]) -> float:
        return batch / statistics.median(seconds)

    others = entries[1:]
    best_train = max((rate(e.train_s) for e in others), default=None)
    best_sample = max((rate(e.sample_s) for e in others), default=None)
    if formats:  # difflab alone in three forms: ratios to the contiguous one
        others, best_train, best_sample = [], rate(entries[0].train_s), rate(entries[0].sample_s)
    lines = [
        f"Command: `{' '.join(['python bench/bench_unet.py', *argv])}`",
        "",
        f"Date: {datetime.date.today().isoformat()}; torch {torch.__version__}; "
        f"threads {torch.get_num_threads()}; clock {clock}; CPU: {cpu_name()}; "
        f"batch {batch}, {SIZE}x{SIZE} RGB, {precision}; {precision} matmul peak {peak / 1e9:.1f} GFLOP/s{load_note()}; "
        f"{'difflab alone, three memory formats / compilation' if formats else 'diffusers layout: ' + LAYOUTS[layout]}",
        "",
        "| model | params | GFLOP/img fwd | train img/s | train % peak | vs diffusers | "
        "sample img/s | sample % peak | vs diffusers |".replace("diffusers", "contiguous" if formats else "diffusers"),
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
    if layout == "difflab":
        far = [e.name for e in others if abs(e.fwd_flops / entries[0].fwd_flops - 1) > 0.1]
        if far:
            lines.append(f"\nWARNING: forward FLOPs differ from difflab's by more than 10%: {', '.join(far)}")
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
    p.add_argument("--diffusers-layout", choices=tuple(LAYOUTS), default="example",
                   help="example: the example-style UNet2DModel of equal parameters (default); "
                   "difflab: UNet2DModel in difflab's layout (same FLOPs; isolates implementation speed)")
    p.add_argument("--grad-checkpointing", action="store_true", help="difflab's UNet recomputes activations in backward")
    p.add_argument("--difflab-formats", action="store_true",
                   help="difflab alone: contiguous, channels-last and channels-last + torch.compile (no diffusers)")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = UNetConfig.preset(args.preset, gradient_checkpointing=args.grad_checkpointing)
    if args.difflab_formats:
        entries = difflab_format_entries(config)
    else:
        entries = make_entries(config, with_diffusers=not args.no_diffusers, layout=args.diffusers_layout)
    flops: dict[str, tuple[float, float]] = {}  # by architecture: entries of one architecture share one count
    for e in entries:
        net = getattr(e.net, "_orig_mod", e.net)  # FLOPs of a compiled module: count its original
        arch = type(net).__name__
        if arch not in flops:
            flops[arch] = count_flops(net, train=False), count_flops(net, train=True)
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
    print(report(entries, args.batch, peak, args.clock, argv, args.precision, args.diffusers_layout, args.difflab_formats))


if __name__ == "__main__":
    main(sys.argv[1:])
