"""Configuration: frozen pydantic-settings models loaded from YAML plus environment overrides.

Precedence (highest first): ``STREAM_DETECTOR_<SECTION>__<KEY>`` environment variables, the
YAML file given with ``--config``, the defaults below (the same values as
``config/detector.yaml``). Unknown keys and bad values are rejected with a message that names
the key; the CLI turns that into exit code 2.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from stream_detector.alerting.windows import AlertWindow, check_length
from stream_detector.errors import ConfigError
from stream_detector.events.event_time import DEFAULT_MAX_FUTURE_SKEW_S
from stream_detector.features import DERIVED_FEATURES

ENV_PREFIX = "STREAM_DETECTOR_"
ENV_NESTED_DELIMITER = "__"

# Features a detector may use: the raw numeric fields of a sale and the derived ones.
KNOWN_FEATURES = frozenset({"amount", "quantity", "unit_price", *DERIVED_FEATURES})


class Section(BaseModel):
    """Base for config sections: frozen, no unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


ClientValue = str | int | float | bool

# Kafka's rule for topic names: letters, digits, '.', '_' and '-', at most 249 characters.
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]+")
MAX_TOPIC_NAME_LENGTH = 249

# librdkafka settings the daemon sets itself, refused in the pass-through sections: they would
# silently replace a key of this file or undo the delivery guarantee.
MANAGED_CLIENT_SETTINGS = {
    "bootstrap.servers": "set kafka.bootstrap_servers instead",
    "metadata.broker.list": "set kafka.bootstrap_servers instead",
    "group.id": "set kafka.group_id instead",
    "transactional.id": "the daemon derives it from kafka.group_id and processing.instance_id",
    "enable.auto.commit": "the daemon commits offsets after each checkpoint",
    "enable.auto.offset.store": "the daemon stores offsets after each checkpoint",
}


def topic_name_problem(name: str) -> str | None:
    """Why Kafka would refuse ``name`` as a topic name; None if it is legal."""
    if not name:
        return "must not be empty"
    if name in (".", ".."):
        return f"{name!r} is not a legal topic name"
    if len(name) > MAX_TOPIC_NAME_LENGTH:
        return f"{len(name)} characters is more than the {MAX_TOPIC_NAME_LENGTH} Kafka allows"
    if not _TOPIC_NAME.fullmatch(name):
        bad = "".join(sorted({c for c in name if not _TOPIC_NAME.fullmatch(c)}))
        return f"{name!r} has characters Kafka does not allow in a topic name ({bad!r}); use letters, digits, '.', '_' and '-'"
    return None


def _legal_topic(value: str | None) -> str | None:
    problem = None if value is None else topic_name_problem(value)
    if problem:
        raise ValueError(problem)
    return value


