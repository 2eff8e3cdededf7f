"""A small PyTorch MLP autoencoder, scored in micro-batches and trained online on normal events.

The score of an event is how badly a network trained on recent *normal* events reconstructs it:
the mean squared reconstruction error over its observed features, in standardised space (higher
= more anomalous). It catches combinations the per-feature detectors miss (a plausible amount
with an implausible quantity and unit price, say).

Exact, batching-independent semantics (the detector contract in ``base.py``):

* learned events (``learn`` true) go into a training buffer, in order;
* every time the buffer holds ``train_batch_size`` events, the standardisation statistics are
  updated with the buffer, then ``train_steps`` full-batch Adam steps are taken on it (masked MSE)
  and the buffer is cleared;
* event ``i`` is scored with the weights and statistics after every training triggered by
  learned events before ``i``; until ``warmup_events`` events were learned (or before the first
  training) its score is 0 and the calibrator deals with it.

So ``score`` cuts the batch at its training points and scores each segment in one forward pass.
Because ``score`` is pure, a training point inside the batch trains a *clone* of the network and
optimizer, which ``commit`` later adopts; a committed network is never modified in place. A batch
without a training point only extends the buffer and copies nothing.

Missing values (NaN, or a feature absent from the batch) are imputed with the running mean (0
after standardisation) and left out of both the loss and the score: a missing field is not
evidence of an anomaly, and the reconstruction of an imputed value means nothing.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from stream_detector.detectors.base import Detector, Explanation, Step
from stream_detector.errors import ConfigError, StateError
from stream_detector.features import DERIVED_FEATURES, FeatureBatch

STATE_VERSION = 1

# All the derived features: amount, quantity, price and their consistency, calendar.
DEFAULT_FEATURES = DERIVED_FEATURES

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# A feature that never varied (``is_refund`` before the first refund) would otherwise get a zero
# scale; the floor keeps its first change large but finite.
_MIN_STD = 1e-3
# Values this large are nonsense for these features (logs, ratios, flags); they are scored (and
# clipped) but kept out of the statistics, where squaring them would overflow.
_MAX_ABS_FOR_STATS = 1e12
# Standardised values are clipped so one absurd value (or an infinity) cannot overflow float32
# or wreck a training step; 100 standard deviations is anomalous enough for any ranking.
_Z_CLIP = 100.0


# --------------------------------------------------------------------------------------------
# Standardisation statistics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunningStats:
    """Per-feature count, mean and sum of squared deviations over the learned finite values.

    Merged one training buffer at a time (Chan et al.), which is numerically stable and gives the
    same result however the stream was batched, because the buffers themselves do not depend on
    batching.
    """

    count: np.ndarray  # float64 (d,)
    mean: np.ndarray  # float64 (d,)
    m2: np.ndarray  # float64 (d,)

    @classmethod
    def empty(cls, d: int) -> _RunningStats:
        return cls(count=np.zeros(d), mean=np.zeros(d), m2=np.zeros(d))

    def merged(self, rows: np.ndarray) -> _RunningStats:
        """These statistics plus the finite, sane values of ``rows`` (k, d)."""
        with np.errstate(invalid="ignore"):
            ok = np.abs(rows) <= _MAX_ABS_FOR_STATS  # False for NaN and inf too
        n_b = ok.sum(axis=0).astype(np.float64)
        vals = np.where(ok, rows, 0.0)
        mean_b = vals.sum(axis=0) / np.maximum(n_b, 1.0)
        m2_b = (np.where(ok, rows - mean_b, 0.0) ** 2).sum(axis=0)
        n = self.count + n_b
        safe_n = np.maximum(n, 1.0)
        delta = mean_b - self.mean
        return _RunningStats(
            count=n,
            mean=self.mean + delta * n_b / safe_n,
            m2=self.m2 + m2_b + delta**2 * self.count * n_b / safe_n,
        )

    def center_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and (floored) population standard deviation; (0, 1) for unseen features."""
        var = self.m2 / np.maximum(self.count, 1.0)
        scale = np.where(self.count > 0, np.maximum(np.sqrt(var), _MIN_STD), 1.0)
        return self.mean.copy(), scale


