"""ZScoreDetector: batched prefix statistics against a naive per-event Welford reference, and
seasonal baselines (a normal Saturday peak is not an anomaly, a noon-sized basket at 3 a.m. is).

The contract (``detectors/base.py``): scoring a batch equals scoring its events one at a time,
``score`` is pure, ``commit`` adopts the state, and snapshots restore exactly.
"""

from __future__ import annotations

import math
import pickle
import re

import numpy as np
import pytest

from stream_detector.detectors import seasons
from stream_detector.detectors.zscore import ZScoreDetector
from stream_detector.features import FeatureBatch

FEATURES = ("a", "b", "c")
KEY_SETS = ("store", "product", "global")
KEY_SET_FEATURES = {"store": ("a", "b"), "product": ("b", "c"), "global": ("c",)}
TOL = 1e-9


def make_batch(n: int, seed: int, t0: float = 1_700_000_000.0, nan_rate: float = 0.1, none_rate: float = 0.1) -> FeatureBatch:
    rng = np.random.default_rng(seed)
    stores = np.array([f"s{i}" for i in range(4)], dtype=object)
    products = np.array([f"p{i}" for i in range(12)], dtype=object)
    s_idx = rng.integers(0, len(stores), n)
    p_idx = rng.integers(0, len(products), n)
    cols = {
        # Key-dependent levels so per-key statistics differ from the global ones.
        "a": rng.normal(2.0 + 0.5 * s_idx, 0.3 + 0.1 * s_idx),
        "b": rng.normal(1.0 + 0.2 * p_idx, 0.5),
        "c": rng.normal(-3.0, 2.0, n),
    }
    # Occasional gross outliers (exercise the reject guard).
    spikes = rng.random(n) < 0.02
    cols["a"] = np.where(spikes, cols["a"] + 40.0, cols["a"])
    for name in cols:
        cols[name] = np.where(rng.random(n) < nan_rate, np.nan, cols[name])
    store = stores[s_idx].copy()
    store[rng.random(n) < none_rate] = None
    product = products[p_idx].copy()
    product[rng.random(n) < none_rate] = None
    glob = np.full(n, "*", dtype=object)
    return FeatureBatch(
        event_time=t0 + np.arange(n, dtype=np.float64),
        columns=cols,
        keys={"store": store, "product": product, "global": glob},
    )


def make_detector(**kw) -> ZScoreDetector:
    params = dict(
        features=FEATURES,
        key_sets=KEY_SETS,
        key_set_features=KEY_SET_FEATURES,
        warmup=5,
        min_std=0.05,
        reject_z=8.0,
        reject_after=3,
    )
    params.update(kw)
    return ZScoreDetector(**params)


def run_chunks(det: ZScoreDetector, batch: FeatureBatch, learn: np.ndarray, sizes: list[int]):
    scores, rejects = [], []
    start, k = 0, 0
    while start < batch.n:
        stop = min(batch.n, start + sizes[k % len(sizes)])
        step = det.score(batch.slice(start, stop), learn[start:stop])
        det.commit(step)
        scores.append(step.scores)
        rejects.append(step.reject)
        start, k = stop, k + 1
    return np.concatenate(scores), np.concatenate(rejects)


# ---------------------------------------------------------------------------------------------
# Naive reference: plain dictionaries and per-event Welford updates.
# ---------------------------------------------------------------------------------------------


class NaiveZScore:
    def __init__(self, features, key_sets, key_set_features, warmup, min_std, reject_z, reject_after):
        self.features = features
        self.key_sets = key_sets
        self.ksf = key_set_features
        self.warmup = warmup
        self.min_std = min_std
        self.reject_z = reject_z
        self.reject_after = reject_after
        self.glob = {f: [0, 0.0, 0.0] for f in features}
        self.keyed = {ks: {} for ks in key_sets}

    def _std(self, st):
        n, _, m2 = st
        if n <= 1:
            return math.nan
        return max(math.sqrt(max(m2, 0.0) / (n - 1)), self.min_std)

    @staticmethod
    def _update(st, x):
        st[0] += 1
        delta = x - st[1]
        st[1] += delta / st[0]
        st[2] += delta * (x - st[1])

    def step(self, row: dict, keys: dict, learn: bool) -> tuple[float, bool]:
        zs = []
        reject = False
        for f in self.features:
            x = row[f]
            if math.isnan(x):
                continue
            g = self.glob[f]
            if g[0] >= self.reject_after and abs(x - g[1]) > self.reject_z * self._std(g):
                reject = True
        for ks in self.key_sets:
            key = keys[ks]
            for f in self.ksf[ks]:
                x = row[f]
                if math.isnan(x):
                    continue
                g = self.glob[f]
                k = self.keyed[ks].get(key, {}).get(f, [0, 0.0, 0.0]) if key is not None else None
                if k is not None and k[0] >= self.reject_after and abs(x - k[1]) > self.reject_z * self._std(k):
                    reject = True
                if k is not None and k[0] >= self.warmup:
                    zs.append(abs((x - k[1]) / self._std(k)))
                elif g[0] >= self.warmup:
                    zs.append(abs((x - g[1]) / self._std(g)))
        # A gross outlier is learned by none of the statistics, whatever ``learn`` says.
        if learn and not reject:
            for f in self.features:
                if not math.isnan(row[f]):
                    self._update(self.glob[f], row[f])
            for ks in self.key_sets:
                key = keys[ks]
                if key is None:
                    continue
                for f in self.ksf[ks]:
                    if not math.isnan(row[f]):
                        self._update(self.keyed[ks].setdefault(key, {}).setdefault(f, [0, 0.0, 0.0]), row[f])
        return (max(zs) if zs else 0.0), reject


