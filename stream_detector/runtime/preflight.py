"""Checks at start: the Kafka client settings the daemon will use, before it uses them.

librdkafka checks its settings only when a client is built, and the daemon builds its clients
inside a loop that retries while the broker is away, so an unknown property, a bad value or a
missing certificate would be retried for ever. Here every client the daemon will build is built
once with the same settings and dropped at once (it connects to nothing before that), and every
file a setting names is checked first. Each failure is a ``ConfigError`` that names the key of
the configuration to fix (``kafka.client_config.ssl.ca.location``), never a secret's value.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import Any, Literal

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from stream_detector.config import SECRET_MARKERS, Settings, librdkafka_config
from stream_detector.errors import ConfigError

Role = Literal["consumer", "producer", "admin"]
ROLES: tuple[Role, ...] = ("consumer", "producer", "admin")

# Settings that name a file librdkafka reads when the client is built or first connects.
_FILE_SUFFIXES = (".location", ".file")
_FILE_SETTINGS = frozenset({"sasl.kerberos.keytab"})
# ssl.ca.location: "probe" asks librdkafka to look in the usual system places.
_NOT_PATHS = {"ssl.ca.location": {"probe"}}
# Names librdkafka reports instead of the alias the user wrote.
_SYNONYMS = [
    {"linger.ms", "queue.buffering.max.ms"},
    {"acks", "request.required.acks"},
    {"compression.type", "compression.codec"},
    {"sasl.mechanism", "sasl.mechanisms"},
    {"retries", "message.send.max.retries"},
    {"max.in.flight", "max.in.flight.requests.per.connection"},
    {"bootstrap.servers", "metadata.broker.list"},
]
_PROPERTY = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+")
_CLIENT_NAMES = {"consumer": "Kafka consumer", "producer": "Kafka producer", "admin": "Kafka admin client"}


def check_kafka_settings(settings: Settings, roles: Iterable[Role] = ROLES) -> None:
    """Check the files the settings name, then build each client of ``roles`` with the
    settings the daemon gives it; ``ConfigError`` naming the key at the first problem."""
    roles = tuple(roles)
    for role in roles:
        check_files(settings, role)
    for role in roles:
        check_client(settings, role)


def user_settings(settings: Settings, role: Role) -> dict[str, tuple[str, Any]]:
    """librdkafka property -> (the configuration key that sets it, value) for what the user
    passed through to this client; the role's own section wins over client_config."""
    kafka = settings.kafka
    found: dict[str, tuple[str, Any]] = {name: (f"kafka.client_config.{name}", value) for name, value in kafka.client_config.items()}
    if kafka.sasl_password is not None:
        found["sasl.password"] = ("kafka.sasl_password", kafka.sasl_password.get_secret_value())
    own = {"consumer": kafka.consumer_config, "producer": kafka.producer_config, "admin": {}}[role]
    section = f"kafka.{role}_config"
    found.update({name: (f"{section}.{name}", value) for name, value in own.items()})
    return found


def check_files(settings: Settings, role: Role) -> None:
    """Every ``*.location`` / ``*.file`` setting names a file (or directory) this process can read."""
    for name, (key, value) in user_settings(settings, role).items():
        if not (name.endswith(_FILE_SUFFIXES) or name in _FILE_SETTINGS):
            continue
        path = str(value)
        if not path or path in _NOT_PATHS.get(name, ()):
            continue
        if not os.path.exists(path):
            raise ConfigError(f"{key}: {path}: no such file")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{key}: {path}: not readable by this process (uid {os.getuid()})")


def check_client(settings: Settings, role: Role) -> None:
    """Build the client as the daemon will and drop it; librdkafka refuses bad settings here."""
    conf = {**_client_configs()[role](settings), "logger": _quiet_logger()}
    try:
        if role == "consumer":
            Consumer(conf).close()
        elif role == "producer":
            Producer(conf)
        else:
            AdminClient(conf)
    except KafkaException as exc:
        raise ConfigError(_explain(exc.args[0].str() if exc.args else str(exc), settings, role)) from None
    except (TypeError, ValueError) as exc:  # confluent-kafka's own checks of value types
        raise ConfigError(_explain(str(exc), settings, role)) from None


def _client_configs() -> dict[Role, Callable[[Settings], dict[str, Any]]]:
    # The daemon's own functions, so what is checked is what it will build.
    from stream_detector.runtime.daemon import consumer_config, producer_config

    return {"consumer": consumer_config, "producer": producer_config, "admin": lambda s: librdkafka_config(s, "admin")}


def _explain(message: str, settings: Settings, role: Role) -> str:
    """``KEY: the Kafka <client> refuses it: <librdkafka's reason>``, the key found from the
    property the message names, else from the value it quotes, else the sections in play."""
    reason = re.sub(r"^Failed to create [a-z ]+: ", "", message.strip())
    user = user_settings(settings, role)
    for name, (_key, value) in user.items():
        if any(marker in name.lower() for marker in SECRET_MARKERS) and str(value):
            reason = re.sub(rf"(?<!\w){re.escape(str(value))}(?!\w)", "**********", reason)
    key = _key_named(reason, user)
    if key is None:
        sections = ["kafka.client_config", *([f"kafka.{role}_config"] if role != "admin" else [])]
        where = " or ".join(s for s in sections if getattr(settings.kafka, s.split(".")[1])) or "kafka.client_config"
        return f"{where}: the {_CLIENT_NAMES[role]} refuses these settings: {reason}"
    return f"{key}: the {_CLIENT_NAMES[role]} refuses it: {reason}"


def _key_named(reason: str, user: dict[str, tuple[str, Any]]) -> str | None:
    for mentioned in _PROPERTY.findall(reason):
        names = next((group for group in _SYNONYMS if mentioned in group), {mentioned})
        for name in names:
            if name in user:
                return user[name][0]
    for name, (key, value) in user.items():
        text = str(value)
        if len(text) >= 3 and text in reason and not any(marker in name.lower() for marker in SECRET_MARKERS):
            return key
    return None


def _quiet_logger() -> logging.Logger:
    """librdkafka's lines about the refused client would repeat what the ConfigError says."""
    quiet = logging.Logger("stream_detector.preflight.librdkafka", logging.CRITICAL)
    quiet.addHandler(logging.NullHandler())
    return quiet
