"""Anomaly records shaped like the pipeline's output, for the alerting tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

T0 = datetime(2026, 11, 27, tzinfo=UTC).timestamp()  # Black Friday, 00:00 UTC
DAY = 86400.0


def record(event_id: str, key: str, *, z: float = 9.0, feature: str = "log_amount", p_z: float = 1e-8, hst: float | None = None) -> dict[str, Any]:
    """An anomaly of store ``key``: the z-score fired (``z`` on ``feature``, tail probability
    ``p_z``), the duplicates detector did not, HalfSpaceTrees fired only if ``hst`` is given."""
    detectors = {
        "zscore": {"fired": True, "tail_probability": p_z, "feature": feature, "z": z, "warm": True},
        "duplicates": {"fired": False, "tail_probability": 1.0},
        "hst": {"fired": hst is not None, "tail_probability": hst if hst is not None else 0.5},
    }
    return {"event_id": event_id, "key": key, "detectors": detectors, "event": {"event_id": event_id, "store_id": key}}
