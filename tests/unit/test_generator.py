"""Synthetic sales stream: determinism, schema, realism and labelled anomalies (no broker)."""

from __future__ import annotations

import io
import re
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta

import orjson
import pytest

from stream_detector import generator as gen_mod
from stream_detector.generator import (
    ANOMALY_KINDS,
    GeneratorConfig,
    Label,
    SalesGenerator,
    produce_to_kafka,
    write_jsonl,
    write_labels,
)

EVENT_KINDS = set(ANOMALY_KINDS) - {"store_stopped"}
REQUIRED = {
    "event_id": str,
    "timestamp": str,
    "store_id": str,
    "product_id": str,
    "quantity": int,
    "unit_price": float,
    "amount": float,
    "currency": str,
    "channel": str,
}
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def run():
    """50,000 events at anomaly_rate=0.02 (about 1.2 simulated days)."""
    generator = SalesGenerator(GeneratorConfig(seed=7, anomaly_rate=0.02))
    pairs = list(generator.generate(50_000))
    return [e for e, _ in pairs], [lab for _, lab in pairs], generator.window_labels


def _dump(generator: SalesGenerator, count: int) -> bytes:
    return b"".join(orjson.dumps([e, lab.to_dict() if lab else None]) for e, lab in generator.generate(count))


def test_same_seed_same_bytes_and_different_seed_differs():
    a = _dump(SalesGenerator(GeneratorConfig(seed=3)), 5_000)
    assert a == _dump(SalesGenerator(GeneratorConfig(seed=3)), 5_000)
    assert a != _dump(SalesGenerator(GeneratorConfig(seed=4)), 5_000)


def test_shorter_run_is_prefix_of_longer_run():
    short = _dump(SalesGenerator(GeneratorConfig(seed=5)), 2_000)
    assert _dump(SalesGenerator(GeneratorConfig(seed=5)), 6_000).startswith(short)


@pytest.mark.parametrize("count", [0, 1, 1_234])
def test_count_is_exact(count):
    assert sum(1 for _ in SalesGenerator(GeneratorConfig()).generate(count)) == count


def test_fields_types_and_format(run):
    events, _, _ = run
    for e in events:
        for name, typ in REQUIRED.items():
            assert type(e[name]) is typ, (name, e)
        assert set(e) - set(REQUIRED) <= {"customer_id"}
        assert TS_RE.match(e["timestamp"])
        assert re.fullmatch(r"s-\d{3}", e["store_id"]) and re.fullmatch(r"p-\d{4}", e["product_id"])
        assert e["quantity"] >= 1
        assert round(e["unit_price"], 2) == e["unit_price"] and round(e["amount"], 2) == e["amount"]
        assert e["currency"] in {"USD", "EUR", "GBP"} and e["channel"] in {"store", "online", "mobile"}
    assert len({e["event_id"] for e in events}) == len(events)
    assert 0.65 < sum("customer_id" in e for e in events) / len(events) < 0.75
    currencies = Counter(e["currency"] for e in events)
    assert currencies.most_common(1)[0][0] == "USD" and len(currencies) == 3
    # a store always uses one currency
    assert all(len(c) == 1 for c in _group(events, "store_id", "currency").values())


def _group(events, key, value):
    groups = defaultdict(set)
    for e in events:
        groups[e[key]].add(e[value])
    return groups


def test_timestamps_non_decreasing_from_start(run):
    events, _, _ = run
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps)  # same fixed-width format: string order is time order
    assert stamps[0] >= "2026-01-05T00:00:00.000Z"
    assert timedelta(days=1) < _parse(stamps[-1]) - _parse(stamps[0]) < timedelta(days=2)


def test_normal_sales_are_consistent(run):
    events, labels, _ = run
    for e, lab in zip(events, labels, strict=True):
        if lab is None:
            gross = e["quantity"] * e["unit_price"]
            assert 0.89 * gross - 0.01 <= e["amount"] <= gross + 0.01, e


def test_labelled_fraction_and_kinds(run):
    events, labels, windows = run
    kinds = Counter(lab.kind for lab in labels if lab is not None)
    assert set(kinds) == EVENT_KINDS
    assert 0.015 < sum(kinds.values()) / len(events) < 0.025
    for kind in EVENT_KINDS:  # roughly equal shares
        assert 0.1 < kinds[kind] / sum(kinds.values()) < 0.3, kinds
    assert windows and {w.kind for w in windows} == {"store_stopped"}


