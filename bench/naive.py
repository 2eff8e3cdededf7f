"""The NAIVE baseline of the "Speed" issue: what a straightforward per-event detector costs.

Everything happens one event at a time, the way a first implementation would do it:

* ``json.loads`` of the raw record (the standard library),
* derived features in plain Python (the same definitions as ``stream_detector.features``),
* River's ``MinMaxScaler() | HalfSpaceTrees()`` (the detector's parameters: 25 trees, height 10,
  window 1000, seed 42): ``score_one`` then ``learn_one``,
* a z-score per store and feature (log amount, log quantity) from a plain-Python Welford dict,
* a PyTorch autoencoder of the same size as ours (10 inputs, hidden 16-4, mirrored decoder,
  tanh, Adam lr 1e-3) scored and then trained on a batch of one, on one CPU thread,
* "produce per anomaly": each anomaly is encoded with ``json.dumps`` and appended to a list
  (no broker here; the broker is measured in the end-to-end section of ``bench/run.py``).

The decision rule is deliberately simple (it is a speed baseline, not a detector): a warm
z-score above 5 sd, or a HalfSpaceTrees score above 0.98, or an autoencoder error above 25x
its running mean after 512 events. It flags on the order of 1 % of the synthetic stream, like
the real pipeline.

    python -m bench.naive [--events 5000]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import datetime
from typing import Any

import torch
from river import anomaly, compose, preprocessing

AE_FEATURES = (
    "log_amount",
    "log_quantity",
    "log_unit_price",
    "log_price_ratio",
    "is_refund",
    "is_zero",
    "hour_sin",
    "hour_cos",
    "dow_sin",
    "dow_cos",
)
HST_FEATURES = ("log_amount", "log_quantity", "log_unit_price", "hour_sin", "hour_cos")
Z_FEATURES = ("log_amount", "log_quantity")
Z_WARMUP = 30
Z_MIN_STD = 0.05


def features(event: dict[str, Any]) -> dict[str, float]:
    """Derived features of one event, in plain Python (0.0 where a field is missing)."""
    amount = float(event["amount"])
    quantity = event.get("quantity")
    unit_price = event.get("unit_price")
    f: dict[str, float] = {"log_amount": math.copysign(math.log1p(abs(amount)), amount)}
    f["log_quantity"] = math.log1p(quantity) if quantity and quantity > 0 else 0.0
    f["log_unit_price"] = math.log1p(unit_price) if unit_price and unit_price > 0 else 0.0
    expected = abs(quantity * unit_price) if quantity is not None and unit_price is not None else 0.0
    f["log_price_ratio"] = math.log(abs(amount) / expected) if expected > 0 and amount != 0 else 0.0
    f["is_refund"] = 1.0 if amount < 0 else 0.0
    f["is_zero"] = 1.0 if amount == 0 else 0.0
    ts = event["timestamp"]
    t = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() if isinstance(ts, str) else ts / 1000.0
    hour = (t % 86400.0) / 3600.0
    dow = (math.floor(t / 86400.0) + 3.0) % 7.0
    f["hour_sin"] = math.sin(2 * math.pi * hour / 24.0)
    f["hour_cos"] = math.cos(2 * math.pi * hour / 24.0)
    f["dow_sin"] = math.sin(2 * math.pi * (dow + hour / 24.0) / 7.0)
    f["dow_cos"] = math.cos(2 * math.pi * (dow + hour / 24.0) / 7.0)
    return f


class Welford:
    """Running count, mean and M2 per (store, feature) in a dict."""

    def __init__(self) -> None:
        self.state: dict[tuple[str, str], list[float]] = {}

    def z(self, key: tuple[str, str], x: float) -> float:
        s = self.state.get(key)
        if s is None or s[0] < Z_WARMUP:
            return 0.0
        std = max(math.sqrt(s[2] / (s[0] - 1)), Z_MIN_STD)
        return (x - s[1]) / std

    def learn(self, key: tuple[str, str], x: float) -> None:
        s = self.state.setdefault(key, [0.0, 0.0, 0.0])
        s[0] += 1
        delta = x - s[1]
        s[1] += delta / s[0]
        s[2] += delta * (x - s[1])


class NaiveAutoencoder:
    """10 -> 16 -> 4 -> 16 -> 10, tanh, Adam; inputs standardised with running statistics."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        d = len(AE_FEATURES)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d, 16),
            torch.nn.Tanh(),
            torch.nn.Linear(16, 4),
            torch.nn.Linear(4, 16),
            torch.nn.Tanh(),
            torch.nn.Linear(16, d),
        )
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        self.stats = Welford()
        self.n = 0
        self.mean_error = 0.0

    def _standardise(self, f: dict[str, float]) -> torch.Tensor:
        row = []
        for name in AE_FEATURES:
            s = self.stats.state.get(("*", name))
            if s is None or s[0] < 2:
                row.append(0.0)
            else:
                row.append((f[name] - s[1]) / max(math.sqrt(s[2] / (s[0] - 1)), 1e-3))
        return torch.tensor([row], dtype=torch.float32)

    def score(self, f: dict[str, float]) -> tuple[float, torch.Tensor]:
        x = self._standardise(f)
        with torch.no_grad():
            err = float(((self.net(x) - x) ** 2).mean())
        return err, x

    def learn(self, f: dict[str, float], x: torch.Tensor, err: float) -> None:
        self.opt.zero_grad()
        loss = ((self.net(x) - x) ** 2).mean()
        loss.backward()
        self.opt.step()
        for name in AE_FEATURES:
            self.stats.learn(("*", name), f[name])
        self.n += 1
        self.mean_error += (err - self.mean_error) / self.n


