"""Processes and devices for training, all through Hugging Face Accelerate (torch.distributed underneath).

``difflab train --num-processes N`` re-launches the same command on N local processes: with
``torch.distributed.run`` (gloo on CPU, NCCL on GPUs), or with ``accelerate launch --config_file FILE``
when an Accelerate config is given (multi-node, FSDP, DeepSpeed). Inside each process
:func:`make_accelerator` builds the ``Accelerator``; the trainer takes its slice of every global batch.
Problems that Accelerate would meet half-way through start-up (a config asking for more GPUs than the
machine has, fp16 on a CPU) are caught first and reported in one line.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState

from difflab.errors import UserError

GPU_TYPES = ("MULTI_GPU", "FSDP", "DEEPSPEED", "MEGATRON_LM")


def check_mixed_precision(mixed_precision: str, cuda: bool | None = None) -> None:
    """fp16 needs a CUDA GPU (loss scaling; Accelerate would silently run fp32 on a CPU); bf16 needs support for it."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if mixed_precision == "fp16" and not cuda:
        raise UserError("mixed_precision fp16 needs a CUDA GPU (on a CPU Accelerate would silently train in fp32); "
                        "use --mixed-precision bf16 or no")
    if mixed_precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU cannot run bf16; use --mixed-precision fp16 (with loss scaling) or no")


def resolve_mixed_precision(mixed_precision: str) -> str:
    """``"auto"`` becomes bf16 on a CUDA GPU that supports it and "no" elsewhere; other values are kept."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(mixed_precision: str, *, cpu: bool = False) -> Accelerator:
    """The Accelerator of this process; several processes without CUDA train on CPU with the gloo backend.
    ``cpu``: train on the CPU even where a GPU is available."""
    mixed_precision = resolve_mixed_precision(mixed_precision)
    check_mixed_precision(mixed_precision)
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not multi_process:  # Accelerate keeps one global state; let one process train several configs in turn
        AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu or (multi_process and not torch.cuda.is_available()))
    except (ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"Accelerate cannot start on this machine ({first}); check `accelerate config` and --num-processes") from None


@contextlib.contextmanager
def nested_run() -> Iterator[None]:
    """A training inside another one (an oracle trained at a preview): Accelerate keeps one global state, which
    :func:`make_accelerator` resets for the inner run; the outer run's state is put back afterwards."""
    saved = [(cls, dict(cls._shared_state)) for cls in (PartialState, AcceleratorState, GradientState)]
    try:
        yield
    finally:
        for cls, state in saved:
            cls._shared_state.clear()
            cls._shared_state.update(state)


def check_accelerate_config(path: str | Path, num_processes: int | None, gpus: int | None = None) -> dict[str, Any]:
    """Read an Accelerate config file and refuse one this machine cannot run; returns the parsed config."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Accelerate config {path} does not exist; create one with `accelerate config` or drop --accelerate-config")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise UserError(f"Accelerate config {path} is not valid YAML; recreate it with `accelerate config`") from None
    gpus = torch.cuda.device_count() if gpus is None else gpus
    kind = str(config.get("distributed_type", "NO")).upper()
    machines = int(config.get("num_machines", 1) or 1)
    per_machine = (num_processes or int(config.get("num_processes", 1) or 1)) // max(machines, 1)
    if kind in GPU_TYPES and not config.get("use_cpu", False) and per_machine > gpus:
        raise UserError(f"Accelerate config {path} asks for distributed_type {kind} with {per_machine} processes on this "
                        f"machine, but it has {gpus} GPU(s); rerun `accelerate config` for this machine or pass "
                        f"--num-processes {max(gpus, 1)}")
    precision = str(config.get("mixed_precision", "no"))
    if precision in ("fp16", "bf16"):
        check_mixed_precision(precision, cuda=gpus > 0 and not config.get("use_cpu", False))
    return config


def launch(train_args: list[str], num_processes: int, accelerate_config: str | None = None) -> int:
    """Run ``difflab train <train_args>`` on ``num_processes`` local processes; returns their exit status."""
    if num_processes < 1:
        raise UserError(f"--num-processes={num_processes} is invalid; use 1 or more")
    if accelerate_config is not None:
        check_accelerate_config(accelerate_config, num_processes)
        launcher = ["-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                    "--num_processes", str(num_processes)]
    else:
        gpus = torch.cuda.device_count()
        if gpus and num_processes > gpus:
            raise UserError(f"--num-processes={num_processes} but this machine has {gpus} GPU(s); use at most {gpus}")
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes)]
    return subprocess.call([sys.executable, *launcher, "-m", "difflab", "train", *train_args])
