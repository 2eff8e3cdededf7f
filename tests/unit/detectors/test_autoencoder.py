"""AutoencoderDetector: sequential semantics, purity, persistence, robustness, and that it works."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from stream_detector.detectors.autoencoder import DEFAULT_FEATURES, AutoencoderDetector
from stream_detector.errors import ConfigError, StateError
from stream_detector.features import FeatureBatch

N = 2000
# Small buffers and warm-up so many training points fall inside the test batches.
SMALL = dict(train_batch_size=32, warmup_events=64, device="cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls gain nothing from intra-op threads and suffer badly on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_batch(n: int, seed: int = 0, start: float = 1.7e9, span: float = 7 * 86400.0) -> FeatureBatch:
    """Sales-like rows: amount = quantity * unit price, so the features are correlated."""
    rng = np.random.default_rng(seed)
    log_q = rng.normal(1.0, 0.5, n)
    log_p = rng.normal(3.0, 0.7, n)
    t = start + np.sort(rng.uniform(0, span, n))
    hour = np.mod(t, 86400) / 3600
    dow = np.mod(np.floor(t / 86400) + 3, 7)
    cols = {
        "log_quantity": log_q,
        "log_unit_price": log_p,
        "log_amount": log_q + log_p + rng.normal(0, 0.05, n),
        "log_price_ratio": rng.normal(0, 0.01, n),
        "is_refund": (rng.random(n) < 0.03).astype(float),
        "is_zero": np.zeros(n),
        "hour_sin": np.sin(2 * np.pi * hour / 24),
        "hour_cos": np.cos(2 * np.pi * hour / 24),
        "dow_sin": np.sin(2 * np.pi * dow / 7),
        "dow_cos": np.cos(2 * np.pi * dow / 7),
    }
    return FeatureBatch(event_time=t, columns=cols, keys={}, event_ids=np.arange(n).astype(object))


def run(det: AutoencoderDetector, batch: FeatureBatch, learn: np.ndarray, size: int) -> np.ndarray:
    """Score and commit ``batch`` in chunks of ``size``; the concatenated scores."""
    out = []
    for s in range(0, batch.n, size):
        step = det.score(batch.slice(s, s + size), learn[s : s + size])
        det.commit(step)
        out.append(step.scores)
    return np.concatenate(out)


def weights(det: AutoencoderDetector) -> list[np.ndarray]:
    return det.state_dict()["model"]


def assert_same_state(a: AutoencoderDetector, b: AutoencoderDetector) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["n_learned"] == sb["n_learned"]
    assert sa["optimizer"]["steps"] == sb["optimizer"]["steps"]
    np.testing.assert_array_equal(sa["buffer"], sb["buffer"])
    np.testing.assert_array_equal(sa["center"], sb["center"])
    np.testing.assert_array_equal(sa["scale"], sb["scale"])
    for key in ("exp_avg", "exp_avg_sq"):
        for x, y in zip(sa["optimizer"][key], sb["optimizer"][key], strict=True):
            np.testing.assert_array_equal(x, y)
    for x, y in zip(sa["model"], sb["model"], strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def data():
    batch = make_batch(N)
    learn = np.random.default_rng(1).random(N) < 0.85
    det = AutoencoderDetector(**SMALL)
    return batch, learn, run(det, batch, learn, 1), det


@pytest.mark.parametrize("size", [13, 300, N])
def test_batch_scoring_equals_one_by_one(data, size):
    batch, learn, one_by_one, det_one = data
    det = AutoencoderDetector(**SMALL)
    scores = run(det, batch, learn, size)
    assert det.train_steps_total == learn.sum() // 32  # dozens of training points
    np.testing.assert_allclose(scores, one_by_one, rtol=1e-5, atol=1e-7)
    assert_same_state(det, det_one)  # training itself is bit-identical
    assert (scores[200:] > 0).all()


def test_masked_events_are_not_learned(data):
    batch, learn, scores, det_masked = data
    # Only the learned events, all learned: the same state sequence.
    only = AutoencoderDetector(**SMALL)
    idx = np.flatnonzero(learn)
    sub = FeatureBatch(
        event_time=batch.event_time[idx],
        columns={k: v[idx] for k, v in batch.columns.items()},
        keys={},
        event_ids=batch.event_ids[idx],
    )
    only_scores = run(only, sub, np.ones(idx.size, dtype=bool), 100)
    assert_same_state(only, det_masked)
    np.testing.assert_allclose(scores[idx], only_scores, rtol=1e-5, atol=1e-7)

    before = weights(det_masked)
    step = det_masked.score(batch, np.zeros(N, dtype=bool))
    det_masked.commit(step)
    assert det_masked.n_learned == idx.size
    for x, y in zip(weights(det_masked), before, strict=True):
        np.testing.assert_array_equal(x, y)


def test_score_is_pure():
    batch = make_batch(600)
    det = AutoencoderDetector(**SMALL)
    run(det, batch.slice(0, 300), np.ones(300, dtype=bool), 300)
    snap = AutoencoderDetector(**SMALL)
    snap.load_state_dict(det.state_dict())
    learn = np.ones(300, dtype=bool)
    first = det.score(batch.slice(300, 600), learn)  # trains (on a copy) ~9 times
    second = det.score(batch.slice(300, 600), learn)
    np.testing.assert_array_equal(first.scores, second.scores)
    assert_same_state(det, snap)
    det.commit(first)
    assert det.train_steps_total > snap.train_steps_total
    assert det.last_train_loss is not None and np.isfinite(det.last_train_loss)


def test_rescoring_with_a_changed_mask_reuses_only_unchanged_trainings():
    """The pipeline re-scores a batch with flags changed from some event on; trainings before
    that event are reused from the previous call, later ones redone: same result as fresh."""
    batch = make_batch(900, seed=4)
    warm = AutoencoderDetector(**SMALL)
    run(warm, batch.slice(0, 300), np.ones(300, dtype=bool), 300)
    rest = batch.slice(300, 900)
    first_mask = np.ones(600, dtype=bool)
    second_mask = first_mask.copy()
    second_mask[[250, 400, 401]] = False  # changes after several training points
    reused = AutoencoderDetector(**SMALL)
    reused.load_state_dict(warm.state_dict())
    reused.score(rest, first_mask)
    again = reused.score(rest, second_mask)
    fresh = AutoencoderDetector(**SMALL)
    fresh.load_state_dict(warm.state_dict())
    expected = fresh.score(rest, second_mask)
    np.testing.assert_array_equal(again.scores, expected.scores)
    reused.commit(again)
    fresh.commit(expected)
    assert_same_state(reused, fresh)


def test_scoring_under_inference_mode_still_trains():
    batch = make_batch(300)
    learn = np.ones(300, dtype=bool)
    plain = AutoencoderDetector(**SMALL)
    expected = run(plain, batch, learn, 100)
    det = AutoencoderDetector(**SMALL)
    with torch.inference_mode():
        scores = run(det, batch, learn, 100)
    np.testing.assert_array_equal(scores, expected)
    assert_same_state(det, plain)


def test_state_round_trip_gives_identical_later_scores():
    batch = make_batch(1000)
    learn = np.ones(1000, dtype=bool)
    det = AutoencoderDetector(**SMALL)
    run(det, batch.slice(0, 500), learn[:500], 70)  # leaves a partly filled buffer
    assert 0 < len(det.state_dict()["buffer"]) < 32
    restored = AutoencoderDetector(**SMALL, seed=123)  # the seed must not matter after restore
    restored.load_state_dict(pickle.loads(pickle.dumps(det.state_dict())))
    a = run(det, batch.slice(500, 1000), learn[500:], 70)
    b = run(restored, batch.slice(500, 1000), learn[500:], 70)
    np.testing.assert_array_equal(a, b)
    assert_same_state(det, restored)


def test_state_errors():
    det = AutoencoderDetector(**SMALL)
    state = det.state_dict()
    with pytest.raises(StateError):
        det.load_state_dict({**state, "version": 2})
    with pytest.raises(StateError):
        AutoencoderDetector(**SMALL, features=DEFAULT_FEATURES[:-1]).load_state_dict(state)
    with pytest.raises(StateError):
        AutoencoderDetector(**SMALL, hidden=(8, 2)).load_state_dict(state)
    with pytest.raises(StateError):
        det.load_state_dict({k: v for k, v in state.items() if k != "optimizer"})


def test_deterministic_under_seed():
    batch = make_batch(500)
    learn = np.ones(500, dtype=bool)
    a = run(AutoencoderDetector(**SMALL, seed=7), batch, learn, 50)
    b = run(AutoencoderDetector(**SMALL, seed=7), batch, learn, 50)
    c = run(AutoencoderDetector(**SMALL, seed=8), batch, learn, 50)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[100:], c[100:])


def test_warmup_scores_zero():
    batch = make_batch(200)
    det = AutoencoderDetector(train_batch_size=32, warmup_events=100, device="cpu")
    scores = run(det, batch, np.ones(200, dtype=bool), 200)
    assert (scores[:100] == 0).all()
    assert (scores[100:] > 0).all()


def test_missing_features_do_not_crash_or_give_nan():
    base = make_batch(800)
    cols = {k: v.copy() for k, v in base.columns.items() if k != "log_quantity"}  # absent
    cols["log_price_ratio"][::3] = np.nan
    cols["hour_sin"][:] = np.nan  # never observed
    cols["log_amount"][5] = np.inf
    cols["log_unit_price"][7] = -1e300
    batch = FeatureBatch(base.event_time, cols, {}, base.event_ids)
    det = AutoencoderDetector(**SMALL)
    step = None
    for s in range(0, 800, 100):
        step = det.score(batch.slice(s, s + 100), np.ones(100, dtype=bool))
        assert np.isfinite(step.scores).all()
        det.commit(step)
    assert np.isfinite(det.last_train_loss)
    last = batch.slice(700, 800)
    assert np.isfinite(det.explain(last, step, 3).details["reconstruction_error"])
    # An event with nothing observed scores 0 rather than NaN.
    empty = FeatureBatch(np.zeros(1), {}, {}, np.array(["e"], dtype=object))
    assert det.score(empty, np.ones(1, dtype=bool)).scores.tolist() == [0.0]


def test_anomalies_score_far_higher_and_are_explained():
    train = make_batch(4000, seed=3)
    det = AutoencoderDetector(train_batch_size=64, train_steps=8, lr=3e-3, warmup_events=256)
    run(det, train, np.ones(4000, dtype=bool), 1000)
    # The hour after training: online training tracks the recent time-of-week features.
    test = make_batch(400, seed=4, start=train.event_time[-1], span=3600)
    normal = det.score(test, np.zeros(400, dtype=bool)).scores
    sd = train.columns["log_amount"].std()
    cols = dict(test.columns, log_amount=test.columns["log_amount"] + 5 * sd)
    shifted = FeatureBatch(test.event_time, cols, {}, test.event_ids)
    step = det.score(shifted, np.zeros(400, dtype=bool))
    assert (step.scores > normal).all()  # every event scores higher once its amount is off
    assert np.median(step.scores) > 4 * np.median(normal)  # 5-12x over seeds 0-4
    # Above all but the rarest normal events (refunds are 3% of them and unusual too).
    assert step.scores.min() > np.quantile(normal, 0.95)
    # amount = quantity * price, so blame can fall on price too: log_amount is always in the top 2.
    worst = [[f["feature"] for f in det.explain(shifted, step, i).details["worst_features"]] for i in range(400)]
    assert all("log_amount" in w for w in worst)
    assert sum(w[0] == "log_amount" for w in worst) > 200  # 249-380 over seeds 0-2
    why = det.explain(shifted, step, 0)
    assert why.reasons[0].startswith("autoencoder reconstruction error")
    assert "worst reconstructed" in why.reasons[0] and "log_amount (" in why.reasons[0]
    assert why.details["ratio_to_typical"] > 3


def test_explaining_many_events_equals_explaining_each(data):
    """One forward pass per segment for all explained events gives each event's explanation."""
    batch, learn, _scores, _det = data
    det = AutoencoderDetector(**SMALL)
    run(det, batch.slice(0, 1000), learn[:1000], 1000)
    part = batch.slice(1000, 1400)
    step = det.score(part, learn[1000:1400])  # trains 10 times inside: 11 segments
    indices = [399, 0, 5, 40, 41, 200, 5, 330]  # any order, repeats, across segments
    many = det.explain_many(part, step, indices)
    for i, explanation in zip(indices, many, strict=True):
        one = det.explain(part, step, i)
        assert explanation.reasons == one.reasons
        assert explanation.details.keys() == one.details.keys()
        np.testing.assert_allclose(explanation.details["reconstruction_error"], one.details["reconstruction_error"], rtol=0, atol=0)
        for a, b in zip(explanation.details["worst_features"], one.details["worst_features"], strict=True):
            assert a["feature"] == b["feature"]
            # The network runs in float32: a k-row and a 1-row matmul round differently.
            np.testing.assert_allclose([a["value"], a["reconstructed"], a["squared_error"]], [b["value"], b["reconstructed"], b["squared_error"]], rtol=1e-5)
    assert det.explain_many(part, step, []) == []


