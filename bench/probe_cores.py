"""How much a second busy process slows the first on this machine (the scale-out ceiling).

Times the same CPU-bound pure-Python loop alone, then two copies started together, several
times. On a machine with two real idle cores both copies take as long as one alone; on shared
or hyper-threaded vCPUs they take longer, and two daemons gain less than 2x over one.

    python -m bench.probe_cores [--tries 4] [--iterations 20000000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time


def _busy(iterations: int) -> float:
    started = time.perf_counter()
    total = 0
    for i in range(iterations):
        total += i
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=20_000_000)
    args = parser.parse_args()
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(_busy, [1000, 1000])  # start both workers before timing
        for _ in range(args.tries):
            alone = pool.apply(_busy, (args.iterations,))
            together = pool.map(_busy, [args.iterations, args.iterations])
            slowdown = max(together) / alone
            print(f"alone {alone:.2f} s; together {together[0]:.2f} / {together[1]:.2f} s; two processes do {2 / slowdown:.2f}x the work of one", flush=True)


if __name__ == "__main__":
    main()
