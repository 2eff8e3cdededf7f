"""Liveness tells the truth: a daemon that cannot go on exits non-zero, never lingers.

* Broker replaced: the daemon's broker is swapped for an empty one on the same address in the
  middle of a stream (its idempotent producer can no longer get records acknowledged). Within
  ``processing.max_stall_s`` it either commits again or exits 1; /readyz says 503 while it
  makes no progress, and it never sits there with /healthz 200.
* Rewinds without progress: every checkpoint fails the same way (snapshots larger than the
  producer's ``message.max.bytes``), so each rewind redoes the same records. After
  ``processing.max_rewinds_without_progress`` rewinds the daemon exits 1, with /readyz 503
  while it rewinds.
* Broker down: while the broker is away the log takes a few lines per 10 s, not dozens a
  second; a SIGTERM then ends the daemon within the shutdown bound, without a traceback.

Each test runs its own tansu (never the session's) where it stops or replaces the broker.
"""

from __future__ import annotations

import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest
import yaml

from stream_detector.embedded_broker import EmbeddedBroker
from stream_detector.runtime.topics import ensure_topics
from tests.daemon_helpers import DaemonProcess, committed_offsets, generate_labelled, metric, write_config
from tests.kafka_helpers import produce_all, unique_name

ASSIGNED = "stream_detector_assigned_partitions"
SCORED = 'stream_detector_events_total{outcome="scored"}'
COMMITS = 'stream_detector_commits_total{result="ok"}'
FAST = {"commit_interval_ms": 500, "batch_size": 500}


def _records(count: int, seed: int) -> list[tuple[bytes, bytes]]:
    events, _labels, _windows = generate_labelled(count, seed)
    return [(e["store_id"].encode(), orjson.dumps(e)) for e in events]