def _standardise(x: np.ndarray, center: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(z, observed)``: clipped z-scores with missing values at 0, and the observed mask."""
    observed = ~np.isnan(x)
    with np.errstate(invalid="ignore", over="ignore"):
        z = np.clip((x - center) / scale, -_Z_CLIP, _Z_CLIP)
    return np.where(observed, z, 0.0), observed


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------

# torch.optim.Adam's defaults.
_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8


def _row_errors(recon: torch.Tensor, z: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Mean squared error per row over its observed features (0 when none is observed)."""
    sq = (recon - z).square() * observed
    return sq.sum(dim=1) / observed.sum(dim=1).clamp_min(1.0)


def _layer_dims(n_in: int, hidden: tuple[int, ...]) -> list[int]:
    """Encoder ``n_in -> hidden...`` and the mirrored decoder back to ``n_in``."""
    return [n_in, *hidden, *reversed(hidden[:-1]), n_in]


def _linear_layers(n_layers: int) -> set[int]:
    """The layers without a tanh: the bottleneck (the middle one) and the output."""
    return {n_layers // 2 - 1, n_layers - 1}


def _forward(weights: list[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """The MLP: tanh after every layer but the bottleneck and the output (``_linear_layers``)."""
    n_layers = len(weights) // 2
    linear = _linear_layers(n_layers)
    h = z
    for k in range(n_layers):
        h = torch.nn.functional.linear(h, weights[2 * k], weights[2 * k + 1])
        if k not in linear:
            h = torch.tanh(h)
    return h


def _forward_numpy(flat: torch.Tensor, shapes: list[torch.Size], z: np.ndarray) -> np.ndarray:
    """``_forward`` in numpy, for the few rows an explanation needs: a handful of tiny matrix
    products, where each torch operation's fixed cost (and, on a GPU, a launch and a copy back)
    is most of the time. Computed in the network's dtype, as it scored (float32 by default);
    the weights are copied to the host once (not at all on the CPU). Returns float64."""
    params = flat.detach().cpu().numpy()
    weights = _views(params, shapes)
    n_layers = len(weights) // 2
    linear = _linear_layers(n_layers)
    h = z.astype(params.dtype, copy=False)
    for k in range(n_layers):
        h = h @ weights[2 * k].T + weights[2 * k + 1]
        if k not in linear:
            h = np.tanh(h)
    return h.astype(np.float64, copy=False)


class _Net:
    """The autoencoder's parameters and Adam moments, each one flat tensor.

    ``weights`` ``[W0, b0, W1, b1, ...]`` are views into ``flat``, made when first needed (eight
    views cost as much as a training step's Adam update). The network is so small that
    per-operation overhead, not arithmetic, is the cost, so one flat tensor per quantity keeps
    every step short: cloning (what keeps ``score`` pure) is three copies, and an Adam update is
    five operations whatever the number of layers. The gradient is computed by hand (the
    backward pass of ``_forward``, checked against autograd in the tests), which skips building
    an autograd graph for every step. The update is PyTorch's Adam (default betas/eps, no weight
    decay), written out.

    ``train_step`` works in place: only ever call it on a clone owned by the caller.
    """

    def __init__(self, flat: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, adam_steps: int, shapes: list[torch.Size]) -> None:
        self.flat = flat
        self.exp_avg = exp_avg
        self.exp_avg_sq = exp_avg_sq
        self.adam_steps = adam_steps
        self.shapes = shapes
        self._weights: list[torch.Tensor] | None = None

    @property
    def weights(self) -> list[torch.Tensor]:
        if self._weights is None:
            self._weights = _views(self.flat, self.shapes)
        return self._weights

    @classmethod
    def from_tensors(cls, weights: list[torch.Tensor], exp_avg: list[torch.Tensor], exp_avg_sq: list[torch.Tensor], adam_steps: int) -> _Net:
        """From per-layer tensors (the layout of snapshots)."""

        def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([t.detach().reshape(-1) for t in tensors])

        return cls(flatten(weights), flatten(exp_avg), flatten(exp_avg_sq), adam_steps, [w.shape for w in weights])

    @classmethod
    def initial(cls, n_in: int, hidden: tuple[int, ...], seed: int) -> _Net:
        """PyTorch's default Linear init from a seeded generator, in float64 on the CPU.

        The same seed gives the same network on every device, and the global RNG is untouched.
        """
        gen = torch.Generator().manual_seed(seed)
        dims = _layer_dims(n_in, hidden)
        weights = []
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            w = torch.empty(d_out, d_in, dtype=torch.float64)
            torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen)
            bound = 1.0 / math.sqrt(d_in)
            b = torch.empty(d_out, dtype=torch.float64).uniform_(-bound, bound, generator=gen)
            weights += [w, b]
        zeros = [torch.zeros_like(w) for w in weights]
        return cls.from_tensors(weights, zeros, zeros, 0)

    def to(self, device: torch.device, dtype: torch.dtype) -> _Net:
        """A copy on ``device`` in ``dtype``."""

        def move(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device, dtype, copy=True)

        return _Net(move(self.flat), move(self.exp_avg), move(self.exp_avg_sq), self.adam_steps, self.shapes)

    def per_layer(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` (the parameters or a moment) as per-layer views, in ``weights`` order."""
        return _views(flat, self.shapes)

    def snapshot(self) -> _Weights:
        """A copy of the weights alone (what a forward pass needs)."""
        return _Weights(self.flat.clone(), self.shapes)

    def clone(self) -> _Net:
        """An independent copy, weights and Adam moments, that may be trained in place."""
        return _Net(self.flat.clone(), self.exp_avg.clone(), self.exp_avg_sq.clone(), self.adam_steps, self.shapes)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return _forward(self.weights, z)

    def gradient(self, z: torch.Tensor, observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, d loss / d flat)`` of the masked reconstruction MSE on the batch ``z``."""
        weights = self.weights
        n_layers = len(weights) // 2
        linear = _linear_layers(n_layers)
        outputs = [z]
        for k in range(n_layers):
            h = torch.addmm(weights[2 * k + 1], outputs[-1], weights[2 * k].t())
            outputs.append(h if k in linear else torch.tanh(h))
        masked = (outputs[-1] - z).mul_(observed)  # observed is 0/1, so masked^2 = diff^2 * observed
        count = observed.sum().clamp_min(1.0)
        loss = masked.square().sum() / count
        grads: list[torch.Tensor] = [masked] * len(weights)
        g = masked.mul_(2.0 / count)  # d loss / d output
        for k in reversed(range(n_layers)):
            if k not in linear:
                g = g * (1.0 - outputs[k + 1].square())  # tanh' = 1 - tanh^2
            grads[2 * k] = torch.mm(g.t(), outputs[k])
            grads[2 * k + 1] = g.sum(0)
            if k:
                g = g @ weights[2 * k]
        return loss, torch.cat([t.flatten() for t in grads])

    def train_step(self, z: torch.Tensor, observed: torch.Tensor, lr: float) -> torch.Tensor:
        """One full-batch Adam step on the masked reconstruction MSE; returns the loss."""
        loss, g = self.gradient(z, observed)
        self.adam_steps += 1
        step_size = lr / (1 - _BETA1**self.adam_steps)
        bias_correction2_sqrt = math.sqrt(1 - _BETA2**self.adam_steps)
        self.exp_avg.lerp_(g, 1 - _BETA1)
        self.exp_avg_sq.mul_(_BETA2).addcmul_(g, g, value=1 - _BETA2)
        denom = (self.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(_EPS)
        self.flat.addcdiv_(self.exp_avg, denom, value=-step_size)
        return loss


class _Weights:
    """A copy of a network's weights, as ``_Net.weights``: views made when first needed (most
    copies, kept for explanations, are never read)."""

    def __init__(self, flat: torch.Tensor, shapes: list[torch.Size]) -> None:
        self.flat = flat
        self.shapes = shapes
        self._views: list[torch.Tensor] | None = None

    @property
    def weights(self) -> list[torch.Tensor]:
        if self._views is None:
            self._views = _views(self.flat, self.shapes)
        return self._views


def _views(flat: Any, shapes: list[torch.Size]) -> list[Any]:
    """Consecutive views of ``flat`` (a tensor or a numpy array) with the given shapes."""
    views, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        views.append(flat[offset : offset + size].reshape(tuple(shape)))
        offset += size
    return views


# --------------------------------------------------------------------------------------------
# Detector state
# --------------------------------------------------------------------------------------------


class _TypicalError:
    """The median per-event error of a training buffer after its training, computed when first
    read: only explanations and snapshots read it, and a forward pass per training point to
    compute it eagerly cost a sixth of the training."""

    def __init__(self, value: float | None = None, inputs: tuple[_Weights, torch.Tensor, torch.Tensor] | None = None) -> None:
        self._value = value
        self._inputs = inputs  # (weights after training, z, observed) until computed

    @property
    def value(self) -> float:
        if self._value is None:
            assert self._inputs is not None
            network, z, observed = self._inputs
            with torch.inference_mode():
                self._value = float(_row_errors(_forward(network.weights, z), z, observed).median())
            self._inputs = None
        return self._value


@dataclass(frozen=True)
class _State:
    """Everything the detector learned. Arrays and the network are never mutated in place."""

    net: _Net
    stats: _RunningStats  # over all trained events
    center: np.ndarray  # frozen standardisation, updated at each training
    scale: np.ndarray
    typical: _TypicalError  # of the last training buffer
    buffer: np.ndarray  # (k, d) raw rows learned since the last training, k < train_batch_size
    n_learned: int
    trainings: int
    last_train_loss: float | None


@dataclass(frozen=True)
class _Segment:
    """What scored events ``start:`` of a batch, kept so ``explain`` can reconstruct one event."""

    start: int
    network: _Net | _Weights  # a snapshot when the network was trained further in the batch
    center: np.ndarray
    scale: np.ndarray
    typical: _TypicalError


@dataclass(frozen=True)
class _Pending:
    """``Step.next_state``: the state after the batch, plus what ``explain`` needs."""

    state: _State
    segments: list[_Segment]
    active: np.ndarray  # bool (n,): scored by the network (not warming up)


def _to_numpy(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """float64 CPU copies, so snapshots are device- and dtype-independent (float32 is exact)."""
    return [t.detach().to("cpu", torch.float64).numpy().copy() for t in tensors]


def _resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when available; an unusable explicit device is a config error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"autoencoder.device: invalid device {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"autoencoder.device: {device!r} requested but CUDA is unavailable")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"autoencoder.device: {device!r} does not exist")
    elif dev.type != "cpu":
        raise ConfigError(f"autoencoder.device: {device!r} is not 'auto', 'cpu' or 'cuda[:N]'")
    return dev


class AutoencoderDetector(Detector):
    """Reconstruction error of an online-trained MLP autoencoder (see module docstring)."""

    name = "autoencoder"
    population = True
    state_version = STATE_VERSION

    def __init__(
        self,
        features: tuple[str, ...] | list[str] = DEFAULT_FEATURES,
        hidden: tuple[int, ...] | list[int] = (16, 4),
        lr: float = 1e-3,
        train_batch_size: int = 256,
        train_steps: int = 1,
        device: str = "auto",
        dtype: str = "float32",
        seed: int = 0,
        warmup_events: int = 512,
    ) -> None:
        self.features = tuple(features)
        self.hidden = tuple(int(h) for h in hidden)
        self.lr = float(lr)
        self.train_batch_size = int(train_batch_size)
        self.train_steps = int(train_steps)
        self.dtype = dtype
        self.seed = int(seed)
        self.warmup_events = int(warmup_events)
        self._validate()
        self._torch_dtype = _DTYPES[dtype]
        self._device = _resolve_device(device)
        self.device = str(self._device)
        self._state = self._fresh_state()
        # (batch, base state, [(learned rows key, state after that training)]) of the last score().
        self._round_cache: tuple[Any, Any, list] | None = None

    def _validate(self) -> None:
        if not self.features:
            raise ConfigError("autoencoder.features: at least one feature is needed")
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"autoencoder.hidden: positive layer sizes needed, got {self.hidden}")
        if not self.lr > 0:
            raise ConfigError(f"autoencoder.lr: must be > 0, got {self.lr}")
        if self.train_batch_size < 1 or self.train_steps < 1:
            raise ConfigError("autoencoder.train_batch_size and train_steps must be >= 1")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"autoencoder.dtype: one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.warmup_events < 0:
            raise ConfigError("autoencoder.warmup_events must be >= 0")

    # ---- metrics ---------------------------------------------------------------------------

    @property
    def last_train_loss(self) -> float | None:
        """Masked MSE of the last Adam step (standardised units), None before any training."""
        return self._state.last_train_loss

    @property
    def train_steps_total(self) -> int:
        """Adam steps taken so far (``train_steps`` per training point)."""
        return self._state.net.adam_steps

    @property
    def n_learned(self) -> int:
        """Events learned so far, trained on or still in the buffer."""
        return self._state.n_learned

    # ---- scoring ---------------------------------------------------------------------------

    def _fresh_state(self) -> _State:
        d = len(self.features)
        stats = _RunningStats.empty(d)
        center, scale = stats.center_scale()
        return _State(
            net=_Net.initial(d, self.hidden, self.seed).to(self._device, self._torch_dtype),
            stats=stats,
            center=center,
            scale=scale,
            typical=_TypicalError(0.0),
            buffer=np.empty((0, d)),
            n_learned=0,
            trainings=0,
            last_train_loss=None,
        )

    def _tensors(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        return [torch.from_numpy(a).to(self._device, self._torch_dtype) for a in arrays]

    def _training_points(self, buffered: int, n_learn: int) -> np.ndarray:
        """Ordinals (0-based, among this batch's learned events) of events that fill the buffer."""
        first = self.train_batch_size - buffered - 1
        return np.arange(first, n_learn, self.train_batch_size)

    def _errors(self, state: _State, x: np.ndarray) -> np.ndarray:
        """Per-event errors of rows ``x`` with one forward pass of ``state``'s network."""
        z, observed = self._tensors(*_standardise(x, state.center, state.scale))
        with torch.inference_mode():
            errors = _row_errors(state.net(z), z, observed)
        return errors.to("cpu", torch.float64).numpy()

    def _segment_scores(self, state: _State, x: np.ndarray, active: np.ndarray) -> np.ndarray:
        """One segment's scores: the network's errors where active (warmed up), else 0."""
        if active.all():
            return self._errors(state, x)
        out = np.zeros(x.shape[0])
        if active.any():
            out[active] = self._errors(state, x[active])
        return out

    def _train(self, state: _State, net: _Net, rows: np.ndarray) -> _State:
        """One training point: update the statistics, then Adam steps on the full buffer.

        ``net`` is the caller's private clone and is trained in place.
        """
        stats = state.stats.merged(rows)
        center, scale = stats.center_scale()
        # Not inference tensors, even when the caller scores under inference_mode: the clone is
        # updated in place, and a committed network may be trained (cloned) outside it later.
        with torch.inference_mode(False):
            z, observed = self._tensors(*_standardise(rows, center, scale))
            for _ in range(self.train_steps):
                loss = net.train_step(z, observed, self.lr)
            typical = _TypicalError(inputs=(net.snapshot(), z, observed))
        return replace(
            state,
            net=net,
            stats=stats,
            center=center,
            scale=scale,
            typical=typical,
            buffer=rows[:0],
            trainings=state.trainings + 1,
            last_train_loss=float(loss),
        )

    def guess(self, batch: FeatureBatch, learn: np.ndarray) -> np.ndarray | None:
        """Approximate scores: every event against the committed network, no training; None
        when the batch has no training point (then ``score`` is as cheap).

        The pipeline uses them only to propose its first round's masks (``score`` confirms),
        which saves training clones on a mask that would be thrown away.
        """
        learn = np.asarray(learn, dtype=bool)
        state = self._state
        if not self._training_points(state.buffer.shape[0], int(learn.sum())).size:
            # No training inside this batch: the exact scores cost the same, and a batch with
            # nothing to flag then settles in one round.
            return None
        if state.trainings == 0:
            return np.zeros(batch.n)
        warm = state.n_learned + np.cumsum(learn) - learn >= self.warmup_events
        return self._segment_scores(state, batch.matrix(self.features), warm)

    def score(self, batch: FeatureBatch, learn: np.ndarray) -> Step:
        """Score ``batch`` in order, training at each point the buffer fills (on a copy)."""
        learn = np.asarray(learn, dtype=bool)
        n = batch.n
        if learn.shape != (n,):
            raise ValueError(f"learn mask has shape {learn.shape}, expected ({n},)")
        x = batch.matrix(self.features)
        state = self._state
        learned_idx = np.flatnonzero(learn)
        points = self._training_points(state.buffer.shape[0], learned_idx.size)
        bounds = [0, *(learned_idx[points] + 1).tolist(), n]  # training k happens at bounds[k+1]
        learned_before = state.n_learned + np.cumsum(learn) - learn
        warm = learned_before >= self.warmup_events

        scores = np.zeros(n)
        active = np.zeros(n, dtype=bool)
        segments: list[_Segment] = []
        net = None  # our private clone, once the batch trains
        taken = 0  # learned events of this batch already moved into a training buffer
        # The pipeline scores a batch again with a mask that differs only from some event on:
        # trainings whose learned rows are unchanged are taken from the previous round.
        cache = self._round_cache
        previous = cache[2] if cache is not None and cache[0] is batch and cache[1] is self._state else []
        trained: list[tuple[bytes, _State]] = []
        for k in range(len(bounds) - 1):
            start, stop = bounds[k], bounds[k + 1]
            if stop > start:
                # Our clone is trained again after this segment: snapshot it for explain.
                network = state.net if net is None else net.snapshot()
                segments.append(_Segment(start, network, state.center, state.scale, state.typical))
                if state.trainings > 0:
                    active[start:stop] = warm[start:stop]
                    scores[start:stop] = self._segment_scores(state, x[start:stop], active[start:stop])
            if k < points.size:
                upto = int(points[k]) + 1
                key = learned_idx[:upto].tobytes()
                with torch.inference_mode(False):  # clones trained in place: not inference tensors
                    if k < len(previous) and previous[k][0] == key:
                        net = previous[k][1].net.clone()
                        state = replace(previous[k][1], net=net)
                    else:
                        if net is None:
                            net = state.net.clone()
                        buffer = np.concatenate([state.buffer, x[learned_idx[taken:upto]]])
                        state = self._train(state, net, buffer)
                    trained.append((key, replace(state, net=net.clone())))
                taken = upto
        self._round_cache = (batch, self._state, trained)

        state = replace(
            state,
            buffer=np.concatenate([state.buffer, x[learned_idx[taken:]]]),
            n_learned=self._state.n_learned + int(learned_idx.size),
        )
        return Step(scores=scores, next_state=_Pending(state, segments, active))

    def commit(self, step: Step) -> None:
        """Adopt the state of ``step`` (its network is never trained in place afterwards)."""
        pending = step.next_state
        if not isinstance(pending, _Pending):
            raise TypeError("commit() needs a Step returned by this detector's score()")
        self._state = pending.state
        self._round_cache = None

    # ---- explanations ----------------------------------------------------------------------

    def explain(self, batch: FeatureBatch, step: Step, i: int) -> Explanation:
        """Top-2 worst reconstructed observed features of event ``i``, in original units."""
        return self.explain_many(batch, step, [i])[0]

    def explain_many(self, batch: FeatureBatch, step: Step, indices: Sequence[int]) -> list[Explanation]:
        """``explain`` for several events: one forward pass per segment for all of them.

        Recomputed for the explained events alone, with the weights that scored them, so
        ``score`` does not pay for per-feature errors it would almost always throw away.
        """
        pending = step.next_state
        out = [Explanation(details={}, reasons=[]) for _ in indices]
        if not isinstance(pending, _Pending):
            return out
        starts = [s.start for s in pending.segments]
        by_segment: dict[int, list[int]] = {}
        for k, i in enumerate(indices):
            if pending.active[i]:
                by_segment.setdefault(bisect.bisect_right(starts, i) - 1, []).append(k)
        for s, ks in by_segment.items():
            seg = pending.segments[s]
            rows = [indices[k] for k in ks]
            x = np.stack([batch.column(f)[rows] for f in self.features], axis=1).astype(np.float64, copy=False)
            z, observed = _standardise(x, seg.center, seg.scale)
            recon_z = _forward_numpy(seg.network.flat, seg.network.shapes, z)
            for k, explanation in zip(ks, self._explanations(x, z, recon_z, observed, seg, step.scores[rows]), strict=True):
                out[k] = explanation
        return out

    def _explanations(self, x: np.ndarray, z: np.ndarray, recon_z: np.ndarray, observed: np.ndarray, seg: _Segment, errors: np.ndarray) -> list[Explanation]:
        """One explanation per row, the arithmetic done for all rows at once (an anomaly used to
        cost a dozen small numpy calls here, as much as scoring a hundred events)."""
        sq = np.where(observed, (recon_z - z) ** 2, -np.inf)
        order = np.argsort(-sq, axis=1, kind="stable")[:, :2].tolist()
        recon = (recon_z * seg.scale + seg.center).tolist()
        typical = seg.typical.value
        out = []
        for xs, sqs, recons, top, error in zip(x.tolist(), sq.tolist(), recon, order, errors.tolist(), strict=True):
            worst = [j for j in top if sqs[j] != -math.inf]
            ratio = error / max(typical, 1e-12)
            details = {
                "reconstruction_error": error,
                "typical_error": typical,
                "ratio_to_typical": ratio,
                "worst_features": [{"feature": self.features[j], "value": xs[j], "reconstructed": recons[j], "squared_error": sqs[j]} for j in worst],
            }
            if not worst:
                out.append(Explanation(details=details, reasons=[]))
                continue
            parts = [f"{self.features[j]} ({xs[j]:.4g}, expected {recons[j]:.4g})" for j in worst]
            reason = f"autoencoder reconstruction error {ratio:.1f}x the typical: {parts[0]} worst reconstructed" + (
                f", then {parts[1]}" if len(parts) > 1 else ""
            )
            out.append(Explanation(details=details, reasons=[reason]))
        return out

    # ---- persistence -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Picklable snapshot: float64 numpy weights and Adam moments, statistics, buffer."""
        s = self._state
        return {
            "version": STATE_VERSION,
            "features": list(self.features),
            "hidden": list(self.hidden),
            "model": _to_numpy(s.net.weights),
            "optimizer": {
                "steps": s.net.adam_steps,
                "exp_avg": _to_numpy(s.net.per_layer(s.net.exp_avg)),
                "exp_avg_sq": _to_numpy(s.net.per_layer(s.net.exp_avg_sq)),
            },
            "stats": {k: getattr(s.stats, k).copy() for k in ("count", "mean", "m2")},
            "center": s.center.copy(),
            "scale": s.scale.copy(),
            "typical": s.typical.value,
            "buffer": s.buffer.copy(),
            "n_learned": s.n_learned,
            "trainings": s.trainings,
            "last_train_loss": s.last_train_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore onto the configured device and dtype; ``StateError`` if it does not fit."""
        if state.get("version") != STATE_VERSION:
            raise StateError(f"autoencoder state version {state.get('version')!r} != {STATE_VERSION}")
        for key, mine in (("features", self.features), ("hidden", self.hidden)):
            if tuple(state.get(key, ())) != mine:
                raise StateError(f"autoencoder state {key} {state.get(key)!r} != {list(mine)}")
        try:
            self._state = self._restore(state)
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise StateError(f"autoencoder state cannot be restored: {exc!r}") from exc

    def _restore(self, state: dict[str, Any]) -> _State:
        d = len(self.features)
        template = _Net.initial(d, self.hidden, self.seed)
        opt = state["optimizer"]

        def layers(arrays: list[Any]) -> list[torch.Tensor]:
            tensors = [torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in arrays]
            if [t.shape for t in tensors] != [w.shape for w in template.weights]:
                raise ValueError("weight shapes do not match the configured network")
            return tensors

        def vector(a: Any) -> np.ndarray:
            return np.asarray(a, dtype=np.float64).reshape(d).copy()

        weights, exp_avg, exp_avg_sq = layers(state["model"]), layers(opt["exp_avg"]), layers(opt["exp_avg_sq"])
        net = _Net.from_tensors(weights, exp_avg, exp_avg_sq, int(opt["steps"])).to(self._device, self._torch_dtype)
        buffer = np.asarray(state["buffer"], dtype=np.float64).reshape(-1, d).copy()
        if buffer.shape[0] >= self.train_batch_size:
            raise ValueError(f"buffer holds {buffer.shape[0]} rows, train_batch_size is {self.train_batch_size}")
        loss = state["last_train_loss"]
        return _State(
            net=net,
            stats=_RunningStats(*(vector(state["stats"][k]) for k in ("count", "mean", "m2"))),
            center=vector(state["center"]),
            scale=vector(state["scale"]),
            typical=_TypicalError(float(state["typical"])),
            buffer=buffer,
            n_learned=int(state["n_learned"]),
            trainings=int(state["trainings"]),
            last_train_loss=None if loss is None else float(loss),
        )