def naive_scores(batch: FeatureBatch, learn: np.ndarray, **kw):
    ref = NaiveZScore(FEATURES, KEY_SETS, KEY_SET_FEATURES, **kw)
    scores, rejects = [], []
    for i in range(batch.n):
        row = {f: float(batch.columns[f][i]) for f in FEATURES}
        keys = {ks: batch.keys[ks][i] for ks in KEY_SETS}
        s, r = ref.step(row, keys, bool(learn[i]))
        scores.append(s)
        rejects.append(r)
    return np.array(scores), np.array(rejects), ref


REF_PARAMS = dict(warmup=5, min_std=0.05, reject_z=8.0, reject_after=3)


@pytest.fixture(scope="module")
def data():
    batch = make_batch(700, seed=11)
    learn = np.random.default_rng(5).random(batch.n) > 0.15
    assert not learn.all() and learn.any()
    return batch, learn


@pytest.fixture(scope="module")
def one_by_one(data):
    batch, learn = data
    return run_chunks(make_detector(), batch, learn, [1])


@pytest.fixture(scope="module")
def naive(data):
    batch, learn = data
    return naive_scores(batch, learn, **REF_PARAMS)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[700], [1], [7], [1, 3, 50, 2, 128, 1, 13]], ids=["whole", "ones", "sevens", "mixed"])
def test_batch_equals_one_by_one_and_naive(data, one_by_one, naive, sizes):
    batch, learn = data
    det = make_detector()
    scores, rejects = run_chunks(det, batch, learn, sizes)
    one_scores, one_rejects = one_by_one
    np.testing.assert_allclose(scores, one_scores, rtol=TOL, atol=TOL)
    np.testing.assert_array_equal(rejects, one_rejects)

    ref_scores, ref_rejects, ref = naive
    np.testing.assert_allclose(scores, ref_scores, rtol=TOL, atol=TOL)
    np.testing.assert_array_equal(rejects, ref_rejects)
    assert rejects.any(), "the data should contain gross outliers that get rejected"
    assert (scores > 0).any()

    # Committed statistics match the reference too.
    state = det.state_dict()
    g = state["global"]
    for j, f in enumerate(FEATURES):
        cnt, mean, m2 = ref.glob[f]
        assert g["count"][0, j] == cnt
        assert g["mean"][0, j] == pytest.approx(mean, rel=1e-9, abs=1e-12)
        assert g["m2"][0, j] == pytest.approx(m2, rel=1e-9, abs=1e-9)
    for ks in KEY_SETS:
        data_ks = state["key_sets"][ks]
        assert set(data_ks["keys"]) == set(ref.keyed[ks])
        # A key set's tables hold only its own features; the reference learns no others.
        assert data_ks["features"] == list(KEY_SET_FEATURES[ks])
        for r, key in enumerate(data_ks["keys"]):
            assert all(ref.keyed[ks][key].get(f, [0])[0] == 0 for f in FEATURES if f not in data_ks["features"])
            for j, f in enumerate(data_ks["features"]):
                cnt, mean, m2 = ref.keyed[ks][key].get(f, [0, 0.0, 0.0])
                assert data_ks["count"][r, j] == cnt
                assert data_ks["mean"][r, j] == pytest.approx(mean, rel=1e-9, abs=1e-12)
                assert data_ks["m2"][r, j] == pytest.approx(m2, rel=1e-9, abs=1e-9)


def test_missing_keys_and_features_only_use_global(data):
    batch, learn = data
    # Events with no key for any key set and only NaN features score 0 and change nothing keyed.
    n = 5
    empty = FeatureBatch(
        event_time=np.arange(n, dtype=float),
        columns={f: np.full(n, np.nan) for f in FEATURES},
        keys={"store": np.full(n, None, dtype=object), "product": np.full(n, None, dtype=object), "global": np.full(n, None, dtype=object)},
    )
    det = make_detector()
    det.learn_one_batch(batch.slice(0, 300), learn[:300])
    before = pickle.dumps(det.state_dict())
    step = det.score(empty, np.ones(n, dtype=bool))
    np.testing.assert_array_equal(step.scores, np.zeros(n))
    det.commit(step)
    after = det.state_dict()
    assert pickle.dumps(after) == before


def test_batch_without_some_columns_is_treated_as_missing(data):
    """A FeatureBatch lacking a feature column or a key-set column: missing values, no crash."""
    batch, learn = data
    det = make_detector()
    det.learn_one_batch(batch.slice(0, 300), learn[:300])
    partial = FeatureBatch(event_time=batch.event_time[:10], columns={"a": batch.columns["a"][:10]}, keys={"store": batch.keys["store"][:10]})
    step = det.score(partial, np.ones(10, dtype=bool))
    assert np.isfinite(step.scores).all()


