"""Create the topics the daemon (or a demo, or a test) needs, and wait until they are usable.

Creating topics explicitly matters beyond convenience: auto-created topics get the broker's
default partition count, the embedded tansu broker has been reported to lose records
produced to topics it auto-creates, and a freshly created topic can take a moment to appear
in metadata. So: create, wait until the metadata shows every topic with its partitions,
and only then produce.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

__all__ = ["ensure_topics", "wait_for_topics"]

log = logging.getLogger(__name__)

_POLL_INTERVAL_S = 0.1


def ensure_topics(
    bootstrap_servers: str,
    topics: Mapping[str, int],
    client_config: Mapping[str, Any] | None = None,
    timeout: float = 30.0,
    config: Mapping[str, str] | None = None,
    *,
    replication_factor: int = 1,
) -> list[str]:
    """Create the missing topics of ``topics`` (name -> partitions) and wait until usable.

    ``config`` holds topic configs (``retention.ms``, ...) applied to each topic created here;
    ``client_config`` is extra librdkafka settings for the admin client (security, ...).
    Topics that already exist are left alone, whatever their partition count (a mismatch is
    logged): changing a live topic is an operator's decision. A topic created concurrently
    by someone else (TOPIC_ALREADY_EXISTS) counts as success.

    Returns the names created by this call. Raises RuntimeError naming the topic when a
    creation fails or a topic does not show up in metadata within ``timeout`` seconds.
    """
    _validate(topics, replication_factor)
    admin = _admin(bootstrap_servers, client_config)
    deadline = time.monotonic() + timeout
    existing = _partition_counts(_metadata(admin, bootstrap_servers, deadline))
    _warn_about_partition_mismatches(topics, existing)
    missing = {name: count for name, count in topics.items() if name not in existing}
    if missing:
        _create(admin, missing, dict(config or {}), replication_factor, _remaining(deadline))
    expected = {name: missing.get(name) for name in topics}
    _wait(admin, bootstrap_servers, expected, deadline)
    return sorted(missing)


def wait_for_topics(
    bootstrap_servers: str,
    topics: Iterable[str] | Mapping[str, int],
    client_config: Mapping[str, Any] | None = None,
    timeout: float = 30.0,
) -> None:
    """Wait until metadata lists every topic (with its partition count, if given as a mapping).

    Useful before producing to a topic someone else creates. Raises RuntimeError on timeout.
    """
    if isinstance(topics, Mapping):
        expected: dict[str, int | None] = dict(topics)
    else:
        expected = dict.fromkeys(topics)
    admin = _admin(bootstrap_servers, client_config)
    _wait(admin, bootstrap_servers, expected, time.monotonic() + timeout)


def _validate(topics: Mapping[str, int], replication_factor: int) -> None:
    """Fail early on arguments a broker would reject with a less readable error."""
    for name, partitions in topics.items():
        if not name:
            raise ValueError("topic names must not be empty")
        if partitions < 1:
            raise ValueError(f"topic {name!r}: partitions must be >= 1, got {partitions}")
    if replication_factor < 1:
        raise ValueError(f"replication_factor must be >= 1, got {replication_factor}")


def _admin(bootstrap_servers: str, client_config: Mapping[str, Any] | None) -> AdminClient:
    return AdminClient({**(client_config or {}), "bootstrap.servers": bootstrap_servers})


def _remaining(deadline: float) -> float:
    """Seconds left until ``deadline``, never less than a short request timeout."""
    return max(1.0, deadline - time.monotonic())


def _metadata(admin: AdminClient, bootstrap_servers: str, deadline: float) -> ClusterMetadata:
    """All-topics metadata. Never asks for named topics: that can auto-create them."""
    try:
        return admin.list_topics(timeout=_remaining(deadline))
    except KafkaException as exc:
        raise RuntimeError(f"cannot fetch metadata from {bootstrap_servers}: {exc}") from exc


def _partition_counts(metadata: ClusterMetadata) -> dict[str, int]:
    """name -> partition count for every topic the metadata lists without an error."""
    return {name: len(topic.partitions) for name, topic in metadata.topics.items() if topic.error is None and topic.partitions}


def _warn_about_partition_mismatches(topics: Mapping[str, int], existing: Mapping[str, int]) -> None:
    for name, wanted in topics.items():
        have = existing.get(name)
        if have is not None and have != wanted:
            log.warning("topic %s has %d partitions, not the %d asked for", name, have, wanted)


def _create(
    admin: AdminClient,
    topics: Mapping[str, int],
    config: dict[str, str],
    replication_factor: int,
    timeout: float,
) -> None:
    """Issue one CreateTopics request; TOPIC_ALREADY_EXISTS (a lost race) is fine."""
    new_topics = [NewTopic(name, num_partitions=count, replication_factor=replication_factor, config=config) for name, count in topics.items()]
    futures = admin.create_topics(new_topics, operation_timeout=timeout, request_timeout=timeout)
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                log.info("topic %s already exists (created concurrently)", name)
                continue
            raise RuntimeError(f"could not create topic {name!r}: {exc}") from exc
        log.info("created topic %s with %d partitions", name, topics[name])


def _wait(
    admin: AdminClient,
    bootstrap_servers: str,
    expected: Mapping[str, int | None],
    deadline: float,
) -> None:
    """Poll metadata until each topic is listed (with ``expected`` partitions, if not None).

    A failed metadata request is retried until the deadline: right after creating topics a
    broker may briefly be busy.
    """
    started = time.monotonic()
    pending = dict(expected)
    last_seen: dict[str, int] = {}
    problem = ""
    while True:
        try:
            last_seen = _partition_counts(_metadata(admin, bootstrap_servers, deadline))
            problem = ""
        except RuntimeError as exc:
            problem = f"; last metadata request failed: {exc}"
        pending = {name: count for name, count in pending.items() if name not in last_seen or (count is not None and last_seen[name] != count)}
        if not pending:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(_POLL_INTERVAL_S)
    details = ", ".join(f"{name!r} (want {count or 'any'} partitions, metadata shows {last_seen.get(name, 'none')})" for name, count in pending.items())
    waited = time.monotonic() - started
    raise RuntimeError(f"topics not visible in metadata after {waited:.1f}s: {details}{problem}")