def test_labels_point_at_their_own_unique_events(run):
    events, labels, _ = run
    labelled = [lab.event_id for lab in labels if lab is not None]
    assert len(labelled) == len(set(labelled))
    for e, lab in zip(events, labels, strict=True):
        if lab is not None:
            assert lab.event_id == e["event_id"]


def test_labels_not_in_events(run):
    events, _, _ = run
    kinds = set(ANOMALY_KINDS)
    for e in events:
        assert not kinds & set(e) and not kinds & {v for v in e.values() if isinstance(v, str)}


def test_duplicates_copy_an_earlier_normal_event(run):
    events, labels, _ = run
    seen: dict[bytes, int] = {}
    for i, (e, lab) in enumerate(zip(events, labels, strict=True)):
        key = orjson.dumps({k: v for k, v in e.items() if k != "event_id"}, option=orjson.OPT_SORT_KEYS)
        if lab is not None and lab.kind == "duplicate":
            assert key in seen, e
            original = seen[key]
            assert labels[original] is None and events[original]["event_id"] != e["event_id"]
            assert _parse(e["timestamp"]) == _parse(events[original]["timestamp"])
        else:
            seen.setdefault(key, i)


def test_anomaly_shapes(run):
    events, labels, _ = run
    normal_price = {}
    for e, lab in zip(events, labels, strict=True):
        if lab is None:
            key = (e["product_id"], e["currency"])
            normal_price[key] = max(normal_price.get(key, 0.0), e["unit_price"])
    for e, lab in zip(events, labels, strict=True):
        kind = lab.kind if lab else None
        if kind == "price_spike":
            assert e["unit_price"] >= 3 * normal_price.get((e["product_id"], e["currency"]), 0.0)
            assert e["amount"] == pytest.approx(e["quantity"] * e["unit_price"], abs=0.01)
        elif kind == "quantity_burst":
            assert e["quantity"] >= 10
            assert e["amount"] == pytest.approx(e["quantity"] * e["unit_price"], abs=0.01)
        elif kind == "decimal_error":
            ratio = e["amount"] / (e["quantity"] * e["unit_price"])
            assert ratio > 50 or ratio < 0.03
        elif kind == "refund_burst":
            assert e["amount"] <= 0
        else:
            assert e["amount"] > 0


def test_refund_bursts_cluster_by_store(run):
    events, labels, _ = run
    times = defaultdict(list)
    for e, lab in zip(events, labels, strict=True):
        if lab is not None and lab.kind == "refund_burst":
            times[e["store_id"]].append(_parse(e["timestamp"]))
    cut_off = _parse(events[-1]["timestamp"]) - timedelta(minutes=5)  # the count may cut a burst
    for store_times in times.values():
        for t in store_times:
            if t < cut_off:  # >= 4 siblings from its store within 5 minutes
                assert sum(abs(t - u) <= timedelta(minutes=5) for u in store_times) >= 5


def test_store_stopped_windows_are_silent_and_busy_around(run):
    events, _, windows = run
    for w in windows:
        start, end = _parse(w.start), _parse(w.end)
        assert timedelta(0) < end - start <= timedelta(hours=4)
        stamps = [_parse(e["timestamp"]) for e in events if e["store_id"] == w.store_id]
        assert not [t for t in stamps if start <= t < end]
        before = [t for t in stamps if start - timedelta(minutes=30) <= t < start]
        assert len(before) >= 15  # the store was busy, so the stop is detectable


def test_daily_seasonality(run):
    events, _, _ = run
    by_hour = Counter(int(e["timestamp"][11:13]) for e in events)
    night = sum(by_hour[h] for h in range(1, 5))
    midday = sum(by_hour[h] for h in range(10, 14))
    assert midday > 3 * night
    online = Counter(int(e["timestamp"][11:13]) for e in events if e["channel"] == "online")
    store = Counter(int(e["timestamp"][11:13]) for e in events if e["channel"] == "store")
    assert online[3] / online[11] > 2 * store[3] / store[11]  # online is flatter over the day


def test_weekly_seasonality_and_promotions():
    events = [e for e, _ in SalesGenerator(GeneratorConfig(seed=2, events_per_day=2_000)).generate(14_000)]
    by_day = Counter(_parse(e["timestamp"]).strftime("%a") for e in events)
    assert by_day["Sat"] > 1.15 * by_day["Tue"]
    prices = _group(events, "product_id", "unit_price")
    assert any(len(p) > 2 for p in prices.values())  # list price in 3 currencies plus promo prices


