"""Level shifts: the tracker's runs on hand-made z-scores, and recovery after a lasting change
through the pipeline (one shift, then the new level is normal), batch equal to smaller batches,
the state round trip, and an analyst's reject or accept."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import yaml

from stream_detector.config import load_settings
from stream_detector.errors import StateError
from stream_detector.events.decode import decode_batch
from stream_detector.features import FeatureBatch
from stream_detector.generator import GeneratorConfig, SalesGenerator
from stream_detector.records import level_shift_record
from stream_detector.scoring import level_shift
from stream_detector.scoring.calibration import Calibrator
from stream_detector.scoring.factory import build_pipeline, event_schema
from stream_detector.scoring.level_shift import LevelShiftTracker
from stream_detector.scoring.pipeline import BatchResult, ScoringPipeline
from stream_detector.state import codec

# -- the tracker alone -------------------------------------------------------------------------


def tracker(**kw) -> LevelShiftTracker:
    return LevelShiftTracker(key_sets={"store_id": ("log_amount",)}, features=("log_amount",), axis={"store_id": 0}, **kw)


def batch(keys: list[str], values: list[float]) -> FeatureBatch:
    n = len(keys)
    return FeatureBatch(
        event_time=np.arange(n, dtype=np.float64),
        columns={"log_amount": np.array(values, dtype=np.float64)},
        keys={"store_id": np.array(keys, dtype=object)},
        event_ids=np.array([f"e{i}" for i in range(n)], dtype=object),
    )


def zs(values: list[float]) -> np.ndarray:
    return np.array(values, dtype=np.float64).reshape(-1, 1, 1)


def test_a_run_of_lasting_deviating_events_declares_at_its_last_event():
    t = tracker(lasting=4)
    b = batch(["a", "b", "a", "a", "a", "a"], [5.0] * 6)
    scan = t.scan(b, zs([3.0, 9.0, 3.5, 4.0, 3.2, 3.1]), zs([2.0] * 6))
    assert scan.declared == 4 and scan.where == ("store_id", "a", "log_amount")
    assert scan.run is not None and scan.run.length == 4 and scan.run.began == 0.0
    assert ("store_id", "a", "log_amount") not in scan.runs  # the key starts afresh
    assert scan.runs[("store_id", "b", "log_amount")].length == 1


@pytest.mark.parametrize(
    ("z", "values", "why"),
    [
        ([3.0, 3.0, 1.0, 3.0, 3.0], [5.0] * 5, "an event within min_z ends the run"),
        ([3.0, 3.0, -3.0, 3.0, 3.0], [5.0] * 5, "an event the other way starts another run"),
        ([3.0, 3.0, 3.0, 3.0, 3.0], [5.0, 5.0, -5.0, 5.0, 5.0], "a refund among sales is another kind of event"),
        ([2.1, 2.1, 2.1, 2.1, 2.1], [5.0] * 5, "on average the run is under mean_z"),
    ],
)
def test_no_shift_without_a_lasting_run(z, values, why):
    t = tracker(lasting=4)
    scan = t.scan(batch(["a"] * 5, values), zs(z), zs([2.0] * 5))
    assert scan.declared is None, why


def test_runs_in_progress_are_bounded(monkeypatch):
    """A flood of new keys that each deviate once would hold a run per key: the oldest go."""
    monkeypatch.setattr(level_shift, "MAX_RUNS", 50)
    t = tracker(lasting=4)
    keys = [f"k{i}" for i in range(200)]
    b = batch(keys, [5.0] * 200)
    t.adopt(t.scan(b, zs([3.0] * 200), zs([2.0] * 200)), b)
    assert len(t.runs) == 50 and ("store_id", "k199", "log_amount") in t.runs


def test_scanning_changes_nothing_and_adopting_counts_the_adapting_events():
    t = tracker(lasting=2, adapt_events=3)
    b = batch(["a", "a", "a", "a"], [5.0, 5.0, 5.0, 5.0])
    scan = t.scan(b, zs([3.0] * 4), zs([2.0] * 4))
    assert t.runs == {} and scan.declared == 1
    t.adopt(scan, b.slice(0, 2))
    t.declared(scan, b.slice(0, 2), np.array([5.0]), undo=[])
    assert t.adapting == {("store_id", "a"): 3}
    np.testing.assert_array_equal(t.adapting_masks(b.slice(2, 4))[("store_id", "log_amount")], [True, True])
    t.adopt(t.scan(b.slice(2, 4), zs([0.0, 0.0]), zs([5.0, 5.0])), b.slice(2, 4))
    assert t.adapting == {("store_id", "a"): 1}


def test_tracker_state_round_trip_and_foreign_version():
    t = tracker(lasting=3)
    b = batch(["a", "a"], [5.0, 5.0])
    t.adopt(t.scan(b, zs([3.0, 3.0]), zs([2.0, 2.0])), b)
    other = tracker(lasting=3)
    other.load_state_dict(codec.decode(codec.encode(t.state_dict())))
    nxt = batch(["a"], [5.0])
    assert other.scan(nxt, zs([3.0]), zs([2.0])).declared == t.scan(nxt, zs([3.0]), zs([2.0])).declared == 0
    with pytest.raises(StateError):
        other.load_state_dict({**t.state_dict(), "version": 99})


STORE_FEATURES = ("log_amount", "log_quantity", "log_unit_price")


def store_tracker() -> LevelShiftTracker:
    return LevelShiftTracker(key_sets={"store_id": STORE_FEATURES}, features=STORE_FEATURES, axis={"store_id": 0}, lasting=2)


def declare_store_shift(t: LevelShiftTracker, feature: str, moved: tuple[str, ...]) -> FeatureBatch:
    j = STORE_FEATURES.index(feature)
    b = FeatureBatch(
        event_time=np.arange(4, dtype=np.float64),
        columns={f: np.full(4, 5.0) for f in STORE_FEATURES},
        keys={"store_id": np.array(["a"] * 4, dtype=object)},
        event_ids=np.array([f"e{i}" for i in range(4)], dtype=object),
    )
    z = np.zeros((4, 1, len(STORE_FEATURES)))
    z[:, 0, j] = 3.0
    scan = t.scan(b, z, np.full((4, 1, len(STORE_FEATURES)), 2.0))
    assert scan.declared == 1 and scan.where == ("store_id", "a", feature)
    t.adopt(scan, b.slice(0, 1))
    t.declared(scan, b, np.full(len(STORE_FEATURES), 5.0), undo=[], moved=moved)
    return b


@pytest.mark.parametrize(
    ("feature", "moved", "judged_elsewhere"),
    [
        # A re-priced key: its prices and amounts moved, not its quantities.
        ("log_unit_price", ("log_unit_price",), {"log_unit_price", "log_amount"}),
        # Declared on its amounts, its quantities moved with them (relearn moved both).
        ("log_amount", ("log_amount", "log_quantity"), {"log_amount", "log_quantity"}),
    ],
)
def test_a_shift_moves_the_features_it_moved_and_those_made_of_them(feature, moved, judged_elsewhere):
    t = store_tracker()
    b = declare_store_shift(t, feature, moved)
    masks = t.adapting_masks(b.slice(1, 4))
    assert {f for (ks, f) in masks} == judged_elsewhere
    assert all(m.all() for m in masks.values())
    # A second shift of the key adds its features; the state keeps them; a version-2 state,
    # which did not name them, moves every feature of the key set (as version 2 did).
    declare_store_shift(t, "log_quantity", ("log_quantity",))
    assert {f for (_, f) in t.adapting_masks(b)} == judged_elsewhere | {"log_quantity"}
    restored = store_tracker()
    restored.load_state_dict(codec.decode(codec.encode(t.state_dict())))
    assert restored.moving == t.moving
    old = t.state_dict()
    old["version"], old["adapting"] = 2, [entry[:3] for entry in old["adapting"]]
    restored.load_state_dict(old)
    assert {f for (_, f) in restored.adapting_masks(b)} == {"log_amount", "log_quantity", "log_unit_price"}


# -- keys that move together, and gradual shifts ----------------------------------------------

PRODUCT = "product_id+currency"


def product_tracker(**kw) -> LevelShiftTracker:
    return LevelShiftTracker(key_sets={PRODUCT: ("log_unit_price",)}, features=("log_unit_price",), axis={PRODUCT: 0}, together={PRODUCT: (0,)}, **kw)


def product_batch(keys: list[str], values: list[float]) -> FeatureBatch:
    n = len(keys)
    return FeatureBatch(
        event_time=np.arange(n, dtype=np.float64),
        columns={"log_unit_price": np.array(values, dtype=np.float64)},
        keys={PRODUCT: np.array(keys, dtype=object)},
        event_ids=np.array([f"e{i}" for i in range(n)], dtype=object),
    )


def declare_usd_shift(t: LevelShiftTracker) -> None:
    """p|USD moves from 2.0 to 3.0 (z 5 at sd 0.2) over a run of 3."""
    b = product_batch(["p|USD"] * 3, [3.0] * 3)
    scan = t.scan(b, zs([5.0] * 3), zs([2.0] * 3))
    assert scan.declared == 2
    t.adopt(scan, b)
    t.declared(scan, b, np.array([3.0]), undo=[])


@pytest.mark.parametrize(
    ("key", "value", "z", "declared"),
    [
        ("p|EUR", 2.9, 5.0, 0),  # the same change (+1.0 from its baseline 1.9): taken at once
        ("p|EUR", 3.4, 7.5, None),  # +1.5, 2.5 sd past the change: a run of its own
        ("q|EUR", 2.9, 5.0, None),  # another product
        ("p|EUR", 1.4, -2.5, None),  # the other way
    ],
)
def test_a_key_that_moves_with_a_shifted_key_takes_its_change_at_one_fitting_event(key, value, z, declared):
    t = product_tracker(lasting=3)
    declare_usd_shift(t)
    baseline = value - z * 0.2
    scan = t.scan(product_batch([key], [value]), zs([z]), zs([baseline]))
    assert scan.declared == declared


def test_events_of_keys_expected_to_take_a_change_carry_it_until_they_do():
    t = product_tracker(lasting=3)
    declare_usd_shift(t)
    b = product_batch(["p|EUR", "p|USD", "q|EUR", "p|GBP"], [2.9, 3.0, 1.0, 2.5])
    delta = t.adaptation(b).shifted[(PRODUCT, "log_unit_price")]
    np.testing.assert_allclose(delta, [1.0, np.nan, np.nan, 1.0])  # not the shifted key, not another product
    scan = t.scan(product_batch(["p|EUR"], [2.9]), zs([5.0]), zs([1.9]))
    t.adopt(scan, product_batch(["p|EUR"], [2.9]))
    t.declared(scan, product_batch(["p|EUR"], [2.9]), np.array([2.9]), undo=[])
    np.testing.assert_allclose(t.adaptation(b).shifted[(PRODUCT, "log_unit_price")], [np.nan, np.nan, np.nan, 1.0])  # EUR took it


def test_a_sibling_takes_the_change_from_its_fitting_event_alone():
    """An earlier event of its run (a price error) does not enter its new level."""
    t = product_tracker(lasting=3)
    declare_usd_shift(t)
    b = product_batch(["p|EUR", "p|EUR"], [5.9, 2.9])
    scan = t.scan(b, zs([20.0, 5.0]), zs([1.9, 1.9]))
    assert scan.declared == 1 and scan.run is not None
    np.testing.assert_array_equal(scan.run.values, [[2.9]])


@pytest.mark.parametrize(
    ("z_eur", "declared"),
    [
        (5.0, 4),  # USD 3 + EUR 2 events, each run 5 sd off: declared together at the 5th
        (4.0, None),  # EUR runs under pooled_mean_z: not pooled (a promotion moves every currency)
    ],
)
def test_keys_that_move_together_pool_their_runs(z_eur, declared):
    t = product_tracker(lasting=5, pooled_mean_z=4.5)
    b = product_batch(["p|USD", "p|EUR", "p|USD", "p|EUR", "p|USD"], [3.0] * 5)
    z = [5.0, z_eur, 5.0, z_eur, 5.0]
    scan = t.scan(b, zs(z), zs([2.0] * 5))
    assert scan.declared == declared
    if declared is not None:
        assert scan.where == (PRODUCT, "p|USD", "log_unit_price") and [w for w, _ in scan.also] == [(PRODUCT, "p|EUR", "log_unit_price")]
        assert not [r for r in scan.runs if r[1] in ("p|USD", "p|EUR")]  # both start afresh
        t.adopt(scan, b)
        shifts = [t.declared(scan, b, np.array([3.0]), undo=[]), t.declared(scan, b, np.array([3.0]), undo=[], which=scan.also[0])]
        assert [(s.key, s.events) for s in shifts] == [("p|USD", 3), ("p|EUR", 2)]
        assert shifts[0].surprise == shifts[1].surprise > 7.5  # 5 events past 2 sd: each 2.3e-2


def test_a_key_alone_in_its_change_is_declared_by_its_own_run():
    """A change in one currency only: the other currency's normal events end only its own runs."""
    t = product_tracker(lasting=4, pooled_mean_z=4.5)
    keys = ["p|USD", "p|EUR"] * 4
    z = [5.0, 0.1] * 4
    scan = t.scan(product_batch(keys, [3.0] * 8), zs(z), zs([2.0] * 8))
    assert scan.declared == 6 and scan.where == (PRODUCT, "p|USD", "log_unit_price") and scan.also == []


