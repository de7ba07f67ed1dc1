"""Benchmarks and known-answer figures for difflab.metrics (record results in docs/metrics.md).

    python bench/bench_metrics.py throughput --n 200      # Inception feature extraction, images/s on CPU
    python bench/bench_metrics.py memory                  # peak RSS streaming 1k / 10k / 50k feature rows
    python bench/bench_metrics.py known --n 500           # FID: CIFAR-10 vs itself, flipped, other half, MNIST
    python bench/bench_metrics.py domain                  # train the MNIST domain classifier, time it

Data: ``../shared/data`` beside the repository (MNIST and CIFAR-10 test sets), or ``--data DIR``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from difflab.data.cifar10 import load_cifar10
from difflab.metrics import GaussianStats, InceptionExtractor, extract_features, frechet_distance, prdc
from difflab.metrics.domain import load_mnist, train_mnist_classifier
from difflab.metrics.preprocess import inception_input

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def cifar10_subset(data: Path, indices: np.ndarray) -> np.ndarray:
    """CIFAR-10 test images (uint8 N x 32 x 32 x 3) at ``indices`` of the (class, NNNN) order."""
    return load_cifar10(data / "cifar10", "test", None)[0][indices]


def throughput(args: argparse.Namespace) -> dict:
    images = cifar10_subset(args.data, np.arange(args.n) * (10000 // args.n))
    ex = InceptionExtractor(args.weights)
    start = time.perf_counter()
    for i in range(0, len(images), args.batch_size):
        inception_input(list(images[i:i + args.batch_size]))
    t_pre = time.perf_counter() - start
    start = time.perf_counter()
    (fs,) = extract_features(images, [ex], batch_size=args.batch_size, progress=False)
    t_all = time.perf_counter() - start
    return {"images": fs.count, "batch_size": args.batch_size, "seconds": round(t_all, 2),
            "images_per_s": round(fs.count / t_all, 2), "preprocess_s": round(t_pre, 2),
            "preprocess_share": round(t_pre / t_all, 3)}


def _stream(n: int, batch: int = 1000, dim: int = 2048) -> None:
    """Stream n synthetic 2048-d feature rows through GaussianStats; print peak RSS before and after."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports (torch) included
    rng = np.random.default_rng(0)
    stats = GaussianStats(dim)
    for start in range(0, n, batch):
        stats.update(rng.standard_normal((min(batch, n - start), dim), dtype=np.float32))
    _ = stats.covariance
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": n, "rss_after_imports_mb": round(before, 1), "peak_rss_mb": round(peak, 1)}))


def memory(args: argparse.Namespace) -> list[dict]:
    rows = []
    for n in (1000, 10000, 50000):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "_stream", "--n", str(n)], capture_output=True,
                             text=True, check=True).stdout
        rows.append({**json.loads(out.strip().splitlines()[-1]), "seconds": round(time.perf_counter() - start, 1)})
    return rows


def known(args: argparse.Namespace) -> dict:
    step = 10000 // (2 * args.n)
    a = cifar10_subset(args.data, np.arange(args.n) * 2 * step)          # every class equally
    b = cifar10_subset(args.data, np.arange(args.n) * 2 * step + step)    # disjoint images, same classes
    mnist = load_mnist(args.data / "mnist")[0][: args.n]
    ex = InceptionExtractor(args.weights)
    sets = {}
    for name, imgs in (("cifar_a", a), ("cifar_a_flipped", a[:, :, ::-1]), ("cifar_b", b), ("mnist", mnist)):
        (sets[name],) = extract_features(imgs, [ex], batch_size=args.batch_size, keep_features=args.n,
                                         progress=True, desc=name)
    ref = sets["cifar_a"]
    out = {"n": args.n}
    for name, fs in sets.items():
        fid = frechet_distance(ref.stats.mean, ref.stats.covariance, fs.stats.mean, fs.stats.covariance)
        out[f"fid(cifar_a, {name})"] = round(fid, 3)
        out[f"prdc(cifar_a, {name})"] = {k: round(v, 3) for k, v in prdc(ref.features, fs.features).items()}
    return out


def domain(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    cpu = time.process_time()
    model = train_mnist_classifier(args.data / "mnist")
    return {"train_wall_s": round(time.perf_counter() - start, 1), "train_cpu_s": round(time.process_time() - cpu, 1),
            "heldout_accuracy": model.config.heldout_accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["throughput", "memory", "known", "domain", "_stream"])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--weights", default=None)
    args = parser.parse_args()
    if args.task == "_stream":
        _stream(args.n)
        return
    result = {"throughput": throughput, "memory": memory, "known": known, "domain": domain}[args.task](args)
    print(json.dumps({"task": args.task, "date": time.strftime("%Y-%m-%d"), "result": result}, indent=1))


if __name__ == "__main__":
    main()
