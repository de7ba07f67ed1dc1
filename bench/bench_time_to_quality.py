"""Time to quality: diffusers' recipe and difflab's, each trained for the same wall-clock budget on the same
cores and images, then scored by FID.

(a) diffusers: their ``train_unconditional.py`` example at its documented defaults (``bench/ttq_diffusers.py``),
    a ``UNet2DModel`` sized to difflab's parameter count, sampled with DPM-Solver++(2M), 20 steps, EMA weights.
(b) difflab: ``bench/configs/time_to_quality_<dataset>.yaml`` (or ``--difflab-config``) through difflab's own
    training API (``bench/ttq_difflab.py``), sampled with ``--difflab-sampler`` (dpmpp_2m), 20 steps, EMA weights.

Fairness. Both train on difflab's dataset object's tensors (MNIST 28 -> 32 px, grey, or CIFAR-10 32 px; 10k
images), fp32, no previews. Each training runs in its own subprocess pinned with ``os.sched_setaffinity`` to
``--cores`` with ``torch.set_num_threads(--threads)``, one after the other. A budget is wall-clock seconds of
the training loop on that core set (with N cores: N x budget CPU-seconds); start-up, data loading, diffusers'
throughput probe (which sets its cosine length, as the example sets it from epochs) and the final save are
outside it, checkpoints and snapshots inside it, for both. ``--parallel --cores 0 --cores-b 1`` runs (a) and
(b) at the same time, one per core set: half the wall time, but each library has only its own core(s), and
the two share memory bandwidth and caches, so throughput is a little lower than when run alone.

Separate runs per budget for both libraries (diffusers' cosine length depends on the budget; difflab's
recipe does not, but one run per budget keeps the comparison simple).

FID at equal optimizer steps. In the runs of the smallest budget both libraries save their EMA weights every
``--snapshot-every`` steps (diffusers: a safetensors file; difflab: its checkpoint, log.checkpoint_every).
S is the largest step both saved, i.e. the largest multiple of ``--snapshot-every`` that both reached;
each library's EMA model after S steps of that run is scored too. It answers "how good per optimizer step",
where the main column answers "how good per second". Note that at step S the faster library is still
mid-schedule (diffusers' cosine LR has not decayed yet), the slower one near its end.

FID: difflab's reference-equal Inception FID (``difflab.metrics``) of ``--num-samples`` samples (image i from
seed i) against the training images, whose statistics are computed once per dataset and cached under the
output folder. Trained runs and FIDs are kept in their folders and reused when the settings match, so an
interrupted benchmark continues where it stopped.

Wall time per dataset on one core, ``--threads 1`` (rates measured on the project's 2-core box: Inception
~4 img/s, sampling 2000 images x 20 NFE ~5 min difflab / ~11 min diffusers): reference statistics ~40 min (once),
training 2 x (600 + 1800) s = 80 min, 6 samplings ~50 min, 6 FIDs ~50 min: about 3.7 h; with ``--parallel``
about 2.2 h.

Usage:
    python bench/bench_time_to_quality.py --dataset mnist                      # budgets 600 1800, core 0
    python bench/bench_time_to_quality.py --dataset cifar10 --cores 0 --threads 1
    python bench/bench_time_to_quality.py --dataset mnist --parallel --cores 0 --cores-b 1
    python bench/bench_time_to_quality.py --dataset mnist --smoke --cores 1    # ~2 min check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LIBS = ("diffusers", "difflab")


# ----- workers (one subprocess each, pinned by the parent) -----------------------------------------
def worker(spec_path: Path) -> None:
    import torch

    job = json.loads(spec_path.read_text())
    spec = job["spec"]
    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(Path(__file__).parent))
    import ttq_difflab as dl
    from difflab.training.config import TrainConfig

    config = TrainConfig.from_dict(spec["config"]) if "config" in spec else None  # eval jobs have none
    out = Path(job["dir"])
    result: dict[str, Any] = {"affinity": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads()}
    if spec["role"] == "reference":
        _, images = dl.training_images(config)
        images = images[: spec.get("reference_images") or len(images)]  # the first N, as --reference-images says
        path, count = dl.reference_stats(images, out, spec["name"], job["device"])
        result.update(path=str(path), count=count)
    elif spec["role"] == "train" and spec["lib"] == "difflab":
        result.update(dl.train(config, spec["budget"], out))
    elif spec["role"] == "train":
        import ttq_diffusers as df

        dataset, images = dl.training_images(config)
        target = dl.network_params(config, dataset)
        result.update(df.train(images, target, spec["budget"], out, seed=config.seed,
                               snapshot_every=spec["snapshot_every"], probe=tuple(spec["probe"])), difflab_params=target)
    else:  # eval: sample, then FID, for each (run folder, step) in turn
        result["fids"] = [evaluate_one(item, spec, job["device"]) for item in spec["items"]]
    Path(job["result"]).write_text(json.dumps(result, indent=1))


def evaluate_one(item: dict[str, Any], spec: dict[str, Any], device: str) -> dict[str, Any]:
    import ttq_difflab as dl

    run_dir, step = Path(item["dir"]), item["step"]
    start = time.perf_counter()
    if spec["lib"] == "difflab":
        samples = dl.sample(run_dir, spec["num_samples"], spec["nfe"], spec["sampler"], step=step, device=device)
    else:
        import ttq_diffusers as df

        samples = df.sample(run_dir, spec["num_samples"], spec["nfe"], step=step, device=device)
    sample_s = time.perf_counter() - start
    value = dl.fid(samples, Path(spec["reference"]), device)
    return {**item, "fid": value, "sample_s": sample_s, "fid_s": time.perf_counter() - start - sample_s}


# ----- the parent: launch pinned workers, reuse finished ones ------------------------------------
def launch(spec: dict[str, Any], run_dir: Path, cores: list[int], device: str = "cpu") -> tuple[Any, Path] | dict:
    """Start a worker for ``spec`` in ``run_dir`` on ``cores``. A finished training or evaluation with the same
    spec is reused (its result returned); a training folder of other settings, or an unfinished one, is emptied
    first. The reference worker always runs: its statistics file is cached by name (data set, images, folder)."""
    done = run_dir / "job.json"
    if (spec["role"] != "reference" and done.is_file() and json.loads(done.read_text())["spec"] == spec
            and (run_dir / "result.json").is_file()):
        print(f"  reusing {run_dir}", flush=True)
        return json.loads((run_dir / "result.json").read_text())
    if spec["role"] == "train" and run_dir.exists():
        shutil.rmtree(run_dir)  # this script's own run folder: stale checkpoints must not mix with new ones
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").unlink(missing_ok=True)
    job = {"spec": spec, "dir": str(run_dir), "result": str(run_dir / "result.json"), "device": device}
    spec_path = run_dir / "job.json"
    spec_path.write_text(json.dumps(job, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # difflab's Accelerate would otherwise take a GPU
    log = open(run_dir / "worker.log", "w")
    proc = subprocess.Popen([sys.executable, __file__, "--worker", str(spec_path)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT, preexec_fn=lambda: os.sched_setaffinity(0, cores))
    return proc, run_dir


def wait(handle: tuple[Any, Path] | dict) -> dict[str, Any]:
    if isinstance(handle, dict):
        return handle
    proc, run_dir = handle
    if proc.wait() != 0:
        tail = "\n".join((run_dir / "worker.log").read_text().splitlines()[-30:])
        raise SystemExit(f"error: worker in {run_dir} failed (status {proc.returncode}); last lines of its log:\n{tail}")
    return json.loads((run_dir / "result.json").read_text())


def run_pair(specs: dict[str, tuple[dict, Path]], args: argparse.Namespace, device: str = "cpu") -> dict[str, dict]:
    """Both libraries' workers: one after the other, or at the same time on two core sets with --parallel."""
    cores = {"diffusers": args.cores, "difflab": args.cores_b if args.parallel else args.cores}
    results, handles = {}, {}
    for lib in LIBS:
        handles[lib] = launch(*specs[lib], cores[lib], device)
        if not args.parallel:
            results[lib] = wait(handles[lib])
    return results if not args.parallel else {lib: wait(h) for lib, h in handles.items()}


