"""What level-shift tracking costs a batch, each case next to its baseline in the same run.

    python -m bench.level_shift_cost [--quick]

Offline, on ``LevelShiftTracker`` alone (the pipeline calls ``scan``, ``adopt`` and
``adaptation`` once per settled segment). Batches of 2,000 events with z-scores drawn from
N(0, 1), as between changes:

1. ``scan`` + ``adopt`` over two store features, with gradual shifts (the CUSUM of each store
   key, ``level_shift.gradual``) against without them, for 25, 1,000 and 10,000 store keys.
2. After a price list re-prices 500 products at once (1,500 currency keys adapting, 500 changes
   expected of the products' other keys): ``adaptation`` (which events adapt, which are
   expected to take a change) against a reference that compares the batch's keys with each
   adapting key in turn (the code before c4828d8).

Each figure is the median over rounds of the mean ms a batch; rounds alternate the two sides.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from stream_detector.features import FeatureBatch
from stream_detector.scoring.level_shift import LevelShiftTracker

BATCH = 2_000
STORE = "store_id"
PRODUCT = "product_id+currency"
FEATURES = ("log_amount", "log_quantity")


def store_batches(n_keys: int, count: int, seed: int) -> list[tuple[FeatureBatch, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for b in range(count):
        keys = np.array([f"s-{k}" for k in rng.integers(0, n_keys, BATCH)], dtype=object)
        values = rng.normal(3.0, 0.5, (BATCH, 2))
        batch = FeatureBatch(
            event_time=np.arange(BATCH, dtype=np.float64) + b * BATCH,
            columns={"log_amount": values[:, 0], "log_quantity": values[:, 1]},
            keys={STORE: keys},
            event_ids=np.array([str(i) for i in range(BATCH)], dtype=object),
        )
        out.append((batch, rng.normal(0.0, 1.0, (BATCH, 1, 2)), np.full((BATCH, 1, 2), 3.0)))
    return out


def scan_ms(batches: list[tuple[FeatureBatch, np.ndarray, np.ndarray]], gradual: bool) -> float:
    tracker = LevelShiftTracker(key_sets={STORE: FEATURES}, features=FEATURES, axis={STORE: 0}, gradual=(STORE,) if gradual else ())
    started = time.perf_counter()
    for batch, z, baseline in batches:
        tracker.adopt(tracker.scan(batch, z, baseline), batch)
    return (time.perf_counter() - started) / len(batches) * 1000


def repriced_tracker(products: int) -> LevelShiftTracker:
    tracker = LevelShiftTracker(key_sets={PRODUCT: ("log_unit_price",)}, features=("log_unit_price",), axis={PRODUCT: 0}, together={PRODUCT: (0,)})
    for p in range(products):
        tracker.expected[(PRODUCT, f"p-{p}", "log_unit_price")] = (f"p-{p}|USD", 0.9)
        for currency in ("USD", "EUR", "GBP"):
            tracker.adapting[(PRODUCT, f"p-{p}|{currency}")] = 5_000
    return tracker


def product_batch(products: int, seed: int) -> FeatureBatch:
    rng = np.random.default_rng(seed)
    keys = np.array([f"p-{rng.integers(0, 4 * products)}|{rng.choice(['USD', 'EUR', 'GBP'])}" for _ in range(BATCH)], dtype=object)
    return FeatureBatch(
        event_time=np.arange(BATCH, dtype=np.float64),
        columns={"log_unit_price": rng.normal(2.0, 0.1, BATCH)},
        keys={PRODUCT: keys},
        event_ids=np.array([str(i) for i in range(BATCH)], dtype=object),
    )


def key_by_key(tracker: LevelShiftTracker, batch: FeatureBatch) -> int:
    """The reference: each adapting key compared with the whole batch."""
    marked = 0
    for (ks, key), left in tracker.adapting.items():
        marked += np.flatnonzero(batch.keys[ks] == key)[:left].size
    return marked


def timed(step: Callable[[], object], repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        step()
    return (time.perf_counter() - started) / repeat * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches and rounds")
    args = parser.parse_args(argv)
    count, rounds = (10, 3) if args.quick else (40, 5)

    print("| case | baseline ms / batch | ours ms / batch | ours / baseline |")
    print("|---|---|---|---|")
    scan_ms(store_batches(25, 2, seed=0), gradual=True)  # compile the kernel first
    for n_keys in (25, 1_000, 10_000):
        batches = store_batches(n_keys, count, seed=n_keys)
        without, with_gradual = [], []
        for _ in range(rounds):
            without.append(scan_ms(batches, gradual=False))
            with_gradual.append(scan_ms(batches, gradual=True))
        base, ours = statistics.median(without), statistics.median(with_gradual)
        print(f"| scan + adopt, {n_keys:,} store keys: without gradual shifts / with | {base:.2f} | {ours:.2f} | {ours / base:.2f}x |")

    tracker, batch = repriced_tracker(500), product_batch(500, seed=1)
    reference, adaptation = [], []
    for _ in range(rounds):
        reference.append(timed(lambda: key_by_key(tracker, batch), 3))
        adaptation.append(timed(lambda: tracker.adaptation(batch), 10))
    base, ours = statistics.median(reference), statistics.median(adaptation)
    print(f"| 500 products re-priced (1,500 keys adapting): key by key / `adaptation` | {base:.2f} | {ours:.2f} | {ours / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
