"""Throughput of the autoencoder detector by batch size, on the CPU and on CUDA when present.

Three figures per device and batch size, all through the public ``score``/``commit`` API:

* ``score``: rows/s of ``score`` with nothing learned: the forward pass plus the per-batch
  overhead (feature matrix, standardisation, transfers) that the pipeline pays;
* ``learn``: rows/s of ``score`` + ``commit`` with every event learned, at the default
  ``train_batch_size`` (256): scoring plus one training point per 256 events, each with its clone;
* ``train``: the same with ``train_batch_size`` equal to the batch size, so every batch holds
  exactly one training point of that size: how the cost of training scales with its batch.

The pipeline calls ``score`` about twice per batch, so its own throughput is roughly half of these.

    python -m bench.bench_autoencoder [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import time
from functools import partial

import numpy as np
import torch

from stream_detector.detectors.autoencoder import AutoencoderDetector
from stream_detector.features import FeatureBatch, add_derived_features

BATCH_SIZES = (64, 256, 1024, 4096, 16384)


def make_batch(n: int, seed: int = 0) -> FeatureBatch:
    """Synthetic sales lines over a week, through the real feature derivation."""
    rng = np.random.default_rng(seed)
    t = 1.7e9 + np.sort(rng.uniform(0, 7 * 86400, n))
    quantity = rng.integers(1, 20, n).astype(float)
    unit_price = np.round(np.exp(rng.normal(3.0, 0.8, n)), 2)
    amount = quantity * unit_price * np.where(rng.random(n) < 0.02, -1.0, 1.0)
    cols = add_derived_features({"amount": amount, "quantity": quantity, "unit_price": unit_price}, t)
    return FeatureBatch(event_time=t, columns=cols, keys={}, event_ids=np.arange(n).astype(object))


def rows_per_second(fn, rows: int, min_seconds: float) -> float:
    """Repeat ``fn`` (after one warm-up call) for at least ``min_seconds``; rows per second."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and calls >= 3:
            return rows * calls / elapsed


def trained_detector(device: str, data: FeatureBatch, **kwargs) -> AutoencoderDetector:
    """A detector past its warm-up, so scoring runs the network."""
    det = AutoencoderDetector(device=device, warmup_events=0, **kwargs)
    det.learn_one_batch(data.slice(0, 4096))
    return det


def bench_device(device: str, data: FeatureBatch, min_seconds: float) -> list[tuple]:
    rows = []
    for size in BATCH_SIZES:
        batch = data.slice(0, size)
        none, every = np.zeros(size, dtype=bool), np.ones(size, dtype=bool)

        scorer = trained_detector(device, data)
        score = rows_per_second(partial(scorer.score, batch, none), size, min_seconds)

        learner = trained_detector(device, data)
        learn = rows_per_second(partial(learner.learn_one_batch, batch, every), size, min_seconds)

        trainer = trained_detector(device, data, train_batch_size=size)
        train = rows_per_second(partial(trainer.learn_one_batch, batch, every), size, min_seconds)
        rows.append((size, score, learn, train))
        print(f"  {device:>6} {size:>6} {score:>14,.0f} {learn:>14,.0f} {train:>14,.0f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short timings (~0.1 s each)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--cpu-only", action="store_true", help="skip CUDA even if available")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    min_seconds = 0.1 if args.quick else 1.0
    data = make_batch(max(BATCH_SIZES))

    devices = ["cpu"]
    print(f"torch {torch.__version__}; cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append("cuda")
        print(f"cuda: {torch.cuda.get_device_name()}")
    print("rows/s; score = forward only; learn = score+commit, all learned, train_batch_size=256;")
    print("train = same with train_batch_size = batch (one training point per batch)")
    print(f"  {'device':>6} {'batch':>6} {'score':>14} {'learn':>14} {'train':>14}")
    for device in devices:
        bench_device(device, data, min_seconds)


if __name__ == "__main__":
    main()
