"""Lose nothing: a stalled broker, a poisoned stream and a TLS-only broker.

* Broker stall: the embedded broker is frozen (SIGSTOP) for 20 s under a live 2,000 events/s
  stream; the daemon must ride it out on its own, then score and commit every event.
* Poison stream: 10 % malformed records of every kind under exactly-once; each one is
  dead-lettered exactly once with the right reason and every valid event is scored once.
* TLS: a second tansu reachable only through a TLS proxy (socat); the daemon works over
  SSL and never prints the secrets it was given.

Each test prints its figures (run ``pytest -s`` to see them). Anomalies "expected" are what
an uninterrupted run flags: each input partition's records scored in offset order by a fresh
pipeline (``expected_anomalies``), which is what the daemon's per-partition pipelines compute.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from stream_detector.embedded_broker import EmbeddedBroker
from stream_detector.generator import produce_to_kafka
from stream_detector.runtime.topics import ensure_topics
from tests.daemon_helpers import (
    REPO_ROOT,
    DaemonProcess,
    by_partition,
    committed_offsets,
    expected_anomalies,
    free_port,
    generate_labelled,
    metric,
    read_topic,
    wait_until,
    write_config,
)
from tests.kafka_helpers import produce_all, unique_name

SCORED = 'stream_detector_events_total{outcome="scored"}'
INVALID = 'stream_detector_events_total{outcome="invalid"}'
ASSIGNED = "stream_detector_assigned_partitions"
# Kinds every run must catch once the calibrators have settled (see test_daemon.py).
OBVIOUS_KINDS = ("duplicate", "decimal_error", "refund_burst")
SETTLED_AFTER = 5_000


def _generate(count: int, seed: int) -> tuple[list[dict], dict[str, str]]:
    events, labels, _windows = generate_labelled(count, seed)
    return events, labels


def _dlq_total(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("stream_detector_dlq_total{"))


# -- 1. broker stall ---------------------------------------------------------------------------

STALL_EVENTS = 40_000
STALL_RATE = 2_000.0
STALL_SECONDS = 20.0
STALL_PARTITIONS = 3


def test_daemon_rides_out_a_20s_broker_stall(kafka_broker, make_topics, tmp_path):
    broker = kafka_broker.embedded
    if broker is None:
        pytest.skip("needs the embedded broker: an external broker ($KAFKA_BOOTSTRAP_SERVERS) cannot be SIGSTOPped")
    bootstrap = kafka_broker.bootstrap_servers
    input_topic = make_topics(partitions=STALL_PARTITIONS, prefix="stall-in")[0]
    output_topic, dlq_topic = make_topics(partitions=1, n=2, prefix="stall-out")
    group = unique_name("stall")
    events, labels = _generate(STALL_EVENTS, seed=23)
    config = write_config(
        tmp_path / "detector.yaml",
        bootstrap,
        input_topic,
        output_topic,
        dlq_topic,
        group,
        processing={"commit_interval_ms": 1000},
    )
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    produced: list[int] = []
    failures: list[BaseException] = []

    def produce() -> None:
        try:
            produced.append(produce_to_kafka(events, bootstrap, input_topic, rate=STALL_RATE))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            failures.append(exc)

    producer = threading.Thread(target=produce, name="stall-producer", daemon=True)
    suspended = False
    started = time.monotonic()
    try:
        daemon.wait_for(lambda m: metric(m, ASSIGNED) == STALL_PARTITIONS, 60, "the partitions to be assigned")
        producer.start()
        # Stall once the detectors are calibrated and the stream is in full flow.
        before = daemon.wait_for(lambda m: metric(m, SCORED) >= 12_000, 60, "12,000 scored events before the stall")
        broker.suspend()
        suspended = True
        stall_started = time.monotonic()
        time.sleep(STALL_SECONDS)
        broker.resume()
        suspended = False
        stall_ended = time.monotonic()
        assert daemon.process is not None and daemon.process.poll() is None, f"daemon died during the stall:\n{daemon.log_tail()}"
        producer.join(timeout=90)
        assert not producer.is_alive(), "the producer did not finish within 90 s of the stall"
        assert not failures, f"producing the stream failed: {failures[0]!r}"
        assert produced == [STALL_EVENTS]
        final = daemon.wait_for(lambda m: metric(m, SCORED) >= STALL_EVENTS, 60, f"{STALL_EVENTS} scored events after the stall")
        wait_until(
            lambda: sum(committed_offsets(bootstrap, group, input_topic, STALL_PARTITIONS)) == STALL_EVENTS,
            30,
            f"the committed offsets of {group} to reach {STALL_EVENTS}",
        )
        final = daemon.metrics()
        recovered_after = time.monotonic() - stall_ended
    finally:
        if suspended:
            broker.resume()
        code = daemon.stop()
    assert code == 0, daemon.log_tail()
    committed = committed_offsets(bootstrap, group, input_topic, STALL_PARTITIONS)
    assert sum(committed) == STALL_EVENTS, committed

    # What an uninterrupted run flags, from the input as the broker stored it.
    stored = read_topic(bootstrap, input_topic, expected=STALL_EVENTS, timeout=60)
    assert len(stored) == STALL_EVENTS
    expected = expected_anomalies(config, by_partition(stored))
    out = [orjson.loads(m.value()) for m in read_topic(bootstrap, output_topic, idle=3.0)]
    seen = Counter(a["event_id"] for a in out)
    duplicates = len(out) - len(seen)
    missing = sorted(set(expected) - set(seen))
    extra = sorted(set(seen) - set(expected))
    order = {e["event_id"]: i for i, e in enumerate(events)}
    obvious = {eid for eid, kind in labels.items() if kind in OBVIOUS_KINDS and order[eid] >= SETTLED_AFTER}
    obvious_flagged = obvious & set(expected)
    print(
        f"\n[broker stall] records in {STALL_EVENTS} (scored before the stall {metric(before, SCORED):.0f}), "
        f"broker frozen {stall_ended - stall_started:.1f} s, caught up {recovered_after:.1f} s after SIGCONT, "
        f"test {time.monotonic() - started:.0f} s\n"
        f"  scored (metric) {metric(final, SCORED):.0f} (re-scored after rewinds {metric(final, SCORED) - STALL_EVENTS:.0f}), "
        f"committed {sum(committed)} {committed}, recoveries {metric(final, 'stream_detector_recoveries_total'):.0f}, "
        f"dead-lettered {_dlq_total(final):.0f}\n"
        f"  anomalies expected {len(expected)} vs seen {len(seen)} (records {len(out)}, duplicates {duplicates}), "
        f"missing {len(missing)} {missing[:5]}, unexpected {len(extra)} {extra[:5]}\n"
        f"  labelled {'/'.join(OBVIOUS_KINDS)} after event {SETTLED_AFTER}: {len(obvious)}, "
        f"flagged by an uninterrupted run {len(obvious_flagged)}, in the output {len(obvious_flagged & set(seen))}"
    )
    assert metric(final, SCORED) >= STALL_EVENTS
    assert metric(final, ASSIGNED) == STALL_PARTITIONS, "the daemon did not get its partitions back"
    assert metric(final, INVALID) == 0 and _dlq_total(final) == 0
    assert not missing, f"{len(missing)} anomalies of an uninterrupted run are missing, e.g. {missing[:10]}"
    assert not extra, f"{len(extra)} anomalies an uninterrupted run does not flag, e.g. {extra[:10]}"
    assert obvious_flagged <= set(seen)
    # The obvious kinds are found at all (the same bar as test_daemon.py).
    assert len(obvious_flagged) >= 0.8 * len(obvious), (len(obvious_flagged), len(obvious))


# -- 2. poison stream ----------------------------------------------------------------------------

POISON_GOOD = 9_000  # one bad record after every 9 good ones: 10 % of the stream
MAX_RECORD_BYTES = 10_000


def _poison(event: dict, kind: int) -> tuple[bytes, str, str]:
    """A malformed record derived from a valid event: (value, what it is, expected dlq.reason)."""
    e = {**event, "event_id": f"bad-{event['event_id']}"}
    body = orjson.dumps(e)
    amount = orjson.dumps(e["amount"])
    cases = [
        (body[:-7], "truncated JSON", "invalid_json"),
        (body.replace(b'"store_id":"', b'"store_id":"\xff\xfe'), "non-UTF-8 bytes in a string", "not_utf8"),
        (orjson.dumps({**e, "amount": str(e["amount"])}), "amount as a string", "wrong_type"),
        (orjson.dumps({**e, "event_id": 12345}), "event_id as a number", "wrong_type"),
        (body.replace(b'"amount":' + amount, b'"amount":NaN'), "NaN token", "invalid_json"),
        (body.replace(b'"amount":' + amount, b'"amount":Infinity'), "Infinity token", "invalid_json"),
        (orjson.dumps({k: v for k, v in e.items() if k != "amount"}), "no amount", "missing_field"),
        (orjson.dumps({k: v for k, v in e.items() if k != "timestamp"}), "no timestamp", "missing_field"),
        (orjson.dumps({**e, "amount": 1e300}), "amount 1e300", "out_of_range"),
        (orjson.dumps({**e, "quantity": -5}), "negative quantity", "out_of_range"),
        (orjson.dumps({**e, "timestamp": 99_999_999_999_999}), "timestamp in the year 5138", "invalid_timestamp"),
        (orjson.dumps({**e, "note": "x" * 20_000}), "20 KB record", "oversized"),
        (orjson.dumps({**e, "version": 7}), "event version 7", "unsupported_version"),
        (b"[" + body + b"]", "an array", "not_an_object"),
    ]
    return cases[kind % len(cases)]


def test_poison_stream_is_dead_lettered_exactly_once(kafka_bootstrap, make_topics, tmp_path):
    input_topic = make_topics(partitions=3, prefix="poison-in")[0]
    output_topic, dlq_topic = make_topics(partitions=1, n=2, prefix="poison-out")
    group = unique_name("poison")
    events, labels = _generate(POISON_GOOD, seed=29)
    records: list[tuple[bytes, bytes]] = []
    expected_reasons: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    bad_ids: set[str] = set()
    for i, event in enumerate(events, start=1):
        key = event["store_id"].encode()
        records.append((key, orjson.dumps(event)))
        if i % 9 == 0:  # same key as the event before it: bad records reach every partition
            value, what, reason = _poison(event, i // 9 - 1)
            records.append((key, value))
            expected_reasons[reason] += 1
            kinds[what] += 1
            bad_ids.add(f"bad-{event['event_id']}")
    n_bad = sum(expected_reasons.values())
    assert n_bad * 10 == len(records)
    produce_all(kafka_bootstrap, input_topic, records)

    config = write_config(
        tmp_path / "detector.yaml",
        kafka_bootstrap,
        input_topic,
        output_topic,
        dlq_topic,
        group,
        processing={
            "guarantee": "exactly-once",
            "instance_id": unique_name("poison"),
            "commit_interval_ms": 500,
            "max_record_bytes": MAX_RECORD_BYTES,
        },
    )
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    started = time.monotonic()
    try:
        daemon.wait_for(lambda m: metric(m, SCORED) + metric(m, INVALID) >= len(records), 90, f"{len(records)} records handled")
        wait_until(
            lambda: sum(committed_offsets(kafka_bootstrap, group, input_topic, 3)) >= len(records),
            30,
            "every input offset committed",
        )
        final = daemon.metrics()
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_tail()
    committed = committed_offsets(kafka_bootstrap, group, input_topic, 3)

    dead = read_topic(kafka_bootstrap, dlq_topic, expected=None, idle=3.0, timeout=60, isolation_level="read_committed")
    dead_reasons = Counter(dict(m.headers())["dlq.reason"].decode() for m in dead)
    dead_sources = Counter((int(dict(m.headers())["dlq.source.partition"]), int(dict(m.headers())["dlq.source.offset"])) for m in dead)
    metric_reasons = Counter({k.split('reason="')[1].rstrip('"}'): int(v) for k, v in final.items() if k.startswith("stream_detector_dlq_total{") and v})
    stored = read_topic(kafka_bootstrap, input_topic, expected=len(records), timeout=60)
    expected = expected_anomalies(config, by_partition(stored))
    out = [orjson.loads(m.value()) for m in read_topic(kafka_bootstrap, output_topic, idle=3.0, isolation_level="read_committed")]
    seen = Counter(a["event_id"] for a in out)
    print(
        f"\n[poison stream, exactly-once] records in {len(records)} ({POISON_GOOD} valid, {n_bad} malformed), "
        f"test {time.monotonic() - started:.0f} s\n"
        f"  scored (metric) {metric(final, SCORED):.0f}, invalid (metric) {metric(final, INVALID):.0f}, "
        f"committed {sum(committed)} {committed}, recoveries {metric(final, 'stream_detector_recoveries_total'):.0f}\n"
        f"  dead-lettered: expected {n_bad}, metric {sum(metric_reasons.values())}, DLQ topic (read_committed) {len(dead)}, "
        f"distinct source offsets {len(dead_sources)}\n"
        f"  by reason expected {dict(sorted(expected_reasons.items()))}\n"
        f"  by reason in DLQ   {dict(sorted(dead_reasons.items()))}\n"
        f"  by reason (metric) {dict(sorted(metric_reasons.items()))}\n"
        f"  malformed kinds {dict(kinds)}\n"
        f"  anomalies expected {len(expected)} vs seen {len(seen)} (records {len(out)}, duplicates {len(out) - len(seen)})"
    )
    assert metric(final, SCORED) == POISON_GOOD
    assert metric(final, INVALID) == n_bad
    assert metric_reasons == expected_reasons
    assert len(dead) == n_bad
    assert dead_reasons == expected_reasons
    assert all(n == 1 for n in dead_sources.values()), [s for s, n in dead_sources.items() if n > 1][:10]
    for message in dead:
        headers = dict(message.headers())
        assert headers["dlq.source.topic"].decode() == input_topic
        assert headers["dlq.detail"]
        if headers["dlq.reason"] == b"oversized":
            assert len(message.value()) > MAX_RECORD_BYTES  # the original record, not cut
    assert sum(committed) == len(records), committed
    assert not bad_ids & set(seen), "a malformed record was scored"
    assert len(out) == len(seen), f"{len(out) - len(seen)} duplicate anomalies under exactly-once"
    assert set(seen) == set(expected), (sorted(set(expected) - set(seen))[:10], sorted(set(seen) - set(expected))[:10])


# -- 3. TLS ------------------------------------------------------------------------------------------

TLS_EVENTS = 5_000
SASL_SECRET = "s3cr3t-do-not-log"
KEY_SECRET = "another-s3cr3t"


class AdvertisingBroker(EmbeddedBroker):
    """An embedded tansu that tells clients to connect to ``advertised`` (a proxy in front of
    it) instead of its own listener; EmbeddedBroker advertises its listener only."""

    def __init__(self, advertised: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.advertised = advertised

    def _command(self, binary: str) -> list[str]:
        command = super()._command(binary)
        command[command.index("--advertised-listener-url") + 1] = self.advertised
        return command


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"openssl {' '.join(args)} failed:\n{result.stderr}"


def _make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=stream-detector test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr", cwd=directory)
    (directory / "server.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
        cwd=directory,
    )
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group we started (socat forks a child per connection), then SIGKILL."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def test_daemon_over_tls_keeps_its_secrets(tmp_path):
    for tool in ("socat", "openssl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: the TLS test needs openssl for certificates and socat as the TLS proxy (apt-get install socat openssl)")
    ca, cert, key = _make_certificates(tmp_path)
    proxy_port = free_port()
    proxy = f"127.0.0.1:{proxy_port}"
    tansu_port = free_port()
    broker = AdvertisingBroker(f"tcp://{proxy}", port=tansu_port, log_path=tmp_path / "tansu-tls.log")
    socat = None
    daemon = None
    started = time.monotonic()
    try:
        # The proxy first: the broker's own readiness check is then answered at the address it
        # advertises (socat accepts before tansu listens and connects on each new connection).
        with open(tmp_path / "socat.log", "wb") as socat_log:  # socat keeps its own handle
            socat = subprocess.Popen(
                [
                    "socat",
                    f"OPENSSL-LISTEN:{proxy_port},bind=127.0.0.1,reuseaddr,fork,cert={cert},key={key},verify=0",
                    f"TCP:127.0.0.1:{tansu_port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=socat_log,
                start_new_session=True,
            )
        wait_until(lambda: _listening(proxy_port) or socat.poll() is not None, 10, "socat to listen", poll=0.05)
        assert socat.poll() is None, (tmp_path / "socat.log").read_text()
        broker.start()

        tls = {"security.protocol": "SSL", "ssl.ca.location": str(ca)}
        input_topic, output_topic, dlq_topic = (unique_name(p) for p in ("tls-in", "tls-out", "tls-dlq"))
        ensure_topics(proxy, {input_topic: 1, output_topic: 1, dlq_topic: 1}, client_config=tls)

        # A client that does not speak TLS gets nothing from the proxy.
        plain_refused = None
        try:
            AdminClient({"bootstrap.servers": proxy, "log_level": 0}).list_topics(timeout=5)
        except KafkaException as exc:
            plain_refused = exc.args[0]
        assert plain_refused is not None, "a PLAINTEXT client got metadata through the TLS proxy"
        # And the certificate is really checked: without our CA the handshake fails.
        untrusted = None
        try:
            AdminClient({"bootstrap.servers": proxy, "security.protocol": "SSL", "log_level": 0}).list_topics(timeout=5)
        except KafkaException as exc:
            untrusted = exc.args[0]
        assert untrusted is not None, "an SSL client without the test CA trusted the proxy's certificate"

        group = unique_name("tls")
        config = write_config(
            tmp_path / "detector.yaml",
            proxy,
            input_topic,
            output_topic,
            dlq_topic,
            group,
            # librdkafka accepts ssl.key.password without a key; "debug: conf" makes every client
            # print its configuration to the log, which must show the secrets redacted.
            kafka={"client_config": {**tls, "ssl.key.password": KEY_SECRET, "debug": "conf"}, "sasl_password": SASL_SECRET},
            # One partition of 5,000 events: calibrate sooner than the default 2,000 scores so
            # the detectors alert on the events after that.
            scoring={"calibration_min_events": 500},
            logging={"format": "json", "level": "DEBUG"},
        )
        daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
        events, labels = _generate(TLS_EVENTS, seed=31)
        produced = produce_to_kafka(events, proxy, input_topic, client_config=tls)
        assert produced == TLS_EVENTS
        final = daemon.wait_for(lambda m: metric(m, SCORED) >= TLS_EVENTS, 80, f"{TLS_EVENTS} events scored over TLS")
        wait_until(
            lambda: sum(committed_offsets(proxy, group, input_topic, 1, client_config=tls)) == TLS_EVENTS,
            30,
            "every offset committed over TLS",
        )
        final = daemon.metrics()
        code = daemon.stop()
        assert code == 0, daemon.log_tail()

        stored = read_topic(proxy, input_topic, expected=TLS_EVENTS, client_config=tls)
        expected = expected_anomalies(config, by_partition(stored))
        out = [orjson.loads(m.value()) for m in read_topic(proxy, output_topic, idle=3.0, client_config=tls)]
        seen = Counter(a["event_id"] for a in out)
        shown = subprocess.run(
            [sys.executable, "-m", "stream_detector", "config", "show", "--config", str(config)],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        daemon_log = daemon.log_path.read_text(errors="replace")
        print(
            f"\n[TLS] records in {TLS_EVENTS} through socat TLS proxy {proxy} -> tansu :{broker.port}, "
            f"test {time.monotonic() - started:.0f} s\n"
            f"  scored (metric) {metric(final, SCORED):.0f}, committed {TLS_EVENTS}, dead-lettered {_dlq_total(final):.0f}\n"
            f"  anomalies expected {len(expected)} vs seen {len(seen)} (records {len(out)}, duplicates {len(out) - len(seen)}), "
            f"labelled in input {len(labels)}\n"
            f"  PLAINTEXT client to the proxy: {plain_refused}; SSL client without the CA: {untrusted}\n"
            f"  secrets in daemon log ({len(daemon_log)} chars): {SASL_SECRET in daemon_log or KEY_SECRET in daemon_log}, "
            f"in `config show`: {SASL_SECRET in shown.stdout + shown.stderr or KEY_SECRET in shown.stdout + shown.stderr}"
        )
        assert metric(final, SCORED) == TLS_EVENTS
        assert out, "no anomaly arrived over TLS"
        assert len(out) == len(seen)
        assert set(seen) == set(expected)
        # The daemon's clients really were configured with TLS and both secrets (redacted).
        assert "security.protocol = ssl" in daemon_log
        assert "ssl.key.password = [redacted]" in daemon_log
        assert "sasl.password = [redacted]" in daemon_log
        for secret in (SASL_SECRET, KEY_SECRET):
            assert secret not in daemon_log, f"{secret!r} is in the daemon log"
            assert secret not in shown.stdout and secret not in shown.stderr, f"{secret!r} is printed by config show"
        assert "**********" in shown.stdout
    finally:
        if daemon is not None and daemon.process is not None and daemon.process.poll() is None:
            daemon.stop()
        if socat is not None:
            _stop_group(socat)
        broker.stop()  # safe when it never started