def test_score_is_pure(data):
    batch, learn = data
    det = make_detector()
    det.learn_one_batch(batch.slice(0, 400), learn[:400])
    snapshot = pickle.dumps(det.state_dict())
    rest = batch.slice(400, batch.n)
    s1 = det.score(rest, learn[400:])
    s2 = det.score(rest, learn[400:])
    np.testing.assert_array_equal(s1.scores, s2.scores)
    np.testing.assert_array_equal(s1.reject, s2.reject)
    assert pickle.dumps(det.state_dict()) == snapshot
    # A differently masked score in between changes nothing either.
    det.score(rest, np.zeros(rest.n, dtype=bool))
    s3 = det.score(rest, learn[400:])
    np.testing.assert_array_equal(s1.scores, s3.scores)


def test_state_round_trip(data):
    batch, learn = data
    det = make_detector()
    det.learn_one_batch(batch.slice(0, 350), learn[:350])
    state = pickle.loads(pickle.dumps(det.state_dict()))
    fresh = make_detector()
    fresh.load_state_dict(state)
    rest = batch.slice(350, batch.n)
    a, ra = run_chunks(det, rest, learn[350:], [37])
    b, rb = run_chunks(fresh, rest, learn[350:], [37])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ra, rb)
    assert det.n_keys() == fresh.n_keys()


def test_reject_gross_outlier_after_reject_after_values():
    det = make_detector(key_sets=("store",), key_set_features={"store": FEATURES}, warmup=30, reject_after=5)
    rng = np.random.default_rng(0)
    n_normal = 6
    normal = rng.normal(10.0, 1.0, n_normal)

    def batch_of(values, t0=0.0):
        n = len(values)
        return FeatureBatch(
            event_time=t0 + np.arange(n, dtype=float),
            columns={"a": np.asarray(values, dtype=float), "b": np.full(n, np.nan), "c": np.full(n, np.nan)},
            keys={"store": np.full(n, "s1", dtype=object)},
        )

    # Before reject_after values nothing can be rejected, however far out.
    early = make_detector(key_sets=("store",), key_set_features={"store": FEATURES}, warmup=30, reject_after=5)
    step = early.score(batch_of([10.0, 10.5, 9.5, 1e6]), np.ones(4, dtype=bool))
    assert not step.reject.any()

    values = np.r_[normal, 1_000.0, normal[:2]]
    batch = batch_of(values)
    learn = np.ones(len(values), dtype=bool)
    step = det.score(batch, learn)
    assert step.reject.tolist() == [False] * n_normal + [True, False, False]
    # The pipeline learns with ~reject; the outlier then leaves the statistics untouched.
    step = det.score(batch, ~step.reject)
    assert step.reject.tolist() == [False] * n_normal + [True, False, False]
    det.commit(step)

    ref = make_detector(key_sets=("store",), key_set_features={"store": FEATURES}, warmup=30, reject_after=5)
    ref.learn_one_batch(batch_of(np.r_[normal, normal[:2]]))
    got, want = det.state_dict(), ref.state_dict()
    np.testing.assert_allclose(got["global"]["mean"], want["global"]["mean"], rtol=1e-12)
    np.testing.assert_allclose(got["global"]["m2"], want["global"]["m2"], rtol=1e-12)
    np.testing.assert_array_equal(got["key_sets"]["store"]["count"], want["key_sets"]["store"]["count"])
    np.testing.assert_allclose(got["key_sets"]["store"]["mean"], want["key_sets"]["store"]["mean"], rtol=1e-12)
    assert got["global"]["count"][0, 0] == len(normal) + 2


def test_eviction_keeps_at_most_max_keys_and_evicted_fall_back_to_global():
    max_keys = 10
    det = ZScoreDetector(features=("a",), key_sets=("store",), warmup=3, max_keys=max_keys, reject_z=1e9)
    rng = np.random.default_rng(1)
    t = 0.0
    # Key k0 is the least recently seen; each key gets 5 events (warm), level 100 * k.
    for k in range(max_keys + 5):
        values = 100.0 * (k + 1) + rng.normal(0, 1, 5)
        b = FeatureBatch(
            event_time=t + np.arange(5, dtype=float),
            columns={"a": values},
            keys={"store": np.full(5, f"k{k}", dtype=object)},
        )
        t += 10
        det.learn_one_batch(b)
        assert det.n_keys()["store"] <= max_keys
    state = det.state_dict()
    kept = state["key_sets"]["store"]["keys"]
    assert "k0" not in kept
    assert f"k{max_keys + 4}" in kept  # the most recent key survives

    probe = FeatureBatch(event_time=np.array([t]), columns={"a": np.array([100.0])}, keys={"store": np.array(["k0"], dtype=object)})
    step = det.score(probe, np.ones(1, dtype=bool))
    assert not step.details["warm"][0, 0]
    g = state["global"]
    g_std = max(math.sqrt(g["m2"][0, 0] / (g["count"][0, 0] - 1)), det.min_std)
    expected = abs(100.0 - g["mean"][0, 0]) / g_std
    assert step.scores[0] == pytest.approx(expected, rel=1e-9)
    # A warm key that was kept still scores on its own statistics.
    last = f"k{max_keys + 4}"
    probe2 = FeatureBatch(event_time=np.array([t]), columns={"a": np.array([100.0 * (max_keys + 5)])}, keys={"store": np.array([last], dtype=object)})
    assert det.score(probe2, np.ones(1, dtype=bool)).details["warm"][0, 0]