def test_the_change_expected_of_siblings_ends_with_the_shifted_keys_adaptation():
    t = product_tracker(lasting=3, adapt_events=2)
    declare_usd_shift(t)
    later = product_batch(["p|USD", "p|USD"], [3.0, 3.0])
    t.adopt(t.scan(later, zs([0.0, 0.0]), zs([3.0, 3.0])), later)
    assert not t.adapting
    assert t.scan(product_batch(["p|EUR"], [2.9]), zs([5.0]), zs([1.9])).declared is None


def test_rejecting_the_shift_forgets_the_change_expected_of_siblings():
    t = product_tracker(lasting=3)
    declare_usd_shift(t)
    shift_id = next(iter(t.undo))
    assert t.feedback(shift_id, "reject")[0] == "applied"
    assert t.scan(product_batch(["p|EUR"], [2.9]), zs([5.0]), zs([1.9])).declared is None


def gradual_tracker(**kw) -> LevelShiftTracker:
    return tracker(gradual=("store_id",), gradual_slack=0.5, gradual_cap=2.0, gradual_threshold=6.0, **kw)


def test_a_gradual_shift_is_declared_by_its_sum_below_the_run_rule():
    """1.4 sd each time: no run (each under min_z 2) but the sum grows 0.9 an event."""
    t = gradual_tracker(lasting=4)
    b = batch(["a"] * 10, [5.0] * 10)
    scan = t.scan(b, zs([1.4] * 10), zs([4.0] * 10))
    assert scan.declared == 6 and scan.gradual and scan.where == ("store_id", "a", "log_amount")
    assert scan.run is not None and scan.run.length == 7 and scan.run.direction == 1
    np.testing.assert_allclose(scan.run.values, [[5.0]])  # the excursion's mean value
    assert all(p.lengths[p.keys.index("a")] == 0 for p in scan.sums.values())  # the key starts afresh
    assert tracker(lasting=4).scan(b, zs([1.4] * 10), zs([4.0] * 10)).declared is None