def _probe(port: int, path: str) -> int | None:
    """The status of GET ``path``, None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _log_lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


def _no_traceback(daemon: DaemonProcess) -> None:
    text = daemon.log_path.read_text(errors="replace")
    assert "Traceback" not in text, daemon.log_tail()


def _start(tmp_path: Path, bootstrap: str, topic: str, group: str, **sections: object) -> DaemonProcess:
    config = write_config(tmp_path / "detector.yaml", bootstrap, topic, f"{topic}-out", f"{topic}-dlq", group, **sections)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    daemon.wait_for(lambda m: metric(m, ASSIGNED) == 1, 60, "the partition to be assigned")
    return daemon


def _own_broker(port: int = 0) -> EmbeddedBroker:
    return EmbeddedBroker(port=port).start()


@pytest.mark.parametrize("ending", ["stall", "sigterm"])
def test_a_replaced_broker_makes_the_daemon_exit_non_zero_not_linger(tmp_path, ending):
    """stall: processing.max_stall_s ends it; sigterm: a SIGTERM while it waits ends it within
    the shutdown bound (it lingered, then died of SIGKILL, before)."""
    broker = _own_broker()
    replacement: EmbeddedBroker | None = None
    daemon: DaemonProcess | None = None
    topic = unique_name("replaced")
    group = unique_name("replaced")
    topics = {topic: 1, f"{topic}-out": 1, f"{topic}-dlq": 1}
    records = _records(12_000, seed=5)
    processing = {**FAST, "max_stall_s": 8 if ending == "stall" else 12}
    try:
        bootstrap = broker.bootstrap_servers
        ensure_topics(bootstrap, topics)
        daemon = _start(tmp_path, bootstrap, topic, group, processing=processing)
        produce_all(bootstrap, topic, records[:4000])
        daemon.wait_for(lambda m: metric(m, SCORED) >= 4000 and metric(m, COMMITS) >= 1, 60, "the first records scored and committed")
        # Mid-stream: more records arrive, then the broker is replaced by an empty one.
        produce_all(bootstrap, topic, records[4000:8000])
        time.sleep(0.5)
        port = broker.port
        broker.stop()
        replacement = _own_broker(port)
        ensure_topics(bootstrap, topics)
        produce_all(bootstrap, topic, records[8000:])
        replaced_at = time.monotonic()
        assert daemon.process is not None

        if ending == "sigterm":
            # Once it is visibly stuck (/readyz: no checkpoint for 6 s), or after 20 s.
            stuck = False
            while not stuck and time.monotonic() - replaced_at < 20 and daemon.process.poll() is None:
                stuck = _probe(daemon.port, "/readyz") == 503 and time.monotonic() - replaced_at > 5
                time.sleep(0.25)
            signalled = time.monotonic()
            code = daemon.stop(timeout=45)
            took = time.monotonic() - signalled
            print(f"\nbroker replaced, SIGTERM (stuck: {stuck}): exit code {code} after {took:.1f} s")
            # 1 where the final checkpoint could not be delivered (the work is redone on restart).
            assert code == (1 if stuck else code) and code in (0, 1), daemon.log_tail()
            assert took < 25, f"SIGTERM took {took:.0f} s\n{daemon.log_tail()}"
            return

        readiness: list[int | None] = []
        health: list[int | None] = []
        recovered = False
        while daemon.process.poll() is None and time.monotonic() - replaced_at < 40:
            readiness.append(_probe(daemon.port, "/readyz"))
            health.append(_probe(daemon.port, "/healthz"))
            if sum(committed_offsets(bootstrap, group, topic, 1)) > 0:
                recovered = True  # committing again on the new broker
                break
            time.sleep(0.25)
        code = daemon.process.poll()
        waited = time.monotonic() - replaced_at
        print(f"\nbroker replaced: exit code {code} after {waited:.1f} s; /readyz {_runs(readiness)}; /healthz {_runs(health)}")
        assert recovered or code is not None, f"the daemon lingered {waited:.0f} s without committing; /readyz {_runs(readiness)}\n{daemon.log_tail()}"
        if not recovered:
            assert code != 0, daemon.log_tail()
            assert 503 in readiness, f"/readyz never said 503 before the exit: {_runs(readiness)}\n{daemon.log_tail()}"
            assert "processing.max_stall_s" in daemon.log_tail(), daemon.log_tail()
    finally:
        if daemon is not None:
            daemon.stop(timeout=45)
            _no_traceback(daemon)
        if replacement is not None:
            replacement.stop()
        broker.stop()


def _runs(values: list[int | None]) -> str:
    """[200, 200, 503] as "200x2 503x1"."""
    out: list[str] = []
    for value in values:
        if out and out[-1].split("x")[0] == str(value):
            head, n = out[-1].split("x")
            out[-1] = f"{head}x{int(n) + 1}"
        else:
            out.append(f"{value}x1")
    return " ".join(out)


def test_rewinds_without_progress_are_bounded(kafka_bootstrap, make_topics, tmp_path):
    # Every snapshot is bigger than the producer may send: each checkpoint fails, the daemon
    # rewinds and redoes the same records, and nothing is ever committed.
    topic, output_topic, dlq_topic = make_topics(partitions=1, n=3, prefix="rewinds")
    config = write_config(
        tmp_path / "detector.yaml",
        kafka_bootstrap,
        topic,
        output_topic,
        dlq_topic,
        unique_name("rewinds"),
        processing={**FAST, "max_rewinds_without_progress": 3},
    )
    doc = yaml.safe_load(config.read_text())
    doc["kafka"]["producer_config"] = {"message.max.bytes": 1000}
    config.write_text(yaml.safe_dump(doc))
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    readiness: list[int | None] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            readiness.append(_probe(daemon.port, "/readyz"))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        daemon.wait_for(lambda m: metric(m, ASSIGNED) == 1, 60, "the partition to be assigned")
        watcher.start()
        produce_all(kafka_bootstrap, topic, _records(2000, seed=9))
        assert daemon.process is not None
        try:
            code: int | None = daemon.process.wait(30)
        except subprocess.TimeoutExpired:
            code = None
    finally:
        stop.set()
        daemon.stop()
    print(f"\nrewinds: exit code {code}; /readyz {_runs(readiness)}")
    assert code is not None, f"the daemon was still rewinding after 30 s; /readyz {_runs(readiness)}\n{daemon.log_tail()}"
    assert code == 1, daemon.log_tail()
    assert "processing.max_rewinds_without_progress" in daemon.log_tail(), daemon.log_tail()
    assert 503 in readiness, f"/readyz never said 503 while it rewound: {_runs(readiness)}"
    _no_traceback(daemon)


def test_broker_down_logs_a_few_lines_and_sigterm_exits_without_a_traceback(tmp_path):
    broker = _own_broker()
    daemon: DaemonProcess | None = None
    topic = unique_name("down")
    try:
        bootstrap = broker.bootstrap_servers
        ensure_topics(bootstrap, {topic: 1, f"{topic}-out": 1, f"{topic}-dlq": 1})
        daemon = _start(tmp_path, bootstrap, topic, unique_name("down"), processing=FAST)
        produce_all(bootstrap, topic, _records(3000, seed=7))
        daemon.wait_for(lambda m: metric(m, SCORED) >= 3000 and metric(m, COMMITS) >= 1, 60, "the records scored and committed")
        before = len(_log_lines(daemon.log_path))
        broker.stop()
        time.sleep(10)
        during = _log_lines(daemon.log_path)[before:]
        print(f"\nbroker down 10 s: {len(during)} log lines")
        assert len(during) <= 12, f"{len(during)} log lines in 10 s with the broker down:\n" + "\n".join(during[:40])
        assert daemon.process is not None and daemon.process.poll() is None, daemon.log_tail()
        # SIGTERM with the broker still away: a bounded shutdown, no traceback.
        started = time.monotonic()
        code = daemon.stop(timeout=45)
        took = time.monotonic() - started
        print(f"SIGTERM with the broker down: exit code {code} after {took:.1f} s")
        assert code in (0, 1), daemon.log_tail()
        assert took < 35, daemon.log_tail()
    finally:
        if daemon is not None:
            daemon.stop()
        broker.stop()
    _no_traceback(daemon)