class KafkaConfig(Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    input_topic: str = "sales"
    output_topic: str = "sales-anomalies"
    dlq_topic: str = "sales-dlq"
    group_id: str = Field(default="stream-detector", min_length=1)
    # Passed through to librdkafka for the consumer, producer and admin client alike
    # (security.protocol, sasl.*, ssl.*, ...). Values that look secret are masked when printed.
    client_config: dict[str, ClientValue] = Field(default_factory=dict)
    consumer_config: dict[str, ClientValue] = Field(default_factory=dict)
    producer_config: dict[str, ClientValue] = Field(default_factory=dict)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # Create missing input/output/dead-letter topics on start (handy for demos; production
    # clusters usually manage topics themselves).
    create_topics: bool = False
    topic_partitions: int = Field(default=3, ge=1)
    sasl_password: SecretStr | None = None

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers_look_like_host_port(cls, value: str) -> str:
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected HOST:PORT[,HOST:PORT...], got {value!r}")
        return value

    _topics_are_legal = field_validator("input_topic", "output_topic", "dlq_topic")(_legal_topic)

    @field_validator("client_config", "consumer_config", "producer_config")
    @classmethod
    def _no_managed_settings(cls, value: dict[str, ClientValue], info: ValidationInfo) -> dict[str, ClientValue]:
        for name in value:
            if name.lower() in MANAGED_CLIENT_SETTINGS:
                raise ValueError(f"{name!r} is not allowed here: {MANAGED_CLIENT_SETTINGS[name.lower()]}")
        return value


class ProcessingConfig(Section):
    # at-least-once: anomalies are flushed before offsets are committed (a crash can repeat
    # up to one commit interval). exactly-once: anomalies, dead letters, state snapshots and
    # offsets are committed in one Kafka transaction.
    guarantee: Literal["at-least-once", "exactly-once"] = "at-least-once"
    # How often offsets and state snapshots are committed (a checkpoint). Also the delay
    # before exactly-once anomalies become visible to read_committed consumers.
    commit_interval_ms: int = Field(default=2000, ge=10, le=600_000)
    # Start a checkpoint as soon as the input goes quiet after a burst (at least batch_size
    # records, no record for max_wait_ms, a quarter of the interval since the last one).
    checkpoint_when_caught_up: bool = True
    # Identifies this instance across restarts: the transactional.id is
    # "<group_id>-<instance_id>". Default: the host name (stable in a StatefulSet).
    instance_id: str | None = None
    # One micro-batch: what has arrived, up to batch_size records per partition; when nothing
    # has, the loop waits up to max_wait_ms for a first record before its periodic work.
    # Every detector (the autoencoder included) scores a micro-batch in one pass.
    batch_size: int = Field(default=2000, ge=1, le=100_000)
    max_wait_ms: int = Field(default=50, ge=1, le=60_000)
    max_record_bytes: int = Field(default=1_048_576, ge=256)
    # Events whose top-level "version" field is above this go to the dead-letter topic.
    max_event_version: int = Field(default=1, ge=1)
    # Event time guard (seconds): an event dated more than this ahead of max(the partition's
    # watermark, the wall clock) would move every event-time clock (z-score TTL, silence
    # timers, duplicates window) with it. null: no guard.
    max_future_skew: float | None = Field(default=DEFAULT_MAX_FUTURE_SKEW_S, gt=0, allow_inf_nan=False)
    # Such an event goes to the dead-letter topic (reason future_timestamp), or with "clamp" is
    # scored at the partition's watermark and its record notes the original time.
    future_timestamps: Literal["dead_letter", "clamp"] = "dead_letter"
    # Liveness. A failure rewinds every partition to its last checkpoint; this many rewinds in a
    # row with no checkpoint committed in between (nor the input caught up) and the daemon
    # exits 1 rather than redo the same records for ever. /readyz says 503 while it rewinds.
    max_rewinds_without_progress: int = Field(default=10, ge=1, le=10_000)
    # Seconds work may wait for progress (a checkpoint committed, a rewind finished) before the
    # daemon exits 1: e.g. a broker replaced under it that never acknowledges its records.
    # /readyz says 503 after max(10 s, 3 commit intervals). null: wait for ever.
    max_stall_s: float | None = Field(default=300.0, ge=1, allow_inf_nan=False)


class SchemaConfig(Section):
    # Fields whose values, joined by "|", form an event's key (output record key, z-score key).
    key_fields: list[str] = Field(default_factory=lambda: ["store_id"], min_length=1)
    # Numeric fields read from events. amount is required, the others optional.
    feature_fields: list[str] = Field(default_factory=lambda: ["amount", "quantity", "unit_price"])
    max_abs_amount: float = Field(default=1e9, gt=0)

    @field_validator("feature_fields")
    @classmethod
    def _amount_is_required(cls, value: list[str]) -> list[str]:
        if "amount" not in value:
            raise ValueError("must include 'amount'")
        return value


class KeySetConfig(Section):
    # Event fields that form the key (empty: one global key for every event).
    fields: list[str]
    # Features scored per key of this set.
    features: list[str] = Field(min_length=1)
    # Seasonal baselines, coarse to fine: each event is scored against the finest one that is
    # warm for its key (hour_of_week, else hour_of_day, else the key, else global). UTC.
    seasonality: list[Literal["hour_of_day", "day_of_week", "hour_of_week"]] = Field(default_factory=list)
    # Fields (some of ``fields``) whose keys' levels move together: a level shift declared on
    # one key is taken by each key sharing these fields at its first event that fits the same
    # change of level, not after a run of its own (a product re-priced in USD is re-priced in
    # EUR and GBP too).
    moves_with: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _moves_with_fields(self) -> KeySetConfig:
        stray = [f for f in self.moves_with if f not in self.fields]
        if stray:
            raise ValueError(f"moves_with names {stray}, which are not among the key set's fields {self.fields}")
        if self.moves_with and len(set(self.moves_with)) == len(set(self.fields)):
            raise ValueError("moves_with must leave out at least one of the key set's fields (its keys would all be one key)")
        return self

    @field_validator("features")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        return _check_features(value)

    @field_validator("seasonality")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"lists a period twice: {value}")
        return value

    @property
    def name(self) -> str:
        return "+".join(self.fields) or "global"