@pytest.mark.parametrize(
    ("z", "why"),
    [
        ([9.0, 9.0, 9.0] + [0.0] * 7, "a short burst adds at most cap - slack an event"),
        ([1.4, -1.4] * 5, "back and forth"),
        ([0.4] * 10, "within the slack"),
    ],
)
def test_no_gradual_shift_without_a_lasting_deviation(z, why):
    t = gradual_tracker(lasting=4)
    assert t.scan(batch(["a"] * 10, [5.0] * 10), zs(z), zs([4.0] * 10)).declared is None, why


def test_the_gradual_sum_carries_across_batches_and_snapshots():
    whole = gradual_tracker(lasting=4).scan(batch(["a"] * 10, [5.0] * 10), zs([1.4] * 10), zs([4.0] * 10))
    t = gradual_tracker(lasting=4)
    first = batch(["a"] * 4, [5.0] * 4)
    t.adopt(t.scan(first, zs([1.4] * 4), zs([4.0] * 4)), first)
    table = t.sums[("store_id", "log_amount", 1)]
    assert table.lengths[table.slots["a"]] == 4
    restored = gradual_tracker(lasting=4)
    restored.load_state_dict(codec.decode(codec.encode(t.state_dict())))
    scan = restored.scan(batch(["a"] * 6, [5.0] * 6), zs([1.4] * 6), zs([4.0] * 6))
    assert scan.declared == whole.declared - 4 and scan.run is not None and whole.run is not None
    assert (scan.run.length, scan.run.began, scan.run.total_z) == (whole.run.length, whole.run.began, pytest.approx(whole.run.total_z))
    np.testing.assert_array_equal(scan.run.values, whole.run.values)