class NaivePipeline:
    def __init__(self, n_trees: int = 25, height: int = 10, window_size: int = 1000, seed: int = 42) -> None:
        torch.set_num_threads(1)
        self.hst = compose.Pipeline(
            preprocessing.MinMaxScaler(),
            anomaly.HalfSpaceTrees(n_trees=n_trees, height=height, window_size=window_size, seed=seed),
        )
        self.z = Welford()
        self.ae = NaiveAutoencoder()
        self.produced: list[bytes] = []

    def process_one(self, raw: bytes) -> bool:
        event = json.loads(raw)
        f = features(event)
        store = event.get("store_id", "")

        x = {name: f[name] for name in HST_FEATURES}
        hst_score = self.hst.score_one(x)
        self.hst.learn_one(x)

        zs = {name: self.z.z((store, name), f[name]) for name in Z_FEATURES}
        ae_error, ae_x = self.ae.score(f)
        ae_ratio = ae_error / self.ae.mean_error if self.ae.n >= 512 and self.ae.mean_error > 0 else 0.0

        z_max = max(abs(v) for v in zs.values())
        is_anomaly = z_max > 5.0 or hst_score > 0.98 or ae_ratio > 25.0
        if not is_anomaly:  # learn only from normal events
            for name in Z_FEATURES:
                self.z.learn((store, name), f[name])
            self.ae.learn(f, ae_x, ae_error)
        else:
            record = {
                "event_id": event["event_id"],
                "key": store,
                "detectors": {"zscore": zs, "hst": hst_score, "autoencoder": ae_error},
                "event": event,
            }
            self.produced.append(json.dumps(record).encode())
        return is_anomaly

    def process(self, values: list[bytes]) -> int:
        """Process every record one by one; returns the number of anomalies."""
        return sum(self.process_one(v) for v in values)


def main() -> None:
    import orjson

    from stream_detector.generator import GeneratorConfig, SalesGenerator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    args = parser.parse_args()
    values = [orjson.dumps(e) for e, _ in SalesGenerator(GeneratorConfig(seed=1)).generate(args.events)]
    pipeline = NaivePipeline()
    t0 = time.perf_counter()
    n_anomalies = pipeline.process(values)
    seconds = time.perf_counter() - t0
    print(f"naive: {len(values) / seconds:,.0f} events/s over {len(values)} events, {n_anomalies} anomalies")


if __name__ == "__main__":
    main()