def _default_key_sets() -> list[KeySetConfig]:
    return [
        # A store's baskets, by hour of day and then by hour of week once those are learned.
        KeySetConfig(fields=["store_id"], features=["log_amount", "log_quantity"], seasonality=["hour_of_day", "hour_of_week"]),
        # Per currency: the same product sells at a different number in GBP than in USD.
        KeySetConfig(fields=["product_id", "currency"], features=["log_unit_price", "log_quantity"], moves_with=["product_id"]),
        # A customer's spending, where the event names one (loyalty card, login).
        KeySetConfig(fields=["customer_id"], features=["log_amount"]),
        KeySetConfig(fields=[], features=["log_price_ratio"]),
    ]


class GradualShiftConfig(Section):
    # Key sets (by name, e.g. store_id) whose keys are watched for gradual shifts. Not the
    # product keys by default: on the generator, product keys without a change reached sums of
    # 248 (stores: 19.2, the threshold below).
    key_sets: list[str] = Field(default_factory=lambda: ["store_id"])
    # Each event adds min(z, cap) - slack to its key's sum (0 at least); a shift is declared
    # when the sum reaches threshold, so after threshold / (cap - slack) events at the soonest.
    # Above the largest sum of a store without a change on the generator: 19.2 (200,000 events
    # of seed 0, on a day when its amounts dip and come back; 10.6 at most elsewhere). At 15,
    # eight stores declared that day and, adapting, let 32 refund bursts through.
    slack: float = Field(default=0.5, ge=0)
    cap: float = Field(default=2.0, gt=0)
    threshold: float = Field(default=25.0, gt=0)

    @model_validator(mode="after")
    def _cap_above_slack(self) -> GradualShiftConfig:
        if self.cap <= self.slack:
            raise ValueError(f"cap ({self.cap}) must be above slack ({self.slack}), or no sum ever grows")
        return self


class LevelShiftConfig(Section):
    # A key whose events keep deviating in one direction on a feature has changed for good:
    # after ``lasting`` such events in a row (each at least min_z sd off, on average mean_z)
    # one level_shift record is published, the key re-learns from the new level and, for its
    # next adapt_events events, it is judged by its own key set only (neither the population
    # models nor the other key sets, whose baselines its new level also moved, flag it alone).
    enabled: bool = True
    # Longer than the short anomalies must last (a refund burst: 5 in a row on the generator),
    # so they keep alerting; every extra event is one more alert a lasting change costs.
    lasting: int = Field(default=8, ge=2)
    min_z: float = Field(default=2.0, gt=0)
    mean_z: float = Field(default=3.0, gt=0)
    adapt_events: int = Field(default=5000, ge=0)
    # Meanwhile the key's own baseline learns its every event, flagged or not, each held within
    # this many sd: a run of ``lasting`` events understates the new level's spread, and values
    # flagged against the understated spread would otherwise never widen it.
    adapt_clip_z: float = Field(default=3.0, gt=0)
    # Keys that move together (a key set's moves_with) pool their runs: declared once their
    # runs reach ``lasting`` events together, each run on average this far off. Above mean_z:
    # at 3 sd, 2-17 shifts per 60,000 generated events were declared on unchanged keys.
    pooled_mean_z: float = Field(default=4.5, gt=0)
    # Gradual shifts, too small for the run rule (a store whose baskets grow 3x moves its
    # quantities about 1.4 sd): a CUSUM per key and feature of the key sets named here.
    gradual: GradualShiftConfig = Field(default_factory=lambda: GradualShiftConfig())


