"""Logging: JSON lines when stderr is not a terminal (log shippers), readable text when it is."""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable

import orjson

_DIGITS = re.compile(r"\d+")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={...}`` fields (topic, partition, offset) are kept."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(payload, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s%(context)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_") and k != "context"}
        record.context = "".join(f" {k}={v}" for k, v in extras.items())
        return super().format(record)


def setup_logging(level: str = "INFO", fmt: str = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class RepeatFilter(logging.Filter):
    """Rate-limits repeated messages: the first of a kind passes, the repeats within
    ``interval_s`` are counted and dropped, and the first one after the interval passes with
    ``repeated`` (how many were dropped since the previous line) added to it.

    A kind is the logger, the level and ``kind(message)`` with its digits removed, so "after
    1999ms" and "after 2001ms" count as one. Kinds are kept for at most ``max_kinds`` (oldest
    dropped), so a stream of ever-new messages cannot grow the filter without bound.
    """

    def __init__(
        self,
        interval_s: float = 10.0,
        max_kinds: int = 256,
        clock: Callable[[], float] = time.monotonic,
        kind: Callable[[str], str] = str,
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._kind = kind
        self.max_kinds = max_kinds
        self._clock = clock
        self._lock = threading.Lock()
        self._kinds: dict[tuple[str, int, str], list[float]] = {}  # kind -> [last emitted, dropped since]

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, _DIGITS.sub("", self._kind(record.getMessage())))
        now = self._clock()
        with self._lock:
            seen = self._kinds.get(kind)
            if seen is not None and now - seen[0] < self.interval_s:
                seen[1] += 1
                return False
            dropped = int(seen[1]) if seen is not None else 0
            self._kinds.pop(kind, None)
            self._kinds[kind] = [now, 0]
            while len(self._kinds) > self.max_kinds:
                del self._kinds[next(iter(self._kinds))]
        if dropped:
            record.repeated = dropped
        return True


# "[thrd:...]: " and the broker names after it ("host:9092/1: ", "GroupCoordinator: host:9092: ").
_LIBRDKAFKA_AFTER = re.compile(r" ?\(after .*\)$")
_LIBRDKAFKA_WHERE = re.compile(r"\[thrd:[^\]]*\]: (?:(?:GroupCoordinator|[\w.\-]+:\d+(?:/\w+)?): )*")


def librdkafka_kind(message: str) -> str:
    """A librdkafka log line without the thread and broker it came from: "FAIL [rdkafka#consumer-1]
    [thrd:host:9092/1]: host:9092/1: Connect to ... failed (after 0ms in state CONNECT)" is one
    kind for every broker, whatever state and suppression count its "(after ...)" note gives."""
    return _LIBRDKAFKA_AFTER.sub("", _LIBRDKAFKA_WHERE.sub("", message, count=1))
