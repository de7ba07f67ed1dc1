"""The trainer's own training step of the default recipe (32x32 shapes, patch32 UNet, batch 32) with
``optim.channels_last`` off or on: whether bench_unet.py's channels-last gain survives the whole step (noising,
loss, EMA, optimizer). Prints images/s over 20 steps after 3 warm-up steps.

Usage (one core; run each form twice, alternating, to see the run-to-run spread):
    taskset -c 1 python bench/bench_train_step_formats.py contiguous
    taskset -c 1 python bench/bench_train_step_formats.py channels_last
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch


def main(form: str) -> None:
    from difflab.recipes.diffusion import build_diffusion_training
    from difflab.training import load_config

    if form not in ("contiguous", "channels_last"):
        raise SystemExit("usage: bench_train_step_formats.py contiguous|channels_last")
    torch.set_num_threads(1)
    config = load_config(None, {"data.num_images": 512, "optim.steps": 40, "log.sample_every": 0, "log.checkpoint_every": 0,
                                "optim.channels_last": form == "channels_last"})
    trainer = build_diffusion_training(config, tempfile.mkdtemp(), progress=False)
    for step in range(3):
        trainer.train_step(step)
    started = time.perf_counter()
    for step in range(3, 23):
        trainer.train_step(step)
    print(f"{form}: {20 * config.optim.batch_size / (time.perf_counter() - started):.1f} images/s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