def test_ttl_eviction_frees_slots_for_new_keys_and_snapshots_skip_them():
    """Keys idle past the TTL are forgotten at commit, their slots are reused by new keys (the
    table does not grow), a returning key starts over, and a snapshot taken with freed slots
    restores a detector that scores the same."""
    det = ZScoreDetector(features=("a",), key_sets=("store",), warmup=3, reject_z=1e9, key_ttl_seconds=100.0)
    rng = np.random.default_rng(4)

    def batch(keys: list[str], t0: float) -> FeatureBatch:
        n = len(keys)
        return FeatureBatch(
            event_time=t0 + np.arange(n, dtype=float),
            columns={"a": 10.0 + rng.normal(0, 1, n)},
            keys={"store": np.array(keys, dtype=object)},
        )

    det.learn_one_batch(batch([f"old{k}" for k in range(6) for _ in range(4)], 0.0))
    table = det._state.key_sets["store"]
    assert det.n_keys()["store"] == 6 and table.allocated == 6
    # 200 s later: old1..old5 are past the TTL when this batch is committed; old0 is back.
    det.learn_one_batch(batch(["old0"] + [f"new{k}" for k in range(3) for _ in range(4)], 200.0))
    assert sorted(det.state_dict()["key_sets"]["store"]["keys"]) == ["new0", "new1", "new2", "old0"]
    assert det.n_keys()["store"] == 4 and table.allocated == 9 and len(table.free) == 5
    # The next new keys take the freed slots before the table grows.
    det.learn_one_batch(batch(["new3", "new4", "new5"], 250.0))
    assert det.n_keys()["store"] == 7 and table.allocated == 9 and len(table.free) == 2
    returning = det.score(batch(["old3"], 260.0), np.ones(1, dtype=bool))
    assert not returning.details["warm"][0, 0]

    restored = ZScoreDetector(features=("a",), key_sets=("store",), warmup=3, reject_z=1e9, key_ttl_seconds=100.0)
    restored.load_state_dict(det.state_dict())
    probe = batch(["new0", "new1", "old0", "new5", "fresh"], 270.0)
    learn = np.ones(probe.n, dtype=bool)
    np.testing.assert_array_equal(restored.score(probe, learn).scores, det.score(probe, learn).scores)


