"""A decoded batch as columns: the only input detectors see.

Features are float64 columns with NaN where an event did not carry the field, so a missing
optional field never becomes a fake zero. Keys are object arrays of strings (None where the
event has no value for that key set).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Derived feature names every detector may ask for. Raw numeric fields pass through as-is.
DERIVED_FEATURES = (
    "log_amount",  # sign(amount) * log1p(|amount|): decimal/currency mistakes become shifts
    "log_quantity",
    "log_unit_price",
    "log_price_ratio",  # log(|amount| / (quantity * unit_price)): 0 for a consistent line
    "is_refund",  # amount < 0
    "is_zero",  # amount == 0
    "hour_sin",
    "hour_cos",
    "dow_sin",
    "dow_cos",
)


# Derived features computed from others: a lasting change of a part moves them too.
COMPOSED_OF = {"log_amount": ("log_quantity", "log_unit_price")}


def moved_together(features: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``features`` and the derived features composed of any of them (a product's new price
    moves its lines' amounts)."""
    out = dict.fromkeys(features)
    out.update(dict.fromkeys(c for c, parts in COMPOSED_OF.items() if any(p in out for p in parts)))
    return tuple(out)


@dataclass(frozen=True)
class FeatureBatch:
    """Columns for ``n`` events, in input order."""

    event_time: np.ndarray  # float64 epoch seconds
    columns: dict[str, np.ndarray]  # name -> float64 (n,), NaN = missing
    keys: dict[str, np.ndarray]  # key set name -> object (n,) of str | None
    event_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))
    # 64-bit hash of every field but event_id (duplicate detection); empty if not computed.
    fingerprints: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))

    @property
    def n(self) -> int:
        return int(self.event_time.shape[0])

    def column(self, name: str) -> np.ndarray:
        try:
            return self.columns[name]
        except KeyError:
            return np.full(self.n, np.nan)

    def matrix(self, names: tuple[str, ...] | list[str]) -> np.ndarray:
        """(n, len(names)) float64 matrix of the named columns (NaN where missing)."""
        if not names:
            return np.empty((self.n, 0))
        return np.column_stack([self.column(name) for name in names])

    def slice(self, start: int, stop: int) -> FeatureBatch:
        """Events ``start:stop`` as a batch of their own (views, no copies)."""
        return FeatureBatch(
            event_time=self.event_time[start:stop],
            columns={k: v[start:stop] for k, v in self.columns.items()},
            keys={k: v[start:stop] for k, v in self.keys.items()},
            event_ids=self.event_ids[start:stop],
            fingerprints=self.fingerprints[start:stop],
        )


def add_derived_features(columns: dict[str, np.ndarray], event_time: np.ndarray) -> dict[str, np.ndarray]:
    """Return ``columns`` plus the DERIVED_FEATURES, computed on whole arrays."""
    amount = columns["amount"]
    quantity = columns.get("quantity", np.full_like(amount, np.nan))
    unit_price = columns.get("unit_price", np.full_like(amount, np.nan))
    out = dict(columns)
    out["log_amount"] = np.sign(amount) * np.log1p(np.abs(amount))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        out["log_quantity"] = np.where(quantity > 0, np.log1p(quantity), np.nan) if quantity.size else quantity
        out["log_unit_price"] = np.where(unit_price > 0, np.log1p(unit_price), np.nan) if unit_price.size else unit_price
        expected = np.abs(quantity * unit_price)
        ratio = np.abs(amount) / expected
        # A ratio that overflows (a unit price of 1e-300) is no measurement: treat it as missing.
        usable = (expected > 0) & (ratio > 0) & np.isfinite(ratio)
        out["log_price_ratio"] = np.where(usable, np.log(np.where(usable, ratio, 1.0)), np.nan)
    out["is_refund"] = (amount < 0).astype(np.float64)
    out["is_zero"] = (amount == 0).astype(np.float64)
    # Event-time calendar in UTC; seasonality is learned per hour/day, so the zone only
    # shifts the buckets consistently.
    day_seconds = np.mod(event_time, 86400.0)
    hour = day_seconds / 3600.0
    # 1970-01-01 was a Thursday: (days + 3) % 7 gives Monday = 0.
    dow = np.mod(np.floor(event_time / 86400.0) + 3.0, 7.0)
    out["hour_of_day"] = np.floor(hour)
    out["day_of_week"] = dow
    out["hour_sin"] = np.sin(2 * np.pi * hour / 24.0)
    out["hour_cos"] = np.cos(2 * np.pi * hour / 24.0)
    out["dow_sin"] = np.sin(2 * np.pi * (dow + hour / 24.0) / 7.0)
    out["dow_cos"] = np.cos(2 * np.pi * (dow + hour / 24.0) / 7.0)
    return out


def original_value(feature: str, value: float) -> float:
    """A feature value back in the event's units (log features are sign * log1p(|x|))."""
    if feature == "log_price_ratio":
        return float(np.exp(value))
    if feature.startswith("log_"):
        return float(np.sign(value) * np.expm1(abs(value)))
    return float(value)