def test_a_key_still_learning_adds_nothing_to_its_gradual_sum():
    """Only keys scored against their own baseline are summed: a flood of new keys, each seen
    once, holds no sums."""
    t = gradual_tracker(lasting=4)
    b = batch(["a"] * 10, [5.0] * 10)
    scan = t.scan(b, zs([1.4] * 10), zs([4.0] * 10), warm=np.zeros((10, 1), dtype=bool))
    assert scan.declared is None
    t.adopt(scan, b)
    assert all(not table.entries() for table in t.sums.values())


def test_an_adapting_key_adds_nothing_to_its_gradual_sum():
    t = gradual_tracker(lasting=2, adapt_events=100)
    b = batch(["a", "a"], [5.0, 5.0])
    scan = t.scan(b, zs([3.0, 3.0]), zs([2.0, 2.0]))
    t.adopt(scan, b)
    t.declared(scan, b, np.array([5.0]), undo=[])
    later = batch(["a"] * 10, [5.0] * 10)
    assert t.scan(later, zs([1.4] * 10), zs([4.0] * 10)).declared is None


# -- through the pipeline: recovery after a lasting shift --------------------------------------

N_EVENTS = 6000
DRIFT_AT = 3000
# Small calibration so the detectors alert early; no autoencoder, to stay fast.
SMALL = {
    "scoring": {"calibration_window": 2000, "calibration_min_events": 500, "calibration_refresh": 100},
    "autoencoder": {"enabled": False},
    "river": {"params": {"n_trees": 10, "height": 8, "window_size": 100}},
}


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return load_settings(path, environ={})