def test_explain_in_original_units():
    det = ZScoreDetector(features=("log_amount",), key_sets=("store_id",), warmup=5)
    rng = np.random.default_rng(2)
    n = 60
    amounts = np.exp(rng.normal(np.log(20.0), 0.2, n))
    amounts[-1] = 12_345.0
    cols = {"log_amount": np.sign(amounts) * np.log1p(np.abs(amounts)), "amount": amounts}
    batch = FeatureBatch(event_time=np.arange(n, dtype=float), columns=cols, keys={"store_id": np.full(n, "s-7", dtype=object)})
    step = det.score(batch, np.ones(n, dtype=bool))
    assert step.scores[-1] > 10
    explanation = det.explain(batch, step, n - 1)
    assert len(explanation.reasons) == 1
    reason = explanation.reasons[0]
    assert "amount" in reason
    assert "12,345.00" in reason
    assert "s-7" in reason
    assert "above" in reason
    # The typical value is in units too (around 20), not a log.
    numbers = [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*\.\d+", reason)]
    assert any(10 < v < 40 for v in numbers), reason
    assert explanation.details["feature"] == "log_amount"
    assert explanation.details["warm"] is True
    # An event without any z (cold) has no reasons.
    cold = ZScoreDetector(features=("log_amount",), key_sets=("store_id",), warmup=5)
    s = cold.score(batch.slice(0, 1), np.ones(1, dtype=bool))
    assert cold.explain(batch.slice(0, 1), s, 0).reasons == []


def test_learning_key_blends_global_statistics_with_its_own_first_values():
    """A new expensive product is an outlier of everyone's prices at its first sale, much less
    so at its sixth (its own first values count), and the blend keeps batch == one-by-one."""
    rng = np.random.default_rng(5)
    n = 400
    cheap = rng.normal(2.0, 0.8, n)  # many products, log prices around 2
    keys = np.array([f"p{i % 40}" for i in range(n)], dtype=object)
    history = FeatureBatch(event_time=np.arange(n, dtype=np.float64), columns={"a": cheap}, keys={"product": keys})
    dear = FeatureBatch(
        event_time=n + np.arange(6, dtype=np.float64),
        columns={"a": np.full(6, 7.37) + rng.normal(0, 0.05, 6)},
        keys={"product": np.full(6, "new", dtype=object)},
    )
    scores = {}
    for prior in (0.0, 30.0):
        det = ZScoreDetector(features=("a",), key_sets=("product",), warmup=30, learning_prior=prior, reject_z=1e9)
        det.commit(det.score(history, np.ones(n, dtype=bool)))
        whole = det.score(dear, np.ones(6, dtype=bool))
        one = ZScoreDetector(features=("a",), key_sets=("product",), warmup=30, learning_prior=prior, reject_z=1e9)
        one.commit(one.score(history, np.ones(n, dtype=bool)))
        singles = run_chunks(one, dear, np.ones(6, dtype=bool), [1])[0]
        np.testing.assert_allclose(whole.scores, singles, rtol=TOL, atol=TOL)
        assert not whole.details["warm"].any()
        scores[prior] = whole.scores
    assert scores[0.0][0] == pytest.approx(scores[30.0][0])  # first sale: the global statistics alone
    assert scores[0.0][5] > 5.0  # without the blend every early sale stays an outlier
    assert scores[30.0][5] < 0.5 * scores[0.0][5]
    assert np.all(np.diff(scores[30.0]) < 0)  # each own sale makes the next one less surprising


def test_version_1_snapshots_with_every_feature_per_table_still_load(data):
    """Snapshots from before tables held only their key set's features restore exactly."""
    batch, learn = data
    det = make_detector()
    run_chunks(det, batch.slice(0, 400), learn[:400], [100])
    v2 = det.state_dict()
    v1 = {**v2, "version": 1, "key_sets": {}}
    for name, table in v2["key_sets"].items():
        wide = {}
        for field in ("count", "mean", "m2"):
            full = np.zeros((len(table["keys"]), len(FEATURES)))
            for j, f in enumerate(table["features"]):
                full[:, FEATURES.index(f)] = table[field][:, j]
            wide[field] = full
        v1["key_sets"][name] = {"keys": table["keys"], "last_seen": table["last_seen"], **wide}
    restored = make_detector()
    restored.load_state_dict(v1)
    rest = batch.slice(400, batch.n)
    np.testing.assert_array_equal(restored.score(rest, learn[400:]).scores, det.score(rest, learn[400:]).scores)


@pytest.mark.parametrize("max_keys", [1000, 12])
def test_skipping_the_idle_scan_forgets_the_same_keys_as_scanning_every_batch(max_keys, monkeypatch):
    """The eviction scans the slots only when the table's last_seen bounds say a key may be
    idle past the TTL (or the table is over max_keys). Against a detector that scans after every
    batch, on keys that come and go with out-of-order event times (a late event of a new key
    can be idle on arrival), the same keys are kept and the scores agree batch by batch."""
    from stream_detector.detectors import zscore as zscore_module

    def make() -> ZScoreDetector:
        return ZScoreDetector(features=("a",), key_sets=("store",), warmup=2, reject_z=1e9, key_ttl_seconds=50.0, max_keys=max_keys)

    bounded, scanning = make(), make()
    rng = np.random.default_rng(11)
    scans = {"bounded": 0}
    original = zscore_module._KeySetState.may_have_idle

    def counted(self, ttl):
        result = original(self, ttl)
        scans["bounded"] += result
        return result

    t = 0.0
    for step in range(120):
        n = int(rng.integers(1, 12))
        t += float(rng.exponential(8.0))
        times = t + rng.normal(0.0, 3.0, n)
        if step % 17 == 5:
            times[0] = t - 200.0  # a late event, idle past the TTL on arrival
        keys = np.array([f"k{int(k)}" for k in rng.integers(0, 25, n)], dtype=object)
        batch = FeatureBatch(event_time=times, columns={"a": rng.normal(5.0, 1.0, n)}, keys={"store": keys})
        learn = np.ones(n, dtype=bool)
        monkeypatch.setattr(zscore_module._KeySetState, "may_have_idle", counted)
        got = bounded.score(batch, learn)
        bounded.commit(got)
        monkeypatch.setattr(zscore_module._KeySetState, "may_have_idle", lambda self, ttl: True)
        expected = scanning.score(batch, learn)
        scanning.commit(expected)
        np.testing.assert_array_equal(got.scores, expected.scores)
        assert sorted(bounded.state_dict()["key_sets"]["store"]["keys"]) == sorted(scanning.state_dict()["key_sets"]["store"]["keys"])
    monkeypatch.undo()
    assert 0 < scans["bounded"] < 120  # it did skip, and it did scan


# -- seasonal baselines (key_set_seasonality) ----------------------------------------------------
#
# A normal Saturday peak is not an anomaly, a normal noon value at 3 a.m. on a Tuesday is;
# seasonal scoring keeps batch == one-by-one and state round-trips.

MONDAY = 1_767_571_200.0  # 2026-01-05 00:00 UTC, a Monday
HOUR = 3600.0


def seasonal_stream(weeks: int, seed: int = 0) -> FeatureBatch:
    """One store, an event every 10 minutes: small baskets at night, bigger by day, twice as
    big on Saturdays (log scale, noise sd 0.15)."""
    rng = np.random.default_rng(seed)
    t = MONDAY + np.arange(0, weeks * 7 * 86400, 600, dtype=np.float64)
    hour = seasons.bucket("hour_of_day", t)
    dow = seasons.bucket("day_of_week", t)
    level = np.where((hour >= 8) & (hour < 20), np.log1p(100.0), np.log1p(10.0)) + np.where(dow == 5, np.log(2.0), 0.0)
    x = level + rng.normal(0, 0.15, t.size)
    return FeatureBatch(event_time=t, columns={"log_amount": x}, keys={"store_id": np.full(t.size, "s1", dtype=object)})


def seasonal_detector(seasonality: tuple[str, ...], **kw) -> ZScoreDetector:
    return ZScoreDetector(
        features=("log_amount",),
        key_sets=("store_id",),
        warmup=10,
        key_set_seasonality={"store_id": seasonality},
        **kw,
    )


def learn_all(det: ZScoreDetector, batch: FeatureBatch, size: int = 500) -> None:
    for start in range(0, batch.n, size):
        part = batch.slice(start, min(batch.n, start + size))
        det.commit(det.score(part, np.ones(part.n, dtype=bool)))


def seasonal_probe(det: ZScoreDetector, t: float, amount: float) -> tuple[float, dict]:
    one = FeatureBatch(event_time=np.array([t]), columns={"log_amount": np.array([np.log1p(amount)])}, keys={"store_id": np.array(["s1"], dtype=object)})
    step = det.score(one, np.ones(1, dtype=bool))
    return float(step.scores[0]), det.explain(one, step, 0).details


SATURDAY_2PM = MONDAY + 3 * 7 * 86400 + 5 * 86400 + 14 * HOUR + 600
TUESDAY_3AM = MONDAY + 3 * 7 * 86400 + 86400 + 3 * HOUR + 600


def test_seasonal_baseline_knows_saturdays_and_nights():
    history = seasonal_stream(weeks=3)
    flat, seasonal = seasonal_detector(()), seasonal_detector(("hour_of_day", "hour_of_week"))
    learn_all(flat, history)
    learn_all(seasonal, history)

    # A normal Saturday-afternoon basket (2 x 100): ordinary for Saturdays 14:00.
    z_flat_sat, _ = seasonal_probe(flat, SATURDAY_2PM, 200.0)
    z_seasonal_sat, details = seasonal_probe(seasonal, SATURDAY_2PM, 200.0)
    assert z_seasonal_sat < 2.0
    assert details["baseline"] == "store_id s1 on Saturdays 14:00-15:00 UTC"
    low, high = details["expected_range"]
    assert low < 200.0 < high

    # A noon-sized basket at 3 a.m. on a Tuesday: normal overall, far out for that hour.
    z_flat_night, _ = seasonal_probe(flat, TUESDAY_3AM, 100.0)
    z_seasonal_night, details = seasonal_probe(seasonal, TUESDAY_3AM, 100.0)
    assert z_flat_night < 3.0, "without seasons the 3 a.m. basket hides in the daily mix"
    assert z_seasonal_night > 10.0
    assert details["baseline"] == "store_id s1 on Tuesdays 03:00-04:00 UTC"
    assert z_flat_sat > z_seasonal_sat


def test_a_cold_bucket_falls_back_to_the_coarser_baseline():
    # One week of history with Saturdays left out: Saturday's hour-of-week buckets are cold,
    # so Saturday events are scored against the key's hour-of-day baseline.
    history = seasonal_stream(weeks=1)
    keep = seasons.bucket("day_of_week", history.event_time) != 5
    history = FeatureBatch(history.event_time[keep], {"log_amount": history.columns["log_amount"][keep]}, {"store_id": history.keys["store_id"][keep]})
    # Without the rejection guard: this stream starts at night, its first day values are 14 sd
    # from the key's night-only statistics, and with Saturdays left out nothing widens that
    # spread, so the guard would keep every day value of this history out of every table
    # (see test_the_guard_keeps_a_jump_out_until_the_spread_widens).
    det = seasonal_detector(("hour_of_day", "hour_of_week"), reject_z=float("inf"))
    learn_all(det, history)
    _, details = seasonal_probe(det, MONDAY + 5 * 86400 + 14 * HOUR, 100.0)
    assert details["baseline"] == "store_id s1 at 14:00-15:00 UTC"


def test_the_guard_keeps_a_jump_out_until_the_spread_widens():
    # What the guard does to the same stream: a rejected value is learned by no table, so the
    # first days (14 sd above the first nights) are rejected one after the other, as a pipeline
    # would reject them one by one. Saturday's nights (4.6 sd up: kept) widen the key's spread,
    # and from Sunday on the days are learned. Recorded as the guard's known cost on a stream
    # whose levels differ by more than reject_z sd: a jump is kept out until the spread allows it.
    history = seasonal_stream(weeks=2)
    det = seasonal_detector(("hour_of_day", "hour_of_week"))
    rejected = []
    for start in range(0, history.n, 500):
        part = history.slice(start, min(history.n, start + 500))
        step = det.score(part, np.ones(part.n, dtype=bool))
        det.commit(step)
        rejected.append(step.reject)
    rejected = np.concatenate(rejected)
    hour = seasons.bucket("hour_of_day", history.event_time)
    day_of_stream = (history.event_time - MONDAY) // 86400
    daytime = (hour >= 8) & (hour < 20)
    assert rejected[daytime & (day_of_stream < 6)].all()
    assert not rejected[day_of_stream >= 6].any()
    assert not rejected[~daytime].any()


@pytest.mark.parametrize("sizes", [[1], [7, 1, 300]], ids=["ones", "mixed"])
def test_seasonal_batches_equal_one_by_one(sizes):
    batch = seasonal_stream(weeks=1, seed=3).slice(0, 600)
    learn = np.random.default_rng(1).random(batch.n) > 0.1
    whole = seasonal_detector(("hour_of_day", "day_of_week"))
    step = whole.score(batch, learn)
    whole.commit(step)
    chunked = seasonal_detector(("hour_of_day", "day_of_week"))
    scores, _rejects = run_chunks(chunked, batch, learn, sizes)
    np.testing.assert_allclose(scores, step.scores, rtol=1e-9, atol=1e-9)
    w, c = (s["key_sets"]["store_id@day_of_week"] for s in (whole.state_dict(), chunked.state_dict()))
    w_by_key = {key: (w["count"][r, 0], w["mean"][r, 0]) for r, key in enumerate(w["keys"])}
    c_by_key = {key: (c["count"][r, 0], c["mean"][r, 0]) for r, key in enumerate(c["keys"])}
    assert w_by_key.keys() == c_by_key.keys() == {"s1@Mon", "s1@Tue", "s1@Wed", "s1@Thu", "s1@Fri"}
    for key, (count, mean) in w_by_key.items():
        assert c_by_key[key][0] == count
        assert c_by_key[key][1] == pytest.approx(mean, rel=1e-9)


def test_seasonal_state_round_trips_and_old_snapshots_load():
    history = seasonal_stream(weeks=1)
    det = seasonal_detector(("hour_of_day",))
    learn_all(det, history)
    clone = seasonal_detector(("hour_of_day",))
    clone.load_state_dict(pickle.loads(pickle.dumps(det.state_dict())))
    assert seasonal_probe(clone, TUESDAY_3AM, 100.0)[0] == seasonal_probe(det, TUESDAY_3AM, 100.0)[0]
    # A snapshot from before seasonality was configured: the seasonal level starts empty.
    flat = seasonal_detector(())
    learn_all(flat, history)
    upgraded = seasonal_detector(("hour_of_day",))
    upgraded.load_state_dict(flat.state_dict())
    assert upgraded.n_keys() == {"store_id": 1, "store_id@hour_of_day": 0}
    assert seasonal_probe(upgraded, TUESDAY_3AM, 100.0)[0] == seasonal_probe(flat, TUESDAY_3AM, 100.0)[0]


def test_an_adapting_event_is_not_judged_by_other_key_sets_on_the_features_its_shift_moved(data):
    """``focus``: for a marked event, a key set's z on a feature counts unless another key
    set's adapting key of the event moved that feature; unmarked events keep their scores."""
    batch, learn = data
    det = make_detector()
    det.commit(det.score(batch, learn))
    step = det.score(batch, learn)
    z = np.nan_to_num(np.abs(step.details["z"]), nan=0.0)
    k_store, k_product = det.key_sets.index("store"), det.key_sets.index("product")
    j_a, j_b = det.features.index("a"), det.features.index("b")
    store_moved_a = np.zeros(batch.n, dtype=bool)
    store_moved_a[:50] = True
    product_moved_b = np.zeros(batch.n, dtype=bool)
    product_moved_b[25:75] = True
    judged = det.focus(step, {("store", "a"): store_moved_a, ("product", "b"): product_moved_b})
    assert judged is not None
    focused = judged.scores
    expected = z.reshape(batch.n, -1).max(axis=1)
    only_store = z.copy()
    only_store[:, [k for k in range(len(det.key_sets)) if k != k_store], j_a] = 0.0  # a: moved by the store
    both = only_store.copy()
    both[:, [k for k in range(len(det.key_sets)) if k != k_product], j_b] = 0.0  # b: moved by the product
    only_product = z.copy()
    only_product[:, [k for k in range(len(det.key_sets)) if k != k_product], j_b] = 0.0
    np.testing.assert_allclose(focused[:25], only_store[:25].reshape(25, -1).max(axis=1))
    np.testing.assert_allclose(focused[25:50], both[25:50].reshape(25, -1).max(axis=1))
    np.testing.assert_allclose(focused[50:75], only_product[50:75].reshape(25, -1).max(axis=1))
    np.testing.assert_allclose(focused[:75], np.minimum(focused[:75], expected[:75]))
    np.testing.assert_array_equal(focused[75:], step.scores[75:])
    assert (focused[:75] < expected[:75]).any()  # some events lost the view that made them extreme
    assert det.focus(step, {}) is None
    # The reasons name a view that counted, the one that gave the score.
    for i in np.flatnonzero(focused[:75] < expected[:75]):
        details = det.explain(batch, judged, int(i)).details
        assert abs(details["z"]) == pytest.approx(focused[i])
        if i < 50 and details["feature"] == "a":
            assert details["key_set"] == "store"  # a: moved by the store, only its view counts
        if 25 <= i < 75 and details["feature"] == "b":
            assert details["key_set"] == "product"
    np.testing.assert_array_equal(judged.details["z"], step.details["z"])  # as scored, for the runs


def test_an_event_expected_to_take_a_change_is_judged_from_the_moved_baseline(data):
    """``focus`` with ``shifted``: the key set's z on that feature is measured from its baseline
    moved by the expected change (z - delta / std); other events keep their scores."""
    batch, learn = data
    det = make_detector()
    det.commit(det.score(batch, learn))
    step = det.score(batch, learn)
    k, j = det.key_sets.index("product"), det.features.index("b")
    delta = np.full(batch.n, np.nan)
    delta[:20] = 0.7
    judged = det.focus(step, {}, {("product", "b"): delta})
    assert judged is not None
    focused = judged.scores
    z = step.details["z"].copy()
    z[:20, k, j] -= 0.7 / step.details["std"][:20, k, j]
    expected = np.nan_to_num(np.abs(z), nan=0.0).reshape(batch.n, -1).max(axis=1)
    np.testing.assert_allclose(focused[:20], expected[:20])
    np.testing.assert_array_equal(focused[20:], step.scores[20:])


# -- keys adapting to a level shift (Detector.score_adapting) ------------------------------------


def one_store(values: np.ndarray, t0: float = 1_700_000_000.0) -> FeatureBatch:
    n = len(values)
    return FeatureBatch(event_time=t0 + np.arange(n, dtype=np.float64), columns={"a": values}, keys={"store": np.full(n, "s", dtype=object)})


def baseline(det: ZScoreDetector) -> tuple[float, float]:
    """(mean, sd) the store's next event is scored against."""
    probe = det.score(one_store(np.array([6.0]), t0=1_700_002_000.0), np.zeros(1, dtype=bool))
    return float(probe.details["mean"][0, 0, 0]), float(probe.details["std"][0, 0, 0])


def adapted_store(later: np.ndarray, adapting: bool) -> tuple[tuple[float, float], tuple[float, float]]:
    """A store warm at level 1 (sd about 0.3, 300 events) re-learnt at level 6, keeping its
    spread, then shown ``later`` with every event flagged (learn all False): its baseline
    (mean, sd) before and after."""
    det = ZScoreDetector(features=("a",), key_sets=("store",), warmup=30, min_std=0.05)
    det.learn_one_batch(one_store(np.random.default_rng(0).normal(1.0, 0.3, 300)))
    det.relearn("store", "s", np.array([6.0]), np.array([0.09]), 1_700_000_300.0)
    before = baseline(det)
    batch = one_store(later, t0=1_700_001_000.0)
    flagged = np.zeros(batch.n, dtype=bool)
    det.commit(det.score_adapting(batch, flagged, {("store", "a"): np.full(batch.n, adapting)}))
    return before, baseline(det)


def test_an_adapting_key_learns_its_new_spread_from_flagged_and_rejected_events():
    # The new level's events spread 0.6, twice what the run of 8 suggested; all were flagged
    # against the narrow spread, and those past reject_z of the global statistics (about 17 sd
    # of everyone's level 1) are gross outliers for every other table.
    later = np.random.default_rng(1).normal(6.2, 0.6, 2000)
    (mean0, sd0), (mean, sd) = adapted_store(later, adapting=True)
    assert mean0 == pytest.approx(6.0) and sd0 < 0.32
    assert mean == pytest.approx(6.2, abs=0.05)
    # Winsorised at 3 sd of the estimate as it grows: close to the spread, a little under it.
    assert 0.5 < sd < 0.62, sd
    before, after = adapted_store(later, adapting=False)
    assert after == before  # nothing learned: every event was flagged


def test_an_adapting_key_holds_each_value_within_clip_z_sd():
    (mean0, sd0), (mean, _) = adapted_store(np.array([6.0 + 100 * 0.3]), adapting=True)
    # 100 sd off counts as adapt_clip_z (3) sd: the mean of 300 events moves by 3 sd / 301.
    assert mean - mean0 == pytest.approx(3.0 * sd0 / 301, rel=1e-9)


def test_learning_adapting_events_batch_equals_one_by_one():
    rng = np.random.default_rng(2)
    values = rng.normal(6.2, 0.6, 400)
    learn = rng.random(400) < 0.5
    adapting = np.arange(400) >= 100
    steps = []
    for sizes in ([400], [1] * 400, [37] * 10 + [30]):
        det = ZScoreDetector(features=("a",), key_sets=("store",), warmup=30)
        det.learn_one_batch(one_store(np.random.default_rng(0).normal(1.0, 0.3, 300)))
        det.relearn("store", "s", np.array([6.0]), np.array([0.09]), 1_700_000_300.0)
        batch = one_store(values, t0=1_700_001_000.0)
        scores, start = [], 0
        for size in sizes:
            part = batch.slice(start, start + size)
            step = det.score_adapting(part, learn[start : start + size], {("store", "a"): adapting[start : start + size]})
            det.commit(step)
            scores.append(step.scores)
            start += size
        steps.append(np.concatenate(scores))
    np.testing.assert_allclose(steps[1], steps[0], rtol=1e-9)
    np.testing.assert_allclose(steps[2], steps[0], rtol=1e-9)


def test_a_key_set_can_learn_by_its_own_mask():
    """``score_by_key_set``: the named key set's tables learn by its own mask (what a keyed task
    would learn without the pipeline's decision), the others and the global statistics by
    ``learn``; sequential, so a batch equals its events one by one."""
    batch = make_batch(600, seed=11)
    rng = np.random.default_rng(4)
    learn = rng.random(batch.n) < 0.7
    own = rng.random(batch.n) < 0.9

    def run(sizes: list[int], by_key_set: dict[str, np.ndarray]) -> tuple[np.ndarray, ZScoreDetector]:
        det, out, start = make_detector(), [], 0
        for size in sizes:
            part = batch.slice(start, start + size)
            step = det.score_by_key_set(part, learn[start : start + size], {}, {ks: m[start : start + size] for ks, m in by_key_set.items()})
            det.commit(step)
            out.append(step.scores)
            start += size
        return np.concatenate(out), det

    by_product = {"product": own}
    one_by_one, _ = run([1] * batch.n, by_product)
    batched, _ = run([600], by_product)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-9)
    # Without masks it is score_adapting with nothing adapting; the masks change what was learned.
    plain, _ = run([600], {})
    reference = make_detector()
    np.testing.assert_array_equal(plain, reference.score(batch, learn).scores)
    assert not np.allclose(batched, plain)
    # A key set's own mask equal to ``learn`` is no mask at all.
    same, _ = run([600], {"product": learn})
    np.testing.assert_array_equal(same, plain)
