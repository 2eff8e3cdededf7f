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


class StateError(StreamDetectorError):
    """A state snapshot cannot be restored (unknown version, corrupt payload)."""
