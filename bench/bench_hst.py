"""Throughput of River's ``MinMaxScaler() | HalfSpaceTrees()`` vs ``HalfSpaceTreesDetector``.

River is fed one event at a time (``score_one`` then ``learn_one``); ours scores and commits
batches. Rates are medians over blocks of ``--batch`` events, so a busy machine skews them
less. Both see the same events with the same parameters and seed, so the scores must agree:
the script prints the largest absolute difference next to the speed-up.

    python -m bench.bench_hst [--events 10000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from river import anomaly, compose, preprocessing

from stream_detector.detectors.hst import DEFAULT_FEATURES, HalfSpaceTreesDetector
from stream_detector.features import FeatureBatch


def sales_like(n: int, seed: int = 0) -> np.ndarray:
    """Columns shaped like DEFAULT_FEATURES: log amounts/quantities/prices and a daily clock."""
    rng = np.random.default_rng(seed)
    log_quantity = np.log1p(rng.poisson(3, n) + 1.0)
    log_unit_price = rng.normal(3.0, 0.8, n)
    log_amount = log_quantity + log_unit_price + rng.normal(0.0, 0.05, n)
    spikes = rng.random(n) < 0.01
    log_amount[spikes] += rng.choice([-4.6, 4.6], spikes.sum())  # x100 / /100 mistakes
    hour = rng.uniform(0.0, 24.0, n)
    return np.column_stack([log_amount, log_quantity, log_unit_price, np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24)])


def run_river(X: np.ndarray, block: int, n_trees: int, height: int, window_size: int, seed: int):
    """Scores and the seconds each block of ``block`` events took (River's tree construction,
    done in its first learn_one, is left out as the detector's construction is)."""
    model = compose.Pipeline(
        preprocessing.MinMaxScaler(),
        anomaly.HalfSpaceTrees(n_trees=n_trees, height=height, window_size=window_size, seed=seed),
    )
    rows = [dict(zip(DEFAULT_FEATURES, row, strict=True)) for row in X.tolist()]
    scores = np.empty(len(rows))
    scores[0] = model.score_one(rows[0])
    model.learn_one(rows[0])
    seconds = []
    for start in range(1, len(rows), block):
        t0 = time.perf_counter()
        for i in range(start, min(start + block, len(rows))):
            scores[i] = model.score_one(rows[i])
            model.learn_one(rows[i])
        seconds.append((time.perf_counter() - t0) * block / (min(start + block, len(rows)) - start))
    return scores, np.array(seconds)


def run_ours(X: np.ndarray, batch: int, n_trees: int, height: int, window_size: int, seed: int):
    """Scores and the seconds each batch took (score + commit)."""
    detector = HalfSpaceTreesDetector(
        features=DEFAULT_FEATURES,
        n_trees=n_trees,
        height=height,
        window_size=window_size,
        seed=seed,
    )
    n = len(X)
    batches = [
        FeatureBatch(
            event_time=np.zeros(min(s + batch, n) - s),
            columns={f: X[s : s + batch, j].copy() for j, f in enumerate(DEFAULT_FEATURES)},
            keys={},
        )
        for s in range(0, n, batch)
    ]
    scores, seconds = [], []
    for b in batches:
        t0 = time.perf_counter()
        step = detector.score(b, np.ones(b.n, dtype=bool))
        detector.commit(step)
        seconds.append((time.perf_counter() - t0) * batch / b.n)
        scores.append(step.scores)
    return np.concatenate(scores), np.array(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    X = sales_like(args.events)
    configs = [
        ("detector defaults", 25, 10, 1000),
        ("river defaults", 10, 8, 250),
    ]
    for label, n_trees, height, window_size in configs:
        params = (n_trees, height, window_size, args.seed)
        river_scores, river_s = run_river(X, args.batch, *params)
        ours_scores, ours_s = run_ours(X, args.batch, *params)
        # Medians per block of `batch` events: robust to other load on the machine.
        river_rate, ours_rate = args.batch / np.median(river_s), args.batch / np.median(ours_s)
        print(
            f"{label} (n_trees={n_trees}, height={height}, window_size={window_size}), "
            f"{args.events} events, batches of {args.batch}:\n"
            f"  river: {river_rate:12,.0f} events/s (median over {len(river_s)} blocks)\n"
            f"  ours:  {ours_rate:12,.0f} events/s (median over {len(ours_s)} batches)\n"
            f"  speed-up: {ours_rate / river_rate:.1f}x   "
            f"max |score diff|: {np.abs(river_scores - ours_scores).max():.3g}"
        )


if __name__ == "__main__":
    main()
