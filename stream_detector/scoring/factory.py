"""Build the scoring pipeline (detectors, calibrators, fusion) from the configuration."""

from __future__ import annotations

from stream_detector.alerting.feedback import FeedbackMemory
from stream_detector.config import Settings
from stream_detector.detectors.base import CollectiveDetector, Detector
from stream_detector.errors import ConfigError
from stream_detector.events.decode import EventSchema
from stream_detector.events.event_time import EventTimeGuard
from stream_detector.scoring.calibration import Calibrator, PassThrough, ScoreCalibrator
from stream_detector.scoring.level_shift import LevelShiftTracker
from stream_detector.scoring.pipeline import ScoringPipeline


def event_schema(settings: Settings) -> EventSchema:
    return EventSchema(
        key_fields=tuple(settings.schema.key_fields),
        feature_fields=tuple(settings.schema.feature_fields),
        max_record_bytes=settings.processing.max_record_bytes,
        max_abs_value=settings.schema.max_abs_amount,
        max_event_version=settings.processing.max_event_version,
        key_sets=_key_sets(settings),
    )


def _key_sets(settings: Settings) -> tuple[tuple[str, ...], ...]:
    sets = [tuple(ks.fields) for ks in settings.zscore.key_sets] if settings.zscore.enabled else []
    if settings.silence.enabled:
        sets.append(tuple(settings.silence.fields))
    return tuple(dict.fromkeys(sets))


def build_detectors(settings: Settings) -> list[Detector]:
    """The enabled detectors, heavy imports (torch, river) only for those that are on."""
    detectors: list[Detector] = []
    if settings.zscore.enabled:
        from stream_detector.detectors.zscore import ZScoreDetector

        z = settings.zscore
        features = tuple(dict.fromkeys(f for ks in z.key_sets for f in ks.features))
        detectors.append(
            ZScoreDetector(
                features=features,
                key_sets=tuple(ks.name for ks in z.key_sets),
                key_set_features={ks.name: tuple(ks.features) for ks in z.key_sets},
                key_set_seasonality={ks.name: tuple(ks.seasonality) for ks in z.key_sets},
                seasonal_warmup=z.seasonal_warmup,
                learning_prior=z.learning_prior,
                adapt_clip_z=z.level_shift.adapt_clip_z,
                warmup=z.warmup,
                min_std=z.min_std,
                min_std_by_feature=z.min_std_by_feature,
                max_keys=z.max_keys,
                key_ttl_seconds=z.key_ttl_seconds,
            )
        )
    if settings.duplicates.enabled:
        from stream_detector.detectors.duplicates import DuplicateDetector

        d = settings.duplicates
        detectors.append(DuplicateDetector(window_seconds=d.window_seconds, max_entries=d.max_entries, probability=d.probability))
    if settings.river.enabled:
        detectors.append(_build_river(settings))
    if settings.autoencoder.enabled:
        detectors.append(build_autoencoder(settings))
    return detectors


def build_autoencoder(settings: Settings, features: tuple[str, ...] | None = None) -> Detector:
    """The autoencoder detector from ``settings.autoencoder`` (``features`` overrides its list)."""
    import torch

    from stream_detector.detectors.autoencoder import AutoencoderDetector

    a = settings.autoencoder
    # The network is tiny: intra-op threads only add synchronisation (8x slower measured
    # on 2 cores for a 2000-row forward pass), and the other core serves librdkafka.
    torch.set_num_threads(a.cpu_threads)
    return AutoencoderDetector(
        features=tuple(features or a.features),
        hidden=tuple(a.hidden),
        lr=a.lr,
        train_batch_size=a.train_batch_size,
        train_steps=a.train_steps,
        warmup_events=a.warmup_events,
        device=a.device,
        seed=a.seed,
    )