class ZScoreConfig(Section):
    enabled: bool = True
    # Each key set keeps its own statistics per key and feature.
    key_sets: list[KeySetConfig] = Field(default_factory=_default_key_sets, min_length=1)
    # A key alerts from its own statistics once it has seen this many events; before that
    # the global statistics score it.
    warmup: int = Field(default=30, ge=2)
    # Events a seasonal bucket (key x hour, ...) must have seen before it replaces the key's
    # own baseline: a bucket's estimate from few events would make normal events look extreme.
    seasonal_warmup: int = Field(default=100, ge=2)
    # While a key learns, the global statistics count as this many events merged with the
    # key's own values so far (0: the global statistics alone).
    learning_prior: float = Field(default=30.0, ge=0)
    # Floor on the standard deviation (features are on a log scale: 0.05 ~ 5 %).
    min_std: float = Field(default=0.05, gt=0)
    # Per-feature floors that replace min_std: quantities are small integers, so a store
    # that always sold one item must not call two items a 10-sd event.
    # A unit price moves 10-30 % in a promotion: a 0.1 floor keeps that at a few sd while a
    # 5x price error stays at 16 sd.
    min_std_by_feature: dict[str, float] = Field(default_factory=lambda: {"log_quantity": 0.3, "log_unit_price": 0.1})
    max_keys: int = Field(default=100_000, ge=1)
    # A key not seen for this long (event time) is forgotten and restarts from the global
    # statistics. Null keeps keys until max_keys pushes them out.
    key_ttl_seconds: float | None = Field(default=7 * 24 * 3600.0, gt=0)
    # Lasting changes of a key's level (scoring/level_shift.py).
    level_shift: LevelShiftConfig = Field(default_factory=LevelShiftConfig)

    @model_validator(mode="after")
    def _gradual_key_sets(self) -> ZScoreConfig:
        gradual = self.level_shift.gradual
        keyed = [ks.name for ks in self.key_sets if ks.fields]
        unknown = [name for name in gradual.key_sets if name not in keyed]
        if unknown and "key_sets" in gradual.model_fields_set:
            raise ValueError(f"level_shift.gradual.key_sets names {unknown}, which are not among the keyed key sets {keyed}")
        return self  # the default names store_id: without that key set, none is watched


class DuplicateConfig(Section):
    enabled: bool = True
    # An event identical to an earlier one (every field but event_id) within this much event
    # time is a duplicate.
    window_seconds: float = Field(default=3600.0, gt=0)
    max_entries: int = Field(default=1_000_000, ge=1)
    # Tail probability given to an exact duplicate (how likely a genuine sale repeats every
    # field, timestamp included, to the millisecond).
    probability: float = Field(default=1e-9, gt=0, lt=1)


class SilenceConfig(Section):
    """Collective anomalies: a key that stops sending (a store whose sales stop)."""

    enabled: bool = True
    # Event fields of the key that is watched (one key set).
    fields: list[str] = Field(default_factory=lambda: ["store_id"], min_length=1)
    # Alert once the key's usual rate would have produced this many events since its last one
    # (the chance of such a silence is exp(-expected_events): 12 -> 6e-6).
    expected_events: float = Field(default=12.0, gt=0)
    # Alerts only for keys with this many events, after this many hours of stream.
    min_events: int = Field(default=100, ge=1)
    min_hours: float = Field(default=6.0, ge=0)
    # The timer looks every this many seconds of event time (alerts carry the exact time).
    check_every_s: float = Field(default=60.0, gt=0)


class RiverConfig(Section):
    enabled: bool = True
    # Any class of river.anomaly, by name; HalfSpaceTrees uses a vectorised engine that gives
    # River's exact scores.
    model: str = "HalfSpaceTrees"
    params: dict[str, Any] = Field(default_factory=lambda: {"n_trees": 25, "height": 10, "window_size": 1000})
    features: list[str] = Field(default_factory=lambda: ["log_amount", "log_quantity", "log_unit_price", "hour_sin", "hour_cos"])
    scale: bool = True
    seed: int = 42

    @field_validator("features")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        return _check_features(value)

    @field_validator("model")
    @classmethod
    def _is_river_anomaly_model(cls, value: str) -> str:
        import river.anomaly
        from river.base import AnomalyDetector

        def is_detector(obj: Any) -> bool:
            return isinstance(obj, type) and issubclass(obj, AnomalyDetector)

        if not is_detector(getattr(river.anomaly, value, None)):
            names = sorted(n for n in dir(river.anomaly) if is_detector(getattr(river.anomaly, n)))
            raise ValueError(f"unknown river.anomaly model {value!r}; choose one of {', '.join(names)}")
        return value