# ----- settings -----------------------------------------------------------------------------------
def difflab_config(args: argparse.Namespace, budget: float, snapshot_every: int) -> dict[str, Any]:
    """The difflab config dict of one run: the YAML (or inline dict), with the data and logging this benchmark fixes."""
    import yaml
    from difflab.training.config import load_config

    raw = args.difflab_config or str(ROOT / "bench" / "configs" / f"time_to_quality_{args.dataset}.yaml")
    base, path = (yaml.safe_load(raw), None) if raw.lstrip().startswith("{") else (None, raw)
    overrides = {"data.dataset": args.dataset, "data.resolution": 32, "data.num_images": args.num_images,
                 "data.data_dir": str(args.data_dir or ROOT.parent / "shared" / "data" / args.dataset),
                 "optim.steps": 10**9, "log.sample_every": 0, "log.checkpoint_every": snapshot_every,
                 "log.keep_checkpoints": 10**6}
    return load_config(path, overrides, base=base).to_dict()


def plan(args: argparse.Namespace) -> None:
    if args.smoke:
        args.budgets, args.num_samples, args.nfe = [20.0], 32, 5
        args.num_images, args.snapshot_every = args.num_images or 64, 5
        args.out = args.out or "runs/bench_ttq_smoke/results.json"
    args.out = Path(args.out or "runs/bench_ttq/results.json")
    args.cores = [int(c) for c in args.cores.split(",")]
    args.cores_b = [int(c) for c in args.cores_b.split(",")] if args.cores_b else None
    if args.parallel and (not args.cores_b or set(args.cores) & set(args.cores_b)):
        raise SystemExit("error: --parallel needs a second, disjoint core set, e.g. --cores 0 --cores-b 1")
    if args.threads > min(len(args.cores), len(args.cores_b or args.cores)):
        raise SystemExit(f"error: --threads {args.threads} is more than the cores of a core set; pin more cores")


