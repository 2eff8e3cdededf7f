"""One small exception hierarchy; every error the daemon raises on purpose is one of these."""

from __future__ import annotations


class StreamDetectorError(Exception):
    """Base class for all stream-detector errors."""


class ConfigError(StreamDetectorError):
    """The configuration is invalid. The message names the key and the problem."""


class DecodeError(StreamDetectorError):
    """A record could not be decoded or validated. ``reason`` is a short, bounded label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DeliveryError(StreamDetectorError):
    """A produced record was not delivered. Keeps the librdkafka error for the caller."""

    def __init__(self, message: str, kafka_error: object | None = None) -> None:
        super().__init__(message)
        self.kafka_error = kafka_error


# Why a snapshot (or one part of it) was not restored: the closed label set of
# stream_detector_state_restore_failures_total{reason}.
STATE_FAILURE_REASONS = ("corrupt", "unsupported_format", "incompatible", "unsigned", "bad_signature", "incomplete")


class StateError(StreamDetectorError):
    """A state snapshot cannot be restored. ``reason`` is one of ``STATE_FAILURE_REASONS``:
    corrupt (unreadable bytes), unsupported_format (an unknown or a pickle format),
    incompatible (does not fit the configured detector), unsigned / bad_signature (a pickled
    River model without a valid HMAC), incomplete (a shard of keys the checkpoint names is not
    in the changelog)."""

    def __init__(self, message: str, reason: str = "incompatible") -> None:
        super().__init__(message)
        if reason not in STATE_FAILURE_REASONS:
            raise ValueError(f"unknown state failure reason {reason!r}")
        self.reason = reason


class UnrestorableStateError(StreamDetectorError):
    """A snapshot could not be restored and ``state.on_unreadable`` is ``fail``: the daemon stops
    (exit 1) rather than start any part of the partition fresh."""


class StalledError(StreamDetectorError):
    """The daemon makes no progress (``processing.max_rewinds_without_progress`` rewinds in a
    row, or nothing committed for ``processing.max_stall_s`` while work waits): it exits 1 so
    that whatever supervises it restarts it with fresh clients."""