class AutoencoderConfig(Section):
    enabled: bool = True
    # The line's numbers and its refund/zero flags. No time of day or week: night-time sales
    # are rare, so a global network reconstructs their hour badly and flags ordinary night
    # sales; time context belongs to the seasonal z-scores and the trees.
    features: list[str] = Field(default_factory=lambda: ["log_amount", "log_quantity", "log_unit_price", "log_price_ratio", "is_refund", "is_zero"])
    hidden: list[int] = Field(default_factory=lambda: [16, 4], min_length=1)
    lr: float = Field(default=1e-3, gt=0, le=1)
    train_batch_size: int = Field(default=256, ge=1)
    train_steps: int = Field(default=1, ge=1)
    warmup_events: int = Field(default=512, ge=0)
    device: str = "auto"
    # torch intra-op threads on CPU; 1 is fastest for this small network.
    cpu_threads: int = Field(default=1, ge=1, le=256)
    seed: int = 0

    @field_validator("features")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        return _check_features(value)

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError("expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value


class ScoringConfig(Section):
    # An event is an anomaly when its fused score is above this. The fused score is
    # 1 - p, where p is the (Bonferroni-adjusted) smallest tail probability of the detectors:
    # 0.9999 means "fewer than 1 in 10,000 normal events look this extreme to some detector".
    threshold: float = Field(default=0.9999, gt=0, lt=1)
    # Calibration: each detector's raw scores over a reference window of recent events.
    calibration_window: int = Field(default=20_000, ge=100)
    calibration_refresh: int = Field(default=1_000, ge=1)
    # No alerts until a detector's calibrator has seen this many scores.
    calibration_min_events: int = Field(default=2_000, ge=10)
    # The tail above this quantile of the reference is fitted with a generalised Pareto
    # distribution, so probabilities smaller than 1/window stay meaningful.
    tail_quantile: float = Field(default=0.95, gt=0.5, lt=1)

    @model_validator(mode="after")
    def _window_holds_min_events(self) -> ScoringConfig:
        if self.calibration_min_events > self.calibration_window:
            raise ValueError("calibration_min_events must not exceed calibration_window")
        if self.calibration_refresh > self.calibration_window:
            raise ValueError("calibration_refresh must not exceed calibration_window")
        return self


class AlertsConfig(Section):
    # Calendar and promotion windows (event time): alerts inside are suppressed or annotated,
    # for every key or only those named in scope; the models keep learning throughout.
    windows: list[AlertWindow] = Field(default_factory=list)
    # Topic of window records added at run time (same fields as a window, or
    # {"action": "cancel", "name": ...}). null: windows come from this file only.
    control_topic: str | None = None
    # Topic where analysts mark anomalies: {"event_id": ..., "label": "false_positive"}.
    # null: no feedback.
    feedback_topic: str | None = None
    # A false positive silences the same pattern for the same key for this long (event time).
    feedback_ttl_seconds: float = Field(default=30 * 86400.0, gt=0)
    # ... unless a detector's tail probability is this many times smaller than it was in the
    # marked anomaly (something much more extreme than what the analyst saw).
    feedback_margin: float = Field(default=10.0, ge=1)
    # Per input partition: recent anomalies remembered for feedback, and rules kept.
    feedback_max_recent: int = Field(default=50_000, ge=1)
    feedback_max_rules: int = Field(default=10_000, ge=1)
    # The longest window accepted, from this file or the control topic (a longer control record
    # is refused, counted as too_long and logged): whoever can write the control topic cannot
    # silence alerts for years. Default 31 days.
    max_window_seconds: float = Field(default=31 * 86400.0, gt=0)

    _topics_are_legal = field_validator("control_topic", "feedback_topic")(_legal_topic)

    @field_validator("windows")
    @classmethod
    def _unique_names(cls, value: list[AlertWindow]) -> list[AlertWindow]:
        names = [w.name for w in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"window names must be unique; repeated: {twice}")
        return value

    @model_validator(mode="after")
    def _windows_within_max(self) -> AlertsConfig:
        for window in self.windows:
            check_length(window, self.max_window_seconds)
        return self


class StateConfig(Section):
    # Snapshot detector state per input partition to a compacted changelog topic, restore it on
    # start and on every partition assignment.
    enabled: bool = True
    # Default: "<group_id>-state". Created (compacted, one partition per input partition) if missing.
    changelog_topic: str | None = None
    restore_timeout_s: float = Field(default=120.0, gt=0)

    _topic_is_legal = field_validator("changelog_topic")(_legal_topic)
    # A snapshot (or one detector's part of it) that cannot be restored: "reset" counts and logs
    # it and starts what it held fresh from the committed offset; "fail" stops the daemon (exit 1).
    on_unreadable: Literal["reset", "fail"] = "reset"
    # HMAC-SHA256 key for snapshots of River models other than HalfSpaceTrees (only those are
    # pickled). Without it their state is not saved. Set it through the environment:
    # STREAM_DETECTOR_STATE__SIGNING_KEY.
    signing_key: SecretStr | None = Field(default=None, min_length=16)
    # Bytes the per-key state of this process may hold (z-score statistics, silence timers,
    # duplicate fingerprints; an estimate), shared by the partitions it owns. Over it, the least
    # recently seen keys are forgotten. null: bounded by the key counts only. >= 1 MiB.
    max_bytes: int | None = Field(default=512 * 1024 * 1024, ge=1024 * 1024)


class ScalingConfig(Section):
    # Every partition calibrates its detectors with one fit over all partitions' reference
    # windows, exchanged through the population topic, so that adding partitions neither delays
    # the first alerts nor thins the fits (docs/architecture.md). false: each partition
    # calibrates alone.
    share_calibration: bool = True
    # Default: "<group_id>-population". Created (compacted, one partition) if missing.
    population_topic: str | None = None

    _topic_is_legal = field_validator("population_topic")(_legal_topic)


class MetricsConfig(Section):
    enabled: bool = True
    # 0.0.0.0 serves every interface (needed in containers), unauthenticated: limit who can
    # reach the port, or use 127.0.0.1 (docs/security.md). A port in use is a ConfigError.
    host: str = "0.0.0.0"
    port: int = Field(default=9108, ge=0, le=65535)


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "text"] = "auto"


