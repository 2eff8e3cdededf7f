"""The hand-made case the evaluation tests share: ten events, one invalid record, a stand-in
pipeline that flags by amount, point labels and two store-stopped windows."""

from __future__ import annotations

import numpy as np
import orjson

from stream_detector.evaluation import Labels, WindowLabel
from stream_detector.events.event_time import EventTimeGuard
from stream_detector.features import FeatureBatch
from stream_detector.scoring.pipeline import BatchResult

T0 = 1_767_571_200.0  # 2026-01-05T00:00:00Z


class ThresholdPipeline:
    """A stand-in pipeline: fused score = min(amount / 1000, 1), flagged above 0.1 (amount > 100)."""

    detector_names = ["amount"]
    threshold = 0.1

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.event_time = EventTimeGuard()  # the real guard: score_batch asks every pipeline for it

    def process(self, batch: FeatureBatch) -> BatchResult:
        self.batches.append(batch.n)
        fused = np.minimum(batch.column("amount") / 1000.0, 1.0)
        return BatchResult(
            fused=fused,
            is_anomaly=fused > self.threshold,
            probability={"amount": 1.0 - fused},
            raw={"amount": fused},
            threshold=self.threshold,
        )


def event(i: int, amount: float, store: str = "s-1") -> bytes:
    return orjson.dumps({"event_id": f"e{i}", "timestamp": int((T0 + 60 * i) * 1000), "amount": amount, "store_id": store})


# e0..e9; labelled: e1, e2 price_spike, e5, e6 refund_burst, e7 duplicate.
# Flagged (amount > 100): e1, e3, e5, e6, e9.  An invalid record sits between e4 and e5.
AMOUNTS = [10, 500, 20, 300, 5, 150, 200, 30, 40, 900]
POINT_LABELS = {"e1": "price_spike", "e2": "price_spike", "e5": "refund_burst", "e6": "refund_burst", "e7": "duplicate"}


def tiny_events() -> list[bytes]:
    events = [event(i, a) for i, a in enumerate(AMOUNTS)]
    events.insert(5, b"{not json")
    return events


def tiny_labels(windows: list[WindowLabel] | None = None) -> Labels:
    return Labels(points=dict(POINT_LABELS), windows=list(windows or []))


def store_stopped_windows() -> list[WindowLabel]:
    return [
        WindowLabel("store_stopped", "s-1", T0 + 60, T0 + 120),
        WindowLabel("store_stopped", "s-2", T0 + 180, T0 + 240),
    ]
