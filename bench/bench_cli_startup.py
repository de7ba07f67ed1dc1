"""Wall time of ``difflab --help`` in fresh processes, and the slowest imports of one of them.

    python bench/bench_cli_startup.py [--runs 15]

Prints the median over ``--runs`` fresh ``python -m difflab --help`` processes (subprocess +
time.perf_counter), the top entries of ``python -X importtime``, and a line for docs/benchmarks.md.
Asserts nothing; the property "no torch on --help" is tests/test_cli_startup.py.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import time

COMMAND = [sys.executable, "-m", "difflab", "--help"]


def help_seconds(runs: int) -> list[float]:
    """Wall time of each of ``runs`` fresh ``difflab --help`` processes."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(COMMAND, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


def top_imports(n: int) -> list[tuple[int, str]]:
    """(cumulative microseconds, module) of the ``n`` slowest imports under ``-X importtime``."""
    err = subprocess.run([sys.executable, "-X", "importtime", *COMMAND[1:]], check=True, capture_output=True,
                         text=True).stderr
    rows = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
        rows.append((int(cumulative), name.strip()))
    return sorted(rows, reverse=True)[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    times = help_seconds(args.runs)
    median = statistics.median(times)
    print(f"difflab --help: median {median:.3f} s over {args.runs} fresh processes "
          f"(min {min(times):.3f} s, max {max(times):.3f} s)")
    print("slowest imports (cumulative):")
    for micros, name in top_imports(args.top):
        print(f"  {micros / 1000:8.1f} ms  {name}")
    print(f"\nfor docs/benchmarks.md:\n| `difflab --help` | {median:.3f} s (median of {args.runs}) | "
          f"{datetime.date.today().isoformat()} | `python bench/bench_cli_startup.py --runs {args.runs}` |")


if __name__ == "__main__":
    main()