def test_device_resolution_and_config_errors():
    det = AutoencoderDetector()
    assert det.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert AutoencoderDetector(device="cpu").device == "cpu"
    for bad in [dict(device="tpu"), dict(dtype="float16"), dict(hidden=()), dict(lr=0)]:
        with pytest.raises(ConfigError):
            AutoencoderDetector(**bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError):
            AutoencoderDetector(device="cuda")


@pytest.mark.parametrize("hidden", [(16, 4), (8,), (12, 6, 3)])
def test_hand_written_training_step_equals_autograd_and_torch_adam(hidden):
    """The hand-written gradient and Adam update against autograd and ``torch.optim.Adam`` on
    the same weights: the masked reconstruction MSE of the same forward pass."""
    from stream_detector.detectors.autoencoder import _forward, _Net

    rng = np.random.default_rng(3)
    z = torch.from_numpy(rng.normal(size=(64, 10)))
    observed = torch.from_numpy((rng.random((64, 10)) > 0.1).astype(np.float64))
    net = _Net.initial(10, hidden, seed=1)
    reference = [w.detach().clone().requires_grad_() for w in net.weights]
    optimizer = torch.optim.Adam(reference, lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        loss = ((_forward(reference, z) - z).square() * observed).sum() / observed.sum()
        loss.backward()
        expected_grad = torch.cat([w.grad.reshape(-1) for w in reference])
        hand_loss, hand_grad = net.gradient(z, observed)
        torch.testing.assert_close(hand_loss, loss.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(hand_grad, expected_grad, rtol=1e-10, atol=1e-14)
        optimizer.step()
        net.train_step(z, observed, lr=1e-2)
        for mine, theirs in zip(net.weights, reference, strict=True):
            torch.testing.assert_close(mine, theirs.detach(), rtol=1e-10, atol=1e-13)


def documented_mlp(n_in: int, hidden: tuple[int, ...]) -> torch.nn.Sequential:
    """The network as the module docstring and ``_forward`` describe it, built from torch.nn
    layers: an encoder ``n_in -> hidden...``, a mirrored decoder back to ``n_in``, and a tanh
    after every layer but the bottleneck (the one that outputs ``hidden[-1]``) and the output."""
    encoder = [n_in, *hidden]
    decoder = [*reversed(hidden), n_in]
    sizes = list(zip(encoder[:-1], encoder[1:], strict=True)) + list(zip(decoder[:-1], decoder[1:], strict=True))
    layers: list[torch.nn.Module] = []
    for k, (d_in, d_out) in enumerate(sizes):
        layers.append(torch.nn.Linear(d_in, d_out, dtype=torch.float64))
        bottleneck, output = k == len(hidden) - 1, k == len(sizes) - 1
        if not (bottleneck or output):
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("hidden", [(16, 4), (8,), (12, 6, 3)])
def test_the_forward_is_the_documented_mlp(hidden):
    """``_forward`` (which scores) against the same network built from torch.nn layers."""
    from stream_detector.detectors.autoencoder import _forward, _Net

    z = np.random.default_rng(5).normal(size=(9, 10))
    net = _Net.initial(10, hidden, seed=3)
    for _ in range(2):
        net.train_step(torch.from_numpy(z), torch.ones(9, 10, dtype=torch.float64), lr=1e-2)
    mlp = documented_mlp(10, hidden)
    linears = [layer for layer in mlp if isinstance(layer, torch.nn.Linear)]
    assert len(net.weights) == 2 * len(linears)
    with torch.no_grad():
        for k, layer in enumerate(linears):
            layer.weight.copy_(net.weights[2 * k])
            layer.bias.copy_(net.weights[2 * k + 1])
        expected = mlp(torch.from_numpy(z))
    torch.testing.assert_close(_forward(net.weights, torch.from_numpy(z)), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("hidden", [(16, 4), (8,), (12, 6, 3)])
def test_numpy_forward_of_explanations_equals_the_torch_forward(hidden):
    """Explanations reconstruct their few rows in numpy (``_forward_numpy``): the same network
    as the torch forward that scores, float32 weights included."""
    from stream_detector.detectors.autoencoder import _forward, _forward_numpy, _Net

    z = np.random.default_rng(4).normal(size=(7, 10))
    net = _Net.initial(10, hidden, seed=2)
    for _ in range(3):  # trained weights, not only the initial ones
        net.train_step(torch.from_numpy(z), torch.ones(7, 10, dtype=torch.float64), lr=1e-2)
    expected = _forward(net.weights, torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(_forward_numpy(net.flat, net.shapes, z), expected, rtol=1e-12, atol=1e-14)
    single = net.to(torch.device("cpu"), torch.float32)  # the default dtype: computed in float32, as scored
    in_float32 = _forward(single.weights, torch.from_numpy(z).float()).double().numpy()
    got = _forward_numpy(single.flat, single.shapes, z)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, in_float32, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