def run_dataset(args: argparse.Namespace) -> dict[str, Any]:
    work = args.out.parent / args.dataset
    smallest = min(args.budgets)
    config = difflab_config(args, smallest, 0)
    data_id = hashlib.sha1(json.dumps(config["data"], sort_keys=True).encode()).hexdigest()[:8]
    ref_spec = {"role": "reference", "config": config, "threads": args.threads, "reference_images": args.reference_images,
                "name": f"{args.dataset}-train-n{args.num_images or 'all'}-ref{args.reference_images or 'all'}-{data_id}"}
    print(f"[{args.dataset}] reference statistics", flush=True)
    reference = wait(launch(ref_spec, work / "fid_reference", args.cores, args.eval_device))
    runs: dict[tuple[str, float], dict[str, Any]] = {}
    for budget in sorted(args.budgets):
        every = args.snapshot_every if budget == smallest else 0
        specs = {lib: ({"role": "train", "lib": lib, "budget": budget, "config": difflab_config(args, budget, every),
                        "snapshot_every": every, "threads": args.threads, "parallel": args.parallel, "probe": [2, 5] if args.smoke else [5, 30]},
                       work / f"{lib}-{budget:g}s") for lib in LIBS}
        print(f"[{args.dataset}] training, budget {budget:g} s{' (in parallel)' if args.parallel else ''}", flush=True)
        for lib, result in run_pair(specs, args).items():
            runs[lib, budget] = {**result, "dir": str(specs[lib][1])}
            print(f"  {lib}: {result['steps']} steps, {result['images_per_s']:.1f} img/s, {result['params']:,} params", flush=True)
    common = set(runs["diffusers", smallest]["snapshots"]) & set(runs["difflab", smallest]["snapshots"])
    s = max((k for k in common if k % args.snapshot_every == 0), default=None) if args.snapshot_every else None
    print(f"[{args.dataset}] sampling and FID (S = {s})", flush=True)
    evals = {}
    for lib in LIBS:
        items = [{"dir": runs[lib, b]["dir"], "step": None, "budget": b} for b in sorted(args.budgets)]
        items += [{"dir": runs[lib, smallest]["dir"], "step": s, "budget": smallest}] if s else []
        evals[lib] = ({"role": "eval", "lib": lib, "items": items, "num_samples": args.num_samples, "nfe": args.nfe,
                       "sampler": args.difflab_sampler, "reference": reference["path"], "threads": args.threads,
                       "trained": [[runs[lib, b]["steps"], runs[lib, b]["train_s"]] for b in sorted(args.budgets)]}, work / f"eval-{lib}")
    scores = run_pair(evals, args, args.eval_device)
    for lib in LIBS:
        for f in scores[lib]["fids"]:
            runs[lib, f["budget"]]["fid_at_S" if f["step"] else "fid"] = f["fid"]
            runs[lib, f["budget"]]["sample_s" if not f["step"] else "sample_s_at_S"] = f["sample_s"]
    return {"settings": settings(args), "S": s, "reference": reference,
            "runs": [{"library": lib, "budget_s": b, **r} for (lib, b), r in runs.items()]}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"dataset": args.dataset, "budgets_s": args.budgets, "num_samples": args.num_samples, "nfe": args.nfe,
            "difflab_sampler": args.difflab_sampler, "diffusers_sampler": "DPMSolverMultistepScheduler dpmsolver++ order 2",
            "cores": args.cores, "cores_b": args.cores_b, "parallel": args.parallel, "threads": args.threads,
            "snapshot_every": args.snapshot_every, "num_images": args.num_images, "smoke": args.smoke,
            "reference_images": args.reference_images,
            "command": " ".join(["python bench/bench_time_to_quality.py", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": _cpu_name()}


def table(res: dict[str, Any]) -> str:
    st, s = res["settings"], res["S"]
    n = st["num_samples"]
    lines = [f"### {st['dataset']}: time to quality ({st['nfe']} NFE; difflab {st['difflab_sampler']}, "
             f"diffusers {st['diffusers_sampler']}; FID vs {res['reference']['count']} training images)", "",
             f"`{st['command']}` ({st['date']}, {st['cpu']}, cores {st['cores']}"
             f"{' and ' + str(st['cores_b']) + ' in parallel' if st['parallel'] else ''}, {st['threads']} thread(s))", "",
             f"| library | budget (s) | steps | train img/s | FID (n={n}) | FID at S={s} steps |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(res["runs"], key=lambda r: (r["budget_s"], r["library"])):
        at_s = f"{r['fid_at_S']:.2f}" if "fid_at_S" in r else "-"
        lines.append(f"| {r['library']} ({r['params'] / 1e6:.2f}M) | {r['budget_s']:g} | {r['steps']} | "
                     f"{r['images_per_s']:.1f} | {r['fid']:.2f} | {at_s} |")
    lines.append("")
    for r in sorted(res["runs"], key=lambda r: r["budget_s"]):
        if r["library"] == "diffusers":
            lines.append(f"diffusers {r['budget_s']:g} s: cosine length {r['planned_steps']} steps (probe "
                         f"{r['probe_steps_per_s']:.2f} steps/s); stopped by the {r['stopped_by']} after {r['train_s']:.0f} s "
                         f"at LR {r['final_lr']:.1e}")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=("mnist", "cifar10"), default="mnist")
    p.add_argument("--budgets", type=float, nargs="+", default=[600.0, 1800.0], help="seconds of training per run")
    p.add_argument("--cores", default="0", help="core set (comma-separated) every worker is pinned to (default 0)")
    p.add_argument("--cores-b", default=None, help="with --parallel: difflab's core set")
    p.add_argument("--parallel", action="store_true", help="run (a) on --cores and (b) on --cores-b at the same time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--difflab-config", default=None, help="YAML path or an inline {...} dict (default bench/configs/...)")
    p.add_argument("--difflab-sampler", default="dpmpp_2m", help="difflab sampler for FID (dpmpp_2m or unipc)")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--nfe", type=int, default=20, help="sampling steps (network evaluations) for both")
    p.add_argument("--snapshot-every", type=int, default=100, help="steps between EMA snapshots in the smallest budget")
    p.add_argument("--num-images", type=int, default=None, help="training images (default: all 10k)")
    p.add_argument("--reference-images", type=int, default=None,
                   help="FID reference: the first N training images (default all; fewer is quicker, biased the same for both)")
    p.add_argument("--data-dir", default=None, help="default ../shared/data/<dataset>")
    p.add_argument("--eval-device", default="cpu", help="device for sampling + FID (not part of any budget)")
    p.add_argument("--out", default=None, help="results JSON (default runs/bench_ttq/results.json)")
    p.add_argument("--smoke", action="store_true", help="tiny check: budget 20 s, 64 images, 32 samples, 5 NFE")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    plan(args)
    os.sched_setaffinity(0, args.cores)  # the parent's own (light) work stays off the other cores too
    result = run_dataset(args)
    print("\n" + table(result))
    all_results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    all_results[args.dataset] = result
    args.out.write_text(json.dumps(all_results, indent=1))
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