@pytest.fixture(scope="module")
def stream(settings) -> tuple[FeatureBatch, list]:
    """The generator's stream with its lasting changes from event DRIFT_AT on."""
    generator = SalesGenerator(GeneratorConfig(seed=7, drift_at=DRIFT_AT))
    values = [orjson.dumps(event) for event, _ in generator.generate(N_EVENTS)]
    decoded = decode_batch(values, event_schema(settings))
    assert not decoded.invalid
    return decoded.features, generator.change_labels


def run(pipeline: ScoringPipeline, features: FeatureBatch, size: int, start: int = 0, stop: int | None = None) -> list[BatchResult]:
    stop = features.n if stop is None else stop
    return [pipeline.process(features.slice(a, min(a + size, stop))) for a in range(start, stop, size)]


@pytest.fixture(scope="module")
def whole(settings, stream) -> tuple[ScoringPipeline, list[BatchResult]]:
    pipeline = build_pipeline(settings)
    return pipeline, run(pipeline, stream[0], 2000)


def test_a_repriced_product_is_declared_once_per_key_then_is_normal(stream, whole):
    features, changes = stream
    _, results = whole
    shifts = [s for r in results for s in r.level_shifts]
    repriced = {c.key for c in changes if c.scenario == "price_change"}
    mine = [s for s in shifts if s.key.split("|")[0] in repriced]
    assert mine and all(s.feature == "log_unit_price" and s.new_level > s.old_level for s in mine)
    assert len({(s.key, s.feature) for s in mine}) == len(mine)  # one shift per key and feature
    flagged = np.concatenate([r.is_anomaly for r in results])
    keys = features.keys["product_id+currency"]
    ids = features.event_ids.tolist()
    for shift in mine:
        after = np.flatnonzero(keys == shift.key)
        after = after[after > ids.index(shift.event_id)]
        # The run's events alerted; after the shift the new price is the key's normal.
        assert after.size >= 20 and flagged[after].mean() < 0.05, shift


def test_the_shift_takes_effect_at_its_event_and_batches_do_not_matter(settings, stream, whole):
    _, results = whole
    smaller = run(build_pipeline(settings), stream[0], 333)
    assert [s.shift_id for r in results for s in r.level_shifts] == [s.shift_id for r in smaller for s in r.level_shifts]
    np.testing.assert_array_equal(np.concatenate([r.is_anomaly for r in results]), np.concatenate([r.is_anomaly for r in smaller]))
    np.testing.assert_allclose(np.concatenate([r.fused for r in results]), np.concatenate([r.fused for r in smaller]), rtol=1e-6, atol=1e-9)


def test_the_tracker_survives_a_snapshot_mid_change(settings, stream, whole):
    features, _ = stream
    _, results = whole
    first = build_pipeline(settings)
    run(first, features, 2000, stop=DRIFT_AT + 500)
    restored = build_pipeline(settings)
    assert restored.load_state_dict(codec.decode(codec.encode(first.state_dict()))) == []
    assert restored.level_shifts is not None and restored.level_shifts.state_dict()["runs"]
    rest = run(restored, features, 2000, start=DRIFT_AT + 500)
    expected = np.concatenate([r.is_anomaly for r in results])[DRIFT_AT + 500 :]
    np.testing.assert_array_equal(np.concatenate([r.is_anomaly for r in rest]), expected)