def test_config_validation():
    with pytest.raises(ValueError):
        GeneratorConfig(anomaly_rate=0.9)
    with pytest.raises(ValueError):
        GeneratorConfig(n_stores=0)
    with pytest.raises(ValueError):
        list(SalesGenerator(GeneratorConfig()).generate(-1))


def test_label_to_dict_omits_none():
    assert Label("duplicate", event_id="e-1").to_dict() == {"kind": "duplicate", "event_id": "e-1"}


def test_write_jsonl_text_and_binary_and_labels(tmp_path):
    generator = SalesGenerator(GeneratorConfig(seed=1))
    events = [e for e, _ in generator.generate(5_000)]
    binary, text = io.BytesIO(), io.StringIO()
    assert write_jsonl(iter(events), binary) == 5_000
    assert write_jsonl(iter(events), text) == 5_000
    assert text.getvalue().encode() == binary.getvalue()
    assert [orjson.loads(line) for line in binary.getvalue().splitlines()] == events
    path = tmp_path / "labels.jsonl"
    assert write_labels(generator.window_labels, path) == len(generator.window_labels)
    assert [orjson.loads(line) for line in path.read_bytes().splitlines()] == [w.to_dict() for w in generator.window_labels]


class FakeProducer:
    """Stands in for confluent_kafka.Producer: a full queue once, then deliveries on poll."""

    def __init__(self, config, fail_keys=()):
        self.config, self.fail_keys = config, set(fail_keys)
        self.sent, self.pending = [], []
        self.full_once = True

    def produce(self, topic, key, value, on_delivery):
        if self.full_once:
            self.full_once = False
            raise BufferError("queue full")
        self.sent.append((topic, key, value))
        self.pending.append((key, on_delivery))

    def poll(self, timeout=0):
        for key, callback in self.pending:
            callback("boom" if key in self.fail_keys else None, None)
        n = len(self.pending)
        self.pending = []
        return n

    def flush(self, timeout=None):
        self.poll()
        return 0


@pytest.fixture
def fake_producer(monkeypatch):
    made = []

    def make(bootstrap_servers, client_config, log, fail_keys=()):
        made.append(FakeProducer({"bootstrap.servers": bootstrap_servers, **client_config}, fail_keys))
        return made[-1]

    monkeypatch.setattr(gen_mod, "_make_producer", make)
    return made


def test_produce_keys_values_and_count(fake_producer):
    events = [e for e, _ in SalesGenerator(GeneratorConfig()).generate(300)]
    assert produce_to_kafka(events, "broker:9092", "sales") == 300
    sent = fake_producer[0].sent
    assert [k for _, k, _ in sent] == [e["store_id"].encode() for e in events]
    assert [orjson.loads(v) for _, _, v in sent] == events and {t for t, _, _ in sent} == {"sales"}


def test_produce_paces_to_rate(fake_producer):
    events = [e for e, _ in SalesGenerator(GeneratorConfig()).generate(200)]
    started = time.monotonic()
    produce_to_kafka(events, "broker:9092", "sales", rate=2_000)
    assert 0.08 < time.monotonic() - started < 1.0


def test_produce_raises_on_failed_delivery(monkeypatch):
    events = [e for e, _ in SalesGenerator(GeneratorConfig()).generate(100)]
    bad = events[10]["store_id"].encode()
    monkeypatch.setattr(gen_mod, "_make_producer", lambda b, c, log: FakeProducer({}, fail_keys={bad}))
    with pytest.raises(RuntimeError, match="failed"):
        produce_to_kafka(events, "broker:9092", "sales")


def test_produce_gives_up_when_broker_is_down():
    """Real librdkafka against a closed port: fails within the timeouts instead of hanging."""
    events = [e for e, _ in SalesGenerator(GeneratorConfig()).generate(20)]
    started = time.monotonic()
    with pytest.raises(RuntimeError):
        produce_to_kafka(
            events,
            "127.0.0.1:1",
            "sales",
            client_config={"message.timeout.ms": 500, "log_level": 0},
            flush_timeout=5,
        )
    assert time.monotonic() - started < 6


# ----- drift scenarios (issue 18's measurement harness) -----


