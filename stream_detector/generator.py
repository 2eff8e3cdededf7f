"""Deterministic synthetic retail sales stream with labelled injected anomalies.

The stream is built one simulated hour at a time as numpy columns: a non-homogeneous Poisson
process per store and channel (store size x daily and weekly profile) gives arrival times,
then products, prices and quantities are drawn, promotions and anomalies are applied, and
only the final step turns rows into dicts. Everything follows from the seed: the "world"
(stores, products), each simulated day's plan (promotions, store stops) and each hour's draws
use their own seeded generator, so a shorter run is an exact prefix of a longer one.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import IO, Any

import numpy as np
import orjson
from numpy.lib.stride_tricks import sliding_window_view

from stream_detector.errors import DeliveryError

logger = logging.getLogger(__name__)

ANOMALY_KINDS: tuple[str, ...] = (
    "price_spike",
    "quantity_burst",
    "decimal_error",
    "refund_burst",
    "duplicate",
    "store_stopped",  # a window without events: reported in SalesGenerator.window_labels
)
CHANNELS = ("store", "online", "mobile")
CURRENCIES = ("USD", "EUR", "GBP")
_CHANNEL_NAMES = np.array(CHANNELS, dtype=object)

# Row kind codes: 0 is a normal sale, code i is ANOMALY_KINDS[i - 1].
_PRICE_SPIKE, _QUANTITY_BURST, _DECIMAL_ERROR, _REFUND_BURST, _DUPLICATE = range(1, 6)

_MINUTE_MS = 60_000
_DAY_MIN = 1_440
_WEEK_MIN = 7 * _DAY_MIN
_THURSDAY = 3 * _DAY_MIN  # 1970-01-01 was a Thursday; minute 0 of our week is Monday 00:00
_CHUNK_MIN = 60  # simulated minutes generated per vectorised step

_FX = np.array([1.0, 0.92, 0.79])  # price level per currency, relative to USD
_CUSTOMER_SHARE = np.array([0.6, 0.9, 0.9])  # per channel: loyalty card in store, login online
_WEEKLY = np.array(  # Monday..Sunday volume multipliers per channel
    [
        [0.90, 0.90, 0.95, 1.00, 1.10, 1.40, 1.20],
        [1.00, 1.00, 1.00, 1.00, 1.05, 1.15, 1.10],
        [1.00, 1.00, 1.00, 1.00, 1.05, 1.15, 1.10],
    ]
)
_MEAN_BURST = 10  # refund bursts have 5..15 events
_MIN_STOP_RATE = 1.0  # expected events/minute a store must keep up through a stop window

# Drift scenarios (GeneratorConfig.drift_at): lasting changes, labelled as change points.
CHANGE_KIND = "level_shift"
DRIFT_SCENARIOS: tuple[str, ...] = ("price_change", "new_store", "new_product", "store_format")
_PRICE_CHANGE_PRODUCTS = 3  # the best-selling products are re-priced ...
_PRICE_CHANGE_FACTOR = 2.5  # ... at 2.5x their old price, for good
_NEW_STORE_FACTOR = 30.0  # a new store's baskets: quantity and amount x30
_NEW_STORE_SHARE = 0.3  # it copies this share of the USD stores' normal sales of unchanged keys (~1 in 10 of all)
_NEW_PRODUCT_FACTOR = 10.0  # a new product priced at 10x the dearest catalogue price ...
_NEW_PRODUCT_SHARE = 1 / 50  # ... replaces this share of the normal sales
_FORMAT_FACTOR = 3.0  # the busiest store changes format: quantity and amount x3


@dataclass(frozen=True)
class GeneratorConfig:
    seed: int = 0
    anomaly_rate: float = 0.01  # labelled fraction of emitted events (store stops excluded)
    n_stores: int = 24
    n_products: int = 500
    events_per_day: int = 40_000  # all stores together, averaged over a week
    start: datetime = datetime(2026, 1, 5, tzinfo=UTC)  # naive means UTC
    # Drift scenarios (DRIFT_SCENARIOS) from the event at this position on; None: no drift.
    drift_at: int | None = None

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0.0 <= self.anomaly_rate <= 0.5:
            raise ValueError(f"anomaly_rate must be in [0, 0.5], got {self.anomaly_rate}")
        for name in ("n_stores", "n_products", "events_per_day"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.drift_at is not None and self.drift_at < 0:
            raise ValueError(f"drift_at must be >= 0, got {self.drift_at}")


@dataclass(frozen=True)
class Label:
    kind: str
    event_id: str | None = None
    store_id: str | None = None
    start: str | None = None  # ISO-8601 UTC, for window and change labels
    end: str | None = None
    # Change labels (kind CHANGE_KIND): the events whose ``key_set`` field equals ``key`` from
    # ``start`` on are changed for good; ``feature`` moved by ``factor`` (see DRIFT_SCENARIOS).
    scenario: str | None = None
    key_set: str | None = None
    key: str | None = None
    feature: str | None = None
    factor: float | None = None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class _Rows:
    """Events as parallel columns, one entry per event."""

    t: np.ndarray  # int64 epoch ms
    store: np.ndarray  # store index
    product: np.ndarray  # product index
    channel: np.ndarray  # index into CHANNELS
    quantity: np.ndarray  # int64
    unit_price: np.ndarray  # float64, 2 dp
    amount: np.ndarray  # float64, 2 dp
    customer: np.ndarray  # customer index, -1 = anonymous
    kind: np.ndarray  # int8 kind code

    def __len__(self) -> int:
        return int(self.t.size)

    def take(self, idx: Any) -> _Rows:
        return _Rows(*(getattr(self, f.name)[idx] for f in fields(self)))

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        return _Rows(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(_Rows)))


@dataclass(frozen=True)
class _Stop:
    store: int
    start_min: int  # simulated minutes since config.start
    end_min: int


@dataclass(frozen=True)
class _Promo:
    product: int
    start_ms: int
    end_ms: int
    discount: float
    boost: float  # volume multiplier while the promotion runs


class SalesGenerator:
    """Synthetic sales events; see ``generate``."""

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.window_labels: list[Label] = []
        self.change_labels: list[Label] = []  # filled when the drift starts (drift_at)
        start = config.start if config.start.tzinfo else config.start.replace(tzinfo=UTC)
        self._t0_ms = int(start.timestamp() * 1000)
        world = np.random.default_rng([config.seed, 0])
        self._build_stores(world)
        self._build_products(world)
        n_customers = min(max(1_000, config.events_per_day // 2), 200_000)
        self._customer_ids = np.array([f"c-{i:06d}" for i in range(n_customers)] + [None], dtype=object)
        # Per-base-event probability of each event kind: mutations replace a normal sale, while
        # duplicates and bursts add events, so scale up to hit anomaly_rate of *emitted* events.
        r = config.anomaly_rate / 5
        self._p_kind = r / (1 - 2 * r)
        self._stops: list[_Stop] = []
        self._promos: list[_Promo] = []
        self._planned_days = 0
        self._drift_ms: int | None = None  # event time from which the drift applies
        if config.drift_at is not None:
            self._build_drift()

    # ----- world -----

    def _build_stores(self, world: np.random.Generator) -> None:
        n = self.config.n_stores
        self._store_ids = np.array([f"s-{i:03d}" for i in range(n)], dtype=object)
        currency = np.zeros(n, dtype=np.int64)
        order = world.permutation(n)
        n_eur, n_gbp = round(0.2 * n), round(0.1 * n)
        currency[order[:n_eur]] = 1
        currency[order[n_eur : n_eur + n_gbp]] = 2
        self._store_currency = currency
        self._currency_names = np.array(CURRENCIES, dtype=object)[currency]

        size = world.lognormal(0.0, 0.6, n)
        in_store = world.uniform(0.55, 0.8, n)
        share = np.stack([in_store, (1 - in_store) * 0.65, (1 - in_store) * 0.35], axis=1)
        shift = world.uniform(-1.0, 1.0, n)  # hours: stores open and peak a bit earlier or later
        weekend = world.uniform(0.6, 1.4, n)  # how strongly the weekly pattern applies

        minute = np.arange(_WEEK_MIN)
        hours = (minute % _DAY_MIN) / 60 + shift[:, None]
        dow = minute // _DAY_MIN
        rates = np.empty((n, len(CHANNELS), _WEEK_MIN))
        for c in range(len(CHANNELS)):
            daily = _daily_profile(hours, in_store=c == 0)
            weekly = 1 + weekend[:, None] * (_WEEKLY[c][dow] - 1)
            rates[:, c] = size[:, None] * share[:, c, None] * daily * weekly
        rates *= self.config.events_per_day * 7 / rates.sum()
        self._rates = rates  # expected events per minute: (store, channel, minute of week)
        self._store_rates = rates.sum(axis=1)

    def _build_products(self, world: np.random.Generator) -> None:
        n = self.config.n_products
        self._product_ids = np.array([f"p-{i:04d}" for i in range(n)], dtype=object)
        usd = np.exp(world.normal(np.log(30), 1.3, n)).clip(0.8, 2500)
        self._prices = np.stack([_shelf_price(usd * fx) for fx in _FX])  # (currency, product)
        # Zipf popularity, with cheaper products tending to rank higher.
        rank = np.argsort(np.argsort(np.log(usd) + world.normal(0, 1.5, n)))
        popularity = 1 / (rank + 1.0) ** 1.1
        self._popularity = popularity / popularity.sum()
        self._popularity_cdf = np.cumsum(self._popularity)
        promo_weight = np.sqrt(self._popularity)
        self._promo_weights = promo_weight / promo_weight.sum()
        # Chance a line is a single item: cheap items are bought several at a time.
        self._single_prob = np.clip(0.5 + 0.12 * np.log10(usd), 0.5, 0.92)

    def _build_drift(self) -> None:
        """The keys the drift scenarios change; new keys get the next store and product index."""
        n_stores, n_products = self.config.n_stores, self.config.n_products
        self._repriced = np.argsort(-self._popularity, kind="stable")[: min(_PRICE_CHANGE_PRODUCTS, n_products)]
        self._new_store, self._new_product = n_stores, n_products
        self._format_store = int(np.argmax(self._store_rates.sum(axis=1)))
        self._store_ids = np.append(self._store_ids, f"s-{n_stores:03d}")
        self._store_currency = np.append(self._store_currency, 0)  # the new store sells in USD
        self._currency_names = np.append(self._currency_names, CURRENCIES[0])
        self._product_ids = np.append(self._product_ids, f"p-{n_products:04d}")
        dearest = self._prices.max(axis=1, keepdims=True)
        self._prices = np.hstack([self._prices, _shelf_price(dearest * _NEW_PRODUCT_FACTOR)])

    # ----- plans per simulated day -----

    def _plan_until(self, day: int) -> None:
        while self._planned_days <= day:
            rng = np.random.default_rng([self.config.seed, 1, self._planned_days])
            self._plan_stop(rng, self._planned_days)
            self._plan_promotions(rng, self._planned_days)
            self._planned_days += 1

    def _plan_stop(self, rng: np.random.Generator, day: int) -> None:
        """One store stop per day, in a window where the store is busy enough to notice it."""
        duration = int(rng.integers(60, 241))
        first = day * _DAY_MIN
        rate = self._store_rates[:, self._week_minute(np.arange(first, first + _DAY_MIN + duration - 1))]
        ok = sliding_window_view(rate, duration, axis=1).min(axis=2) >= _MIN_STOP_RATE
        for stop in self._stops:  # a stop spilling over from yesterday must not overlap
            lo = max(stop.start_min - duration + 1 - first, 0)
            ok[stop.store, lo : max(stop.end_min - first, 0)] = False
        candidates = np.flatnonzero(ok)
        if candidates.size == 0:
            return
        store, offset = divmod(int(candidates[rng.integers(candidates.size)]), _DAY_MIN)
        self._stops.append(_Stop(store, first + offset, first + offset + duration))

    def _plan_promotions(self, rng: np.random.Generator, day: int) -> None:
        n = min(int(rng.poisson(max(1.0, 0.01 * self.config.n_products))), self.config.n_products)
        products = rng.choice(self.config.n_products, size=n, replace=False, p=self._promo_weights)
        for product in products:
            start = self._t0_ms + (day * _DAY_MIN + int(rng.integers(0, _DAY_MIN))) * _MINUTE_MS
            hours = int(rng.integers(6, 49))
            end = start + hours * 3_600_000
            self._promos.append(_Promo(int(product), start, end, rng.uniform(0.1, 0.3), rng.uniform(2, 5)))

    def _week_minute(self, minutes: np.ndarray) -> np.ndarray:
        return (self._t0_ms // _MINUTE_MS + minutes + _THURSDAY) % _WEEK_MIN

    def _stopped(self, store: int, start_ms: int, end_ms: int) -> bool:
        return any(s.store == store and self._ms(s.start_min) < end_ms and start_ms < self._ms(s.end_min) for s in self._stops)

    def _ms(self, minute: int) -> int:
        return self._t0_ms + minute * _MINUTE_MS

    def _promos_between(self, start_ms: int, end_ms: int) -> list[_Promo]:
        return [p for p in self._promos if p.start_ms < end_ms and start_ms < p.end_ms]

    # ----- one simulated hour -----

    def _chunk(self, index: int, carry: _Rows | None) -> tuple[_Rows, _Rows]:
        """Events of simulated minutes [index*60, index*60+60) in time order, and the rows
        (parts of refund bursts) that fall after that hour and belong to the next one."""
        rng = np.random.default_rng([self.config.seed, 2, index])
        m0 = index * _CHUNK_MIN
        self._plan_until(m0 // _DAY_MIN + 1)  # a day ahead, so bursts can avoid tomorrow's stops
        t, store, channel = self._arrivals(rng, m0)
        product = self._draw_products(rng, t.size)
        self._promote(rng, t, product)
        sales = self._sales(rng, t, store, channel, product)
        parts = [sales, *self._inject(rng, sales)]
        if carry is not None:
            parts.insert(0, carry)
        rows = _Rows.concat(parts)
        # Stable sort: a duplicate lands right after its original (same timestamp).
        rows = rows.take(np.argsort(rows.t, kind="stable"))
        cut = int(np.searchsorted(rows.t, self._ms(m0 + _CHUNK_MIN)))
        return rows.take(slice(0, cut)), rows.take(slice(cut, None))

    def _arrivals(self, rng: np.random.Generator, m0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lam = self._rates[:, :, self._week_minute(np.arange(m0, m0 + _CHUNK_MIN))]
        for stop in self._stops:
            lo, hi = max(stop.start_min - m0, 0), min(stop.end_min - m0, _CHUNK_MIN)
            if lo < hi:
                lam[stop.store, :, lo:hi] = 0.0
        counts = rng.poisson(lam).ravel()
        cell = np.repeat(np.arange(counts.size), counts)
        store, channel, minute = np.unravel_index(cell, lam.shape)
        t = self._ms(m0) + minute * _MINUTE_MS + rng.integers(0, _MINUTE_MS, cell.size)
        order = np.argsort(t, kind="stable")
        return t[order], store[order], channel[order]

    def _draw_products(self, rng: np.random.Generator, n: int) -> np.ndarray:
        idx = np.searchsorted(self._popularity_cdf, rng.random(n) * self._popularity_cdf[-1], side="right")
        return np.minimum(idx, self.config.n_products - 1)

    def _promote(self, rng: np.random.Generator, t: np.ndarray, product: np.ndarray) -> None:
        """Lift a promoted product's volume by turning some sales in its window into it."""
        if t.size == 0:
            return
        for promo in self._promos_between(int(t[0]), int(t[-1]) + 1):
            in_window = np.flatnonzero((t >= promo.start_ms) & (t < promo.end_ms))
            extra = int(rng.poisson((promo.boost - 1) * self._popularity[promo.product] * in_window.size))
            if extra:
                product[rng.choice(in_window, size=min(extra, in_window.size), replace=False)] = promo.product

    def _promo_discount(self, t: np.ndarray, product: np.ndarray) -> np.ndarray:
        discount = np.zeros(t.size)
        if t.size:
            for promo in self._promos_between(int(t.min()), int(t.max()) + 1):
                on_promo = (product == promo.product) & (t >= promo.start_ms) & (t < promo.end_ms)
                discount[on_promo] = promo.discount
        return discount

    def _sales(
        self,
        rng: np.random.Generator,
        t: np.ndarray,
        store: np.ndarray,
        channel: np.ndarray,
        product: np.ndarray,
    ) -> _Rows:
        n = t.size
        list_price = self._prices[self._store_currency[store], product]
        unit_price = np.maximum(np.round(list_price * (1 - self._promo_discount(t, product)), 2), 0.01)
        quantity = rng.geometric(self._single_prob[product]).astype(np.int64)
        line_discount = np.where(rng.random(n) < 0.08, rng.choice([0.05, 0.10], n), 0.0)
        amount = np.round(quantity * unit_price * (1 - line_discount), 2)
        known = rng.random(n) < _CUSTOMER_SHARE[channel]
        customer = np.where(known, rng.integers(0, len(self._customer_ids) - 1, n), -1)
        kind = np.zeros(n, dtype=np.int8)
        return _Rows(t, store, product, channel, quantity, unit_price, amount, customer, kind)

    # ----- anomalies -----

    def _inject(self, rng: np.random.Generator, sales: _Rows) -> list[_Rows]:
        """Mutate some sales in place; return the added rows (duplicates, refund bursts)."""
        p = self._p_kind
        band = np.searchsorted(np.cumsum([p, p, p, p, p / _MEAN_BURST]), rng.random(len(sales)), side="right")
        _price_spike(rng, sales, np.flatnonzero(band == 0))
        _quantity_burst(rng, sales, np.flatnonzero(band == 1))
        _decimal_error(rng, sales, np.flatnonzero(band == 2))
        duplicates = sales.take(np.flatnonzero(band == 3))
        duplicates.kind[:] = _DUPLICATE
        return [duplicates, self._refund_bursts(rng, sales, np.flatnonzero(band == 4))]

    def _refund_bursts(self, rng: np.random.Generator, sales: _Rows, triggers: np.ndarray) -> _Rows:
        """5-15 refunds (or zero amounts) from the trigger sale's store within a few minutes."""
        times, stores, refund = [], [], []
        for i in triggers:
            store, start = int(sales.store[i]), int(sales.t[i])
            size, span = int(rng.integers(5, 16)), int(rng.integers(60_000, 300_001))
            is_refund = rng.random() < 0.7
            if self._stopped(store, start, start + span):
                continue
            times.append(start + np.sort(rng.integers(0, span, size)))
            stores.append(np.full(size, store))
            refund.append(np.full(size, is_refund))
        if not times:
            return sales.take(slice(0, 0))
        t, burst_stores = np.concatenate(times), np.concatenate(stores)
        burst = self._sales(rng, t, burst_stores, np.zeros(t.size, dtype=np.int64), self._draw_products(rng, t.size))
        burst.amount = np.where(np.concatenate(refund), -burst.amount, 0.0)
        burst.kind[:] = _REFUND_BURST
        return burst

    # ----- output -----

    def generate(self, count: int) -> Iterator[tuple[dict, Label | None]]:
        """Yield exactly ``count`` ``(event, label)`` pairs in timestamp order; label is None for
        normal events. Once exhausted, ``window_labels`` holds the store_stopped windows that
        start before the last event (their end clipped to it)."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self.window_labels = []
        self.change_labels = []
        self._drift_ms = None
        return self._run(count)

    def _run(self, count: int) -> Iterator[tuple[dict, Label | None]]:
        emitted, index, carry = 0, 0, None
        last_ms = self._t0_ms
        drift_at = self.config.drift_at
        while emitted < count:
            rows, carry = self._chunk(index, carry)
            if drift_at is not None:
                if self._drift_ms is None and emitted + len(rows) > drift_at:
                    self._start_drift(int(rows.t[max(drift_at - emitted, 0)]))
                if self._drift_ms is not None:
                    rows = self._drift(np.random.default_rng([self.config.seed, 3, index]), rows)
            index += 1
            n = min(len(rows), count - emitted)
            if n:
                yield from self._events(rows.take(slice(0, n)), emitted)
                emitted += n
                last_ms = int(rows.t[n - 1])
        self.window_labels = self._window_labels(last_ms)

    # ----- drift -----

    def _start_drift(self, start_ms: int) -> None:
        self._drift_ms = start_ms
        start = _iso_one(start_ms)

        def change(scenario: str, key_set: str, key: str, feature: str, factor: float) -> Label:
            return Label(CHANGE_KIND, start=start, scenario=scenario, key_set=key_set, key=key, feature=feature, factor=factor)

        self.change_labels = [
            *(change("price_change", "product_id", self._product_ids[p], "unit_price", _PRICE_CHANGE_FACTOR) for p in self._repriced),
            change("new_store", "store_id", self._store_ids[self._new_store], "amount", _NEW_STORE_FACTOR),
            change("new_product", "product_id", self._product_ids[self._new_product], "unit_price", _NEW_PRODUCT_FACTOR),
            change("store_format", "store_id", self._store_ids[self._format_store], "amount", _FORMAT_FACTOR),
        ]

    def _drift(self, rng: np.random.Generator, rows: _Rows) -> _Rows:
        """Apply the drift scenarios to the rows at or after the drift start (in place, plus the
        new store's copies, each right after its original)."""
        after = rows.t >= (self._drift_ms or 0)
        normal = after & (rows.kind == 0)
        # A new product, priced at another scale, replaces some normal sales.
        new = np.flatnonzero(normal & (rng.random(len(rows)) < _NEW_PRODUCT_SHARE))
        rows.product[new] = self._new_product
        rows.unit_price[new] = self._prices[self._store_currency[rows.store[new]], self._new_product]
        rows.quantity[new] = rng.geometric(0.9, new.size)
        rows.amount[new] = np.round(rows.quantity[new] * rows.unit_price[new], 2)
        # The best sellers cost 2.5x from now on (their injected anomalies too).
        repriced = np.flatnonzero(after & np.isin(rows.product, self._repriced))
        rows.unit_price[repriced] = np.round(rows.unit_price[repriced] * _PRICE_CHANGE_FACTOR, 2)
        rows.amount[repriced] = np.round(rows.amount[repriced] * _PRICE_CHANGE_FACTOR, 2)
        # The busiest store changes format: three times the basket.
        bigger = np.flatnonzero(after & (rows.store == self._format_store))
        rows.quantity[bigger] = rows.quantity[bigger] * int(_FORMAT_FACTOR)
        rows.amount[bigger] = np.round(rows.amount[bigger] * _FORMAT_FACTOR, 2)
        # A new store opens: anonymous copies of some USD stores' sales of unchanged keys, x30.
        unchanged = normal & (rows.store != self._format_store) & ~np.isin(rows.product, [*self._repriced, self._new_product])
        source = unchanged & (self._store_currency[rows.store] == 0) & (rng.random(len(rows)) < _NEW_STORE_SHARE)
        order = np.repeat(np.arange(len(rows)), 1 + source)
        rows = rows.take(order)
        copy = np.r_[False, order[1:] == order[:-1]]
        rows.store[copy] = self._new_store
        rows.channel[copy] = 0
        rows.customer[copy] = -1
        rows.quantity[copy] = rows.quantity[copy] * int(_NEW_STORE_FACTOR)
        rows.amount[copy] = np.round(rows.amount[copy] * _NEW_STORE_FACTOR, 2)
        return rows

    def _events(self, rows: _Rows, first_seq: int) -> Iterator[tuple[dict, Label | None]]:
        # Map index columns to strings with numpy object arrays: per-event work stays a dict build.
        columns = (
            _iso(rows.t),
            self._store_ids[rows.store].tolist(),
            self._product_ids[rows.product].tolist(),
            rows.quantity.tolist(),
            rows.unit_price.tolist(),
            rows.amount.tolist(),
            self._currency_names[rows.store].tolist(),
            _CHANNEL_NAMES[rows.channel].tolist(),
            self._customer_ids[rows.customer].tolist(),  # index -1 is the None at the end
            rows.kind.tolist(),
        )
        prefix = f"e-{self.config.seed}-"
        for seq, (ts, store, product, q, price, amount, currency, channel, customer, kind) in enumerate(zip(*columns, strict=True), first_seq):
            event_id = f"{prefix}{seq}"
            event = {
                "event_id": event_id,
                "timestamp": ts,
                "store_id": store,
                "product_id": product,
                "quantity": q,
                "unit_price": price,
                "amount": amount,
                "currency": currency,
                "channel": channel,
            }
            if customer is not None:
                event["customer_id"] = customer
            yield event, (Label(ANOMALY_KINDS[kind - 1], event_id=event_id) if kind else None)

    def _window_labels(self, last_ms: int) -> list[Label]:
        labels = []
        for stop in sorted(self._stops, key=lambda s: s.start_min):
            start, end = self._ms(stop.start_min), min(self._ms(stop.end_min), last_ms)
            if start < last_ms:
                store_id = self._store_ids[stop.store]
                window = Label("store_stopped", store_id=store_id, start=_iso_one(start), end=_iso_one(end))
                labels.append(window)
        return labels


def _bump(hours: np.ndarray, peak: float, width: float) -> np.ndarray:
    d = (hours - peak + 12) % 24 - 12  # circular distance in hours
    return np.exp(-0.5 * (d / width) ** 2)


def _daily_profile(hours: np.ndarray, in_store: bool) -> np.ndarray:
    """Relative sales rate by hour of day (UTC)."""
    if in_store:  # near-empty at night; peaks late morning and early evening
        return 0.02 + _bump(hours, 11.5, 1.8) + 0.5 * _bump(hours, 14.5, 2.5) + 1.2 * _bump(hours, 18.0, 1.6)
    return 0.3 + 0.4 * _bump(hours, 13.0, 4.0) + 0.6 * _bump(hours, 20.5, 2.5)  # flatter, evening peak


def _shelf_price(price: np.ndarray) -> np.ndarray:
    """Retail-looking prices: x.99 above 5, plain cents below."""
    return np.where(price >= 5, np.floor(price) + 0.99, np.maximum(np.round(price, 2), 0.5))


def _price_spike(rng: np.random.Generator, rows: _Rows, idx: np.ndarray) -> None:
    rows.unit_price[idx] = np.round(rows.unit_price[idx] * rng.uniform(5, 20, idx.size), 2)
    rows.amount[idx] = np.round(rows.quantity[idx] * rows.unit_price[idx], 2)
    rows.kind[idx] = _PRICE_SPIKE


def _quantity_burst(rng: np.random.Generator, rows: _Rows, idx: np.ndarray) -> None:
    rows.quantity[idx] *= rng.integers(10, 51, idx.size)
    rows.amount[idx] = np.round(rows.quantity[idx] * rows.unit_price[idx], 2)
    rows.kind[idx] = _QUANTITY_BURST


def _decimal_error(rng: np.random.Generator, rows: _Rows, idx: np.ndarray) -> None:
    """Amount shifted by a misplaced decimal point or keyed in the wrong (JPY-like) currency."""
    factor = rng.choice([100.0, 0.01, 0.008], idx.size)
    rows.amount[idx] = np.maximum(np.round(rows.amount[idx] * factor, 2), 0.01)
    rows.kind[idx] = _DECIMAL_ERROR


def _iso(ms: np.ndarray) -> list[str]:
    return np.datetime_as_string(ms.astype("datetime64[ms]"), unit="ms", timezone="UTC").tolist()


def _iso_one(ms: int) -> str:
    return _iso(np.array([ms], dtype=np.int64))[0]


# ----- sinks -----


def write_jsonl(events_iter: Iterable[dict], out: IO[str] | IO[bytes]) -> int:
    """Write events as JSON lines (text or binary stream); returns the number written."""
    text = isinstance(out, io.TextIOBase)
    written, batch = 0, []
    for event in events_iter:
        batch.append(orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE))
        if len(batch) == 4096:  # few large writes instead of one per event
            written += _write_batch(out, batch, text)
    return written + _write_batch(out, batch, text)