class Settings(BaseSettings):
    """The whole configuration. Build it with ``load_settings``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        frozen=True,
        case_sensitive=False,
        # Prefix aliases too: the schema section is aliased (``schema`` shadows a BaseModel name).
        env_prefix_target="all",
    )

    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    processing: ProcessingConfig = Field(default_factory=ProcessingConfig)
    schema_: SchemaConfig = Field(default_factory=SchemaConfig, alias="schema")
    zscore: ZScoreConfig = Field(default_factory=ZScoreConfig)
    duplicates: DuplicateConfig = Field(default_factory=DuplicateConfig)
    silence: SilenceConfig = Field(default_factory=SilenceConfig)
    river: RiverConfig = Field(default_factory=RiverConfig)
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; environment variables override it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _topics_are_distinct(self) -> Settings:
        check_topics(self)
        return self

    # The config section is called "schema", which BaseModel also names a (deprecated) class
    # method; this property deliberately shadows it, so mypy's override check is wrong here.
    @property
    def schema(self) -> SchemaConfig:  # type: ignore[override]
        return self.schema_


def check_topics(settings: Settings) -> None:
    """The daemon's topics are distinct: reading what it writes would loop, and a changelog
    or control topic shared with other records cannot be read back. ValueError naming the keys."""
    k, state, alerts = settings.kafka, settings.state, settings.alerts
    changelog_key = "state.changelog_topic"
    if state.enabled and state.changelog_topic is None:
        changelog_key = "state.changelog_topic (default: kafka.group_id + '-state')"
        _check_default_topic(k.group_id, "-state", "state.changelog_topic")
    scaling = settings.scaling
    population_key = "scaling.population_topic"
    if scaling.share_calibration and scaling.population_topic is None:
        population_key = "scaling.population_topic (default: kafka.group_id + '-population')"
        _check_default_topic(k.group_id, "-population", "scaling.population_topic")
    topics = [
        ("kafka.input_topic", k.input_topic),
        ("kafka.output_topic", k.output_topic),
        ("kafka.dlq_topic", k.dlq_topic),
        (changelog_key, (state.changelog_topic or f"{k.group_id}-state") if state.enabled else None),
        (population_key, population_topic(settings)),
        ("alerts.control_topic", alerts.control_topic),
        ("alerts.feedback_topic", alerts.feedback_topic),
    ]
    for i, (key, topic) in enumerate(topics):
        for other_key, other in topics[:i]:
            # Anomalies and dead letters in one topic is odd but harmless; nothing else may share.
            if topic is not None and topic == other and {key, other_key} != {"kafka.output_topic", "kafka.dlq_topic"}:
                raise ValueError(f"{key}: {topic!r} is also {other_key}; the daemon's topics must be distinct")


def _check_default_topic(group_id: str, suffix: str, key: str) -> None:
    problem = topic_name_problem(f"{group_id}{suffix}")
    if problem:
        default = f"the default {key} (kafka.group_id + '{suffix}')"
        raise ValueError(f"kafka.group_id: {default} is not a legal topic name ({problem}); set {key}")


def population_topic(settings: Settings) -> str | None:
    """The topic of the partitions' calibration summaries; None when calibration is not shared."""
    s = settings.scaling
    return (s.population_topic or f"{settings.kafka.group_id}-population") if s.share_calibration else None