@pytest.fixture(scope="module")
def drifted():
    generator = SalesGenerator(GeneratorConfig(seed=5, drift_at=4_000))
    events = [e for e, _ in generator.generate(9_000)]
    return generator, events, [c.to_dict() for c in generator.change_labels]


def test_drift_is_off_by_default_and_changes_nothing_before_its_start(drifted):
    generator, events, changes = drifted
    plain = SalesGenerator(GeneratorConfig(seed=5))
    before = [e for e, _ in plain.generate(9_000)]
    assert plain.change_labels == []
    assert len(events) == 9_000
    start = changes[0]["start"]
    assert events[4_000]["timestamp"] == start
    unchanged = [e for e in events if e["timestamp"] < start]
    assert len(unchanged) >= 3_990 and unchanged == before[: len(unchanged)]
    assert before[4_000:] != events[4_000:]
    # A drift start past the end changes nothing and labels nothing.
    late = SalesGenerator(GeneratorConfig(seed=5, drift_at=50_000))
    assert [e for e, _ in late.generate(3_000)] == before[:3_000]
    assert late.change_labels == []
    with pytest.raises(ValueError, match="drift_at"):
        GeneratorConfig(drift_at=-1)


def test_drift_labels_are_change_points(drifted):
    _, events, changes = drifted
    assert [c["scenario"] for c in changes] == ["price_change"] * 3 + ["new_store", "new_product", "store_format"]
    assert {c["kind"] for c in changes} == {"level_shift"}
    assert all(c["start"] == changes[0]["start"] and "event_id" not in c for c in changes)
    assert [c["factor"] for c in changes] == [2.5, 2.5, 2.5, 30.0, 10.0, 3.0]
    # The re-priced products are the three best sellers before the change.
    start = changes[0]["start"]
    sold = Counter(e["product_id"] for e in events if e["timestamp"] < start)
    assert {c["key"] for c in changes[:3]} == {p for p, _ in sold.most_common(3)}


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def test_drift_scenarios_change_their_keys_for_good(drifted):
    _, events, changes = drifted
    start = changes[0]["start"]
    before = [e for e in events if e["timestamp"] < start]
    after = [e for e in events if e["timestamp"] >= start]
    by = {c["scenario"] if c["scenario"] != "price_change" else c["key"]: c for c in changes}
    for change in changes[:3]:  # x2.5 unit price, for good: the median USD price before and after
        price = [e["unit_price"] for e in before if e["product_id"] == change["key"] and e["currency"] == "USD"]
        later = [e["unit_price"] for e in after if e["product_id"] == change["key"] and e["currency"] == "USD"]
        assert later[-len(later) // 4 :]  # still at the new price at the end
        assert _median(later) / _median(price) == pytest.approx(2.5, rel=0.02)
    store = by["new_store"]["key"]
    assert store not in {e["store_id"] for e in before}
    new_store = [e for e in after if e["store_id"] == store]
    assert len(new_store) > 0.05 * len(after)
    assert all(e["quantity"] % 30 == 0 and e["currency"] == "USD" and "customer_id" not in e for e in new_store)
    product = by["new_product"]["key"]
    assert product not in {e["product_id"] for e in before}
    dearest = max(e["unit_price"] for e in before if e["currency"] == "USD")
    assert min(e["unit_price"] for e in after if e["product_id"] == product and e["currency"] == "USD") > 5 * dearest
    fmt_store = by["store_format"]["key"]
    changed = [e for e in after if e["store_id"] == fmt_store]
    assert changed and all(e["quantity"] % 3 == 0 for e in changed)
    assert any(e["quantity"] % 3 for e in before if e["store_id"] == fmt_store)


def test_drift_is_deterministic_and_writes_change_labels(tmp_path):
    a = SalesGenerator(GeneratorConfig(seed=2, drift_at=1_000))
    b = SalesGenerator(GeneratorConfig(seed=2, drift_at=1_000))
    assert [e for e, _ in a.generate(3_000)] == [e for e, _ in b.generate(3_000)]
    path = tmp_path / "labels.jsonl"
    write_labels(a.change_labels, path)
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert rows[0]["kind"] == "level_shift" and rows[0]["key_set"] == "product_id" and rows[0]["feature"] == "unit_price"
    # Labels without drift fields keep their old JSON form.
    assert Label("store_stopped", store_id="s-1", start="a", end="b").to_dict() == {"kind": "store_stopped", "store_id": "s-1", "start": "a", "end": "b"}