def _write_batch(out: IO[Any], batch: list[bytes], text: bool) -> int:
    data = b"".join(batch)
    out.write(data.decode() if text else data)
    n = len(batch)
    batch.clear()
    return n


def write_labels(labels: Iterable[Label], path: str | os.PathLike[str]) -> int:
    """Write labels as JSON lines of ``Label.to_dict()``; returns the number written."""
    with open(path, "wb") as out:
        return write_jsonl((label.to_dict() for label in labels), out)


class ProduceError(DeliveryError, RuntimeError):
    """Records were not delivered. A RuntimeError too, for callers that catch that."""


def produce_to_kafka(
    events: Iterable[dict],
    bootstrap_servers: str,
    topic: str,
    rate: float | None = None,
    client_config: dict | None = None,
    log: logging.Logger | None = None,
    flush_timeout: float = 120.0,
) -> int:
    """Produce events keyed by store_id, optionally paced to ``rate`` events/s; returns the
    number delivered. Raises ProduceError if any record failed or is still pending after
    ``flush_timeout`` seconds of flushing."""
    log = log or logger
    producer = _make_producer(bootstrap_servers, client_config or {}, log)
    delivered, failed, first_error = 0, 0, None

    def on_delivery(err: Any, _msg: Any) -> None:
        nonlocal delivered, failed, first_error
        if err is None:
            delivered += 1
        else:
            failed += 1
            first_error = first_error or err

    bucket = _TokenBucket(rate, producer.poll) if rate else None
    for i, event in enumerate(events):
        if bucket:
            bucket.take()
        _produce(producer, topic, event["store_id"].encode(), orjson.dumps(event), on_delivery, log)
        if i % 1000 == 0:
            producer.poll(0)
    pending = _flush(producer, flush_timeout, log)
    if failed or pending:
        raise ProduceError(
            f"{failed} records failed and {pending} still pending after flush (first error: {first_error})",
            first_error,
        )
    return delivered