def _check_features(value: list[str]) -> list[str]:
    unknown = [name for name in value if name not in KNOWN_FEATURES]
    if unknown:
        raise ValueError(f"unknown feature(s) {unknown}; known: {sorted(KNOWN_FEATURES)}")
    return value


SECTIONS = (
    "kafka",
    "processing",
    "schema",
    "zscore",
    "duplicates",
    "silence",
    "river",
    "autoencoder",
    "scoring",
    "alerts",
    "state",
    "scaling",
    "metrics",
    "logging",
)


def load_settings(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Load the YAML file (optional) and apply environment overrides; raise ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    environ = dict(os.environ if environ is None else environ)
    _reject_unknown_env(environ)
    try:
        return _build(data, environ)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path) if path else None, environ)) from None
    except SettingsError as exc:
        raise ConfigError(_explain_settings_error(exc, environ)) from None


def _explain_settings_error(exc: SettingsError, environ: dict[str, str]) -> str:
    """pydantic-settings names only the section when an environment value meant as JSON (a
    list, a mapping, a whole section) does not parse: find the variable. The value itself is
    not repeated, it may hold a secret."""
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        try:
            _build({}, {name: environ[name]})
        except SettingsError as own:
            key = ".".join(name[len(ENV_PREFIX) :].lower().split(ENV_NESTED_DELIMITER))
            cause = own.__cause__ if isinstance(own.__cause__, json.JSONDecodeError) else own
            example = '["a", "b"] or {"k": 1}'
            return f"{name}: {key} takes JSON from an environment variable (a list or mapping such as {example}), and this value is not JSON ({cause})"
        except ValidationError:
            continue
    return f"invalid configuration in the environment: {exc}"


def _build(data: dict[str, Any], environ: dict[str, str]) -> Settings:
    saved = dict(os.environ)
    try:
        # pydantic-settings reads os.environ; give it exactly the environment we were handed.
        os.environ.clear()
        os.environ.update(environ)
        return Settings(**data)
    finally:
        os.environ.clear()
        os.environ.update(saved)


# A YAML alias (*name) repeats an anchored value (&name); nested aliases multiply, so a few
# lines can stand for billions of values ("billion laughs"). A configuration needs few: a file
# whose aliases add more values than this once expanded, or refer to themselves, is refused.
MAX_YAML_ALIAS_EXPANSION = 10_000


class _AliasError(Exception):
    """Raised while loading: the aliases at ``where`` expand too far or form a cycle."""


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that measures what the composed document expands to before any
    Python object is built from it."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_alias_expansion(node)
        return node