def _build_river(settings: Settings) -> Detector:
    r = settings.river
    try:
        if r.model == "HalfSpaceTrees":
            from stream_detector.detectors.hst import HalfSpaceTreesDetector

            return HalfSpaceTreesDetector(features=tuple(r.features), scale=r.scale, seed=r.seed, **r.params)
        from stream_detector.detectors.river_model import RiverModelDetector

        key = settings.state.signing_key
        return RiverModelDetector(
            model=r.model,
            params=r.params,
            features=tuple(r.features),
            scale=r.scale,
            seed=r.seed,
            signing_key=None if key is None else key.get_secret_value().encode(),
        )
    except (TypeError, ValueError) as exc:
        # river.params is free-form (the model's own arguments), so the settings models cannot
        # check it: an unknown name or a bad value is a configuration error, not a traceback.
        raise ConfigError(f"river.params: {r.model} refuses {dict(r.params)}: {exc}") from None


def build_pipeline(settings: Settings) -> ScoringPipeline:
    detectors = build_detectors(settings)
    s = settings.scoring
    calibrators: dict[str, ScoreCalibrator] = {
        d.name: PassThrough()
        if d.outputs_probability
        else Calibrator(
            window=s.calibration_window,
            refresh=s.calibration_refresh,
            min_events=s.calibration_min_events,
            tail_quantile=s.tail_quantile,
        )
        for d in detectors
    }
    collective: list[CollectiveDetector] = []
    if settings.silence.enabled:
        from stream_detector.detectors.silence import SilenceDetector

        q = settings.silence
        collective.append(
            SilenceDetector(
                key_set="+".join(q.fields),
                expected_events=q.expected_events,
                min_events=q.min_events,
                min_hours=q.min_hours,
                check_every_s=q.check_every_s,
            )
        )
    p = settings.processing
    z, shifts = settings.zscore, settings.zscore.level_shift
    tracker = None
    if z.enabled and shifts.enabled:
        features = tuple(dict.fromkeys(f for ks in z.key_sets for f in ks.features))
        tracker = LevelShiftTracker(
            # Keyed sets only: the events of the keyless set in a row are many keys' events, and
            # one store's refund burst at a quiet hour would read as a shift of the whole stream.
            # A key set's features in the detector's column order (Detector.relearn reads them so).
            key_sets={ks.name: tuple(f for f in features if f in ks.features) for ks in z.key_sets if ks.fields},
            features=features,
            axis={ks.name: k for k, ks in enumerate(z.key_sets)},
            # The key fields (by position in the key) whose keys shift together.
            together={ks.name: tuple(ks.fields.index(f) for f in ks.moves_with) for ks in z.key_sets if ks.moves_with},
            lasting=shifts.lasting,
            min_z=shifts.min_z,
            mean_z=shifts.mean_z,
            adapt_events=shifts.adapt_events,
            pooled_mean_z=shifts.pooled_mean_z,
            gradual=tuple(name for name in shifts.gradual.key_sets if any(ks.name == name for ks in z.key_sets if ks.fields)),
            gradual_slack=shifts.gradual.slack,
            gradual_cap=shifts.gradual.cap,
            gradual_threshold=shifts.gradual.threshold,
        )
    pipeline = ScoringPipeline(
        detectors,
        calibrators,
        threshold=s.threshold,
        collective=collective,
        feedback=build_feedback(settings),
        event_time=EventTimeGuard(p.max_future_skew, p.future_timestamps),
        level_shifts=tracker,
    )
    # One pipeline holds the whole budget; the daemon shares it between its partitions.
    pipeline.max_state_bytes = settings.state.max_bytes
    return pipeline


def build_feedback(settings: Settings) -> FeedbackMemory | None:
    """A partition's feedback memory, when a feedback topic is configured."""
    a = settings.alerts
    if a.feedback_topic is None:
        return None
    return FeedbackMemory(ttl_seconds=a.feedback_ttl_seconds, margin=a.feedback_margin, max_recent=a.feedback_max_recent, max_rules=a.feedback_max_rules)