def _make_producer(bootstrap_servers: str, client_config: dict, log: logging.Logger) -> Any:
    from confluent_kafka import KafkaException, Producer

    config = {
        "bootstrap.servers": bootstrap_servers,
        "enable.idempotence": True,
        "linger.ms": 20,
        "compression.type": "lz4",
        "message.timeout.ms": 60_000,  # with the broker down, records fail within a minute
        **client_config,
    }
    try:
        return Producer(config)
    except KafkaException:
        if config["compression.type"] != "lz4":
            raise
        log.warning("lz4 compression unavailable in librdkafka; producing uncompressed")
        return Producer({**config, "compression.type": "none"})


def _produce(producer: Any, topic: str, key: bytes, value: bytes, on_delivery: Callable, log: logging.Logger) -> None:
    waited_since = None
    while True:
        try:
            producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
            return
        except BufferError:  # local queue full: serve delivery reports to make room
            now = time.monotonic()
            if waited_since is None:
                waited_since = now
            elif now - waited_since > 5:
                log.warning("producer queue full for %.0fs; is the broker reachable?", now - waited_since)
                waited_since = now
            producer.poll(0.1)


def _flush(producer: Any, timeout: float, log: logging.Logger) -> int:
    """Flush in slices so a down broker is logged and cannot block forever; returns records left."""
    deadline = time.monotonic() + timeout
    while True:
        pending = producer.flush(max(0.0, min(5.0, deadline - time.monotonic())))
        if pending == 0 or time.monotonic() >= deadline:
            return pending
        log.warning("flush: %d records still pending", pending)


class _TokenBucket:
    """Paces takes to ``rate``/s. Waits in slices of at least 5 ms (refilling many tokens at a
    time) through ``wait``, so the producer keeps serving delivery reports while paced."""

    def __init__(self, rate: float, wait: Callable[[float], Any]) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate * 0.05)
        self.tokens = 1.0
        self.last = time.monotonic()
        self.wait = wait

    def take(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            self.wait(max(0.005, (1 - self.tokens) / self.rate))