def _check_alias_expansion(root: yaml.Node) -> None:
    sizes: dict[int, int] = {}  # id(node) -> values it stands for, expanded
    open_nodes: set[int] = set()

    def children(node: yaml.Node) -> list[tuple[str, yaml.Node]]:
        if isinstance(node, yaml.SequenceNode):
            return [(str(i), child) for i, child in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode):
            out = []
            for key, value in node.value:
                label = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
                out += [(label, key), (label, value)]
            return out
        return []

    def size(node: yaml.Node, where: list[str]) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        if id(node) in open_nodes:
            raise _AliasError(f"the YAML alias at {'.'.join(where)} refers to a value that contains it (anchored at line {node.start_mark.line + 1})")
        open_nodes.add(id(node))
        total = 1 + sum(size(child, [*where, label]) for label, child in children(node))
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    expanded = size(root, [])
    if expanded - len(sizes) > MAX_YAML_ALIAS_EXPANSION:
        # Name the deepest key whose value alone expands past the limit.
        where, node = [], root
        while isinstance(node, yaml.MappingNode) and node.value:
            label, child = max(((str(k.value), v) for k, v in node.value), key=lambda kv: sizes[id(kv[1])])
            if sizes[id(child)] <= MAX_YAML_ALIAS_EXPANSION:
                break
            where.append(label)
            node = child
        raise _AliasError(
            f"YAML aliases at {'.'.join(where)} expand to {sizes[id(node)]:,} values, more than the "
            f"{MAX_YAML_ALIAS_EXPANSION:,} aliases may add to a configuration; write the values out"
        )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text: byte {exc.object[exc.start]:#04x} at position {exc.start}") from None
    try:
        data = yaml.load(text, Loader=_ConfigLoader)  # _ConfigLoader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    except _AliasError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {path}: values nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    bad_keys = [key for key in data if not isinstance(key, str)]
    if bad_keys:
        raise ConfigError(f"config file {path}: top-level key {bad_keys[0]!r} is not a section name")
    return data


def _reject_unknown_env(environ: dict[str, str]) -> None:
    for name in environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX):
            continue
        section = upper[len(ENV_PREFIX) :].split(ENV_NESTED_DELIMITER, 1)[0].lower()
        if section not in SECTIONS:
            raise ConfigError(f"{name}: unknown config section {section!r}; sections are {', '.join(SECTIONS)}")


def format_validation_error(exc: ValidationError, path: str | None, environ: dict[str, str]) -> str:
    """One line per problem: the dotted key, what is wrong, and where the value came from."""
    env_names = {name.upper(): name for name in environ}
    lines = [f"invalid configuration{f' in {path}' if path else ''}:"]
    for error in exc.errors():
        parts = [str(part) for part in error["loc"]]
        loc = ".".join(parts)
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "value_error":  # our validators' own words, without "Value error, "
            message = str(error.get("ctx", {}).get("error", message))
        env_name = ENV_PREFIX + ENV_NESTED_DELIMITER.join(parts).upper()
        origin = f" (from environment variable {env_names[env_name]})" if env_name in env_names else ""
        # Checks across sections have no location: their message starts with the keys.
        lines.append(f"  {loc}: {message}{origin}" if loc else f"  {message}")
    return "\n".join(lines)


SECRET_MARKERS = ("password", "secret", "token", "key.pem", "ssl.key", "sasl.oauthbearer.client.secret")


def masked_dump(settings: Settings) -> dict[str, Any]:
    """The effective config as plain data, with secrets replaced by '**********'."""
    data = settings.model_dump(mode="json", by_alias=True)
    for section in ("client_config", "consumer_config", "producer_config"):
        conf = data["kafka"].get(section, {})
        for key in list(conf):
            if any(marker in key.lower() for marker in SECRET_MARKERS):
                conf[key] = "**********"
    if data["kafka"].get("sasl_password"):
        data["kafka"]["sasl_password"] = "**********"
    return data


def librdkafka_config(settings: Settings, role: Literal["consumer", "producer", "admin"]) -> dict[str, Any]:
    """The librdkafka settings for one client role: ours, then the user's pass-through."""
    kafka = settings.kafka
    conf: dict[str, Any] = {"bootstrap.servers": kafka.bootstrap_servers}
    conf.update(kafka.client_config)
    if kafka.sasl_password is not None:
        conf["sasl.password"] = kafka.sasl_password.get_secret_value()
    if role == "consumer":
        conf.update(kafka.consumer_config)
    elif role == "producer":
        conf.update(kafka.producer_config)
    return conf