def test_the_record_names_the_change(whole):
    _, results = whole
    shift = next(s for r in results for s in r.level_shifts)
    record = level_shift_record(shift, 0.9999)
    assert record["kind"] == "level_shift" and record["event_id"] == shift.shift_id and record["event"] is None
    # The re-priced product's currency keys pooled their runs: 8 events in all.
    assert record["key"] == shift.key and record["feature"] == shift.feature and record["events_since"] == shift.events <= 8
    assert record["new_level"] > record["old_level"] > 0 and "new level" in record["reasons"][0]
    assert record["surprise"] > 12 and record["score"] > record["threshold"]  # 8 events beyond 2 sd one way: about 1e-13


@pytest.mark.parametrize("label", ["reject", "accept"])
def test_reject_restores_the_old_baseline_and_accept_keeps_the_new(settings, stream, label):
    features, _ = stream
    pipeline = build_pipeline(settings)
    results: list[BatchResult] = []
    a = 0
    repriced = [s for r in results for s in r.level_shifts if s.key_set == "product_id+currency"]
    while not repriced:  # a re-priced product: its new price is far beyond its old one
        results.append(pipeline.process(features.slice(a, a + 250)))
        repriced = [s for s in results[-1].level_shifts if s.key_set == "product_id+currency"]
        a += 250
    shift = repriced[0]
    assert pipeline.level_shift_feedback(shift.shift_id, label) == ("applied" if label == "reject" else "recorded")
    assert pipeline.level_shift_feedback(shift.shift_id, label) == "duplicate"
    rest = run(pipeline, features, 1000, start=a)
    zscore = pipeline.detectors[0]
    k, j = zscore.key_sets.index(shift.key_set), zscore.features.index(shift.feature)
    z = np.concatenate([seg.steps["zscore"].details["z"][:, k, j] for r in rest for seg in r.segments])
    mine = features.keys[shift.key_set][a:] == shift.key
    again = [s for r in rest for s in r.level_shifts if (s.key, s.feature) == (shift.key, shift.feature)]
    assert not again  # rejected: never declared again; accepted: learned
    if label == "reject":
        # Measured against the old price again (later events move it where this test's small
        # calibration does not flag them).
        assert z[mine][0] > 4
    else:
        assert (np.abs(z[mine]) < 3).mean() > 0.95
        assert np.concatenate([r.is_anomaly for r in rest])[mine].mean() < 0.05


def test_the_tracker_reads_each_key_set_at_its_place_in_the_z_scores(tmp_path):
    """A keyless key set is not tracked, wherever it is listed: the others are read at their own
    place among the z-score's key sets."""
    path = tmp_path / "keyless-first.yaml"
    key_sets = [{"fields": [], "features": ["log_price_ratio"]}, {"fields": ["store_id"], "features": ["log_amount", "log_quantity"]}]
    path.write_text(yaml.safe_dump({"zscore": {"key_sets": key_sets}}))
    pipeline = build_pipeline(load_settings(path, environ={}))
    assert pipeline.level_shifts is not None
    assert pipeline.level_shifts.key_sets == {"store_id": ("log_amount", "log_quantity")}
    assert pipeline.level_shifts.axis == {"global": 0, "store_id": 1}


def test_events_of_adapting_keys_stay_out_of_the_calibrators_windows(settings, stream):
    # While a key's baseline moves to its new level its scores run high; in the windows they
    # would fatten every detector's fitted tail (a new store at 30x is a tenth of the stream).
    features = stream[0]
    pipeline = build_pipeline(settings)
    run(pipeline, features, 2000, stop=2000)
    stores = features.keys["store_id"][2000:2500]
    key = str(stores[0])
    assert pipeline.level_shifts is not None
    pipeline.level_shifts.adapting[("store_id", key)] = 10_000
    windows = {name: cal for name, cal in pipeline.calibrators.items() if isinstance(cal, Calibrator)}
    assert windows
    seen = {name: cal.seen for name, cal in windows.items()}
    result = pipeline.process(features.slice(2000, 2500))
    assert not result.level_shifts and (stores == key).sum() > 10
    for name, cal in windows.items():
        assert cal.seen - seen[name] == int((~result.is_anomaly & (stores != key)).sum()), name
