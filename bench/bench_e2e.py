"""End-to-end throughput and latency of the daemon through a real (embedded) broker.

Used by ``bench/run.py`` (sections ``e2e`` and ``latency``); see ``docs/benchmarks.md``. The
daemon runs through ``tests.daemon_helpers.DaemonProcess``, the integration tests' helper.

* ``e2e``: N events are produced first (keyed by store_id, 3 input partitions). Then the daemon
  (``python -m stream_detector run --config <tmp yaml>``, a subprocess) is timed from process
  start until the group's committed offsets cover all N records ("incl. startup"), and from its
  first partition assignment (the ``stream_detector_assigned_partitions`` gauge) to the same
  point ("steady state"). A plain confluent-kafka consumer that only counts the same records
  (assign-based, from the beginning, ``consume(10000)``) is the ceiling; it runs before and
  after the daemon and the faster of the two is used.
* ``latency``: the daemon runs on an empty topic while the generator produces at a fixed rate
  (``produce_to_kafka(rate=...)``). Anomaly latency comes from two places: the daemon's
  ``stream_detector_end_to_end_latency_seconds`` histogram (consume -> delivery of the anomaly,
  quantiles interpolated in the buckets like Prometheus' ``histogram_quantile``), and the Kafka
  timestamps: output record timestamp - input record timestamp of the same event_id (both
  CreateTime: when the generator, resp. the daemon, called ``produce()``), which includes the
  time the event waited in the input topic. The baseline (``EchoProcess``) is a plain consumer
  in its own process and group, configured by the daemon's consumer and producer settings, that
  scores nothing and re-produces every 20th record unchanged; it is fed the same events at the
  same rate on fresh topics after each phase, and measured by the same Kafka timestamps.

tansu's high watermark is unreliable (base offset of the last batch + 1), so completion is
judged by comparing committed offsets with the number of records produced.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from stream_detector.embedded_broker import die_with_parent_hook
from tests.daemon_helpers import DaemonProcess, Samples, child_env, process_cpu_seconds, sample, write_config
from tests.kafka_helpers import fast_group_config

Log = Callable[[str], None]

# How often the e2e watcher scrapes a daemon once it is assigned (the resolution of "to the last
# event scored").
SCRAPE_EVERY_S = 0.5


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Histograms on /metrics
# --------------------------------------------------------------------------------------------


def histogram_buckets(metrics: Samples, name: str) -> list[tuple[float, float]]:
    """[(upper bound, cumulative count)] sorted by bound, +Inf last."""
    rows = [(float(lbl["le"]), v) for lbl, v in metrics.get(f"{name}_bucket", [])]
    return sorted(rows)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if upper == float("inf"):
                return lower  # the highest finite bound, as Prometheus does
            if cumulative == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        lower, below = upper, cumulative
    return lower


def histogram_max_bound(buckets: list[tuple[float, float]]) -> float | None:
    """Upper bound of the highest non-empty bucket: the max is at most this."""
    previous = 0.0
    bound = None
    for upper, cumulative in buckets:
        if cumulative > previous:
            bound = upper
        previous = cumulative
    return bound


# --------------------------------------------------------------------------------------------
# Kafka helpers
# --------------------------------------------------------------------------------------------


def generated_events(count: int, seed: int):
    from stream_detector.generator import GeneratorConfig, SalesGenerator

    for event, _label in SalesGenerator(GeneratorConfig(seed=seed)).generate(count):
        yield event


class CommittedWatcher:
    """Polls a group's committed offsets with one long-lived (never subscribed) consumer."""

    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int) -> None:
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]

    def total(self) -> int:
        return sum(max(tp.offset, 0) for tp in self.consumer.committed(self.tps, timeout=5))

    def close(self) -> None:
        self.consumer.close()


def count_consumer(bootstrap: str, topic: str, expected: int, timeout: float = 120.0, broker_pid: int | None = None) -> dict[str, Any]:
    """The ceiling: a plain consumer that only counts ``expected`` records of ``topic``. Also
    the CPU it used (this process: nothing else runs in it meanwhile) and the broker's."""
    broker_before = process_cpu_seconds(broker_pid)
    cpu_before = time.process_time()
    started = time.perf_counter()
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-ceiling-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        n = 0
        deadline = time.monotonic() + timeout
        while n < expected and time.monotonic() < deadline:
            for msg in consumer.consume(10000, timeout=1.0):
                if msg.error() is None:
                    n += 1
        seconds = time.perf_counter() - started
    finally:
        consumer.close()
    if n < expected:
        raise RuntimeError(f"ceiling consumer read only {n} of {expected} records in {timeout:.0f}s")
    cpu_s = time.process_time() - cpu_before
    broker_after = process_cpu_seconds(broker_pid)
    broker_s = None if broker_before is None or broker_after is None else broker_after - broker_before
    return {
        "records": n,
        "seconds": seconds,
        "events_per_s": n / seconds,
        "cpu_seconds": cpu_s,
        "broker_cpu_seconds": broker_s,
        # Transport's CPU per record: what a consumer that does nothing costs, broker included.
        "cpu_us_per_event": 1e6 * (cpu_s + (broker_s or 0.0)) / n,
    }


def read_topic(bootstrap: str, topic: str, expected: int | None, idle_s: float = 3.0, timeout: float = 120.0) -> list[tuple[Any, Any]]:
    """Every record of ``topic`` (values and timestamps), until ``expected`` or ``idle_s`` of silence."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-reader-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False})
    out: list[tuple[Any, Any]] = []
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline:
            if expected is not None and len(out) >= expected:
                break
            msgs = consumer.consume(10000, timeout=0.5)
            got = [m for m in msgs if m.error() is None]
            if got:
                last = time.monotonic()
                out.extend((m.value(), m.timestamp()) for m in got)
            elif time.monotonic() - last > idle_s:
                break
    finally:
        consumer.close()
    return out


# --------------------------------------------------------------------------------------------
# The daemon as a subprocess
# --------------------------------------------------------------------------------------------


def bench_config(
    path: Path,
    bootstrap: str,
    input_topic: str,
    output_topic: str,
    dlq_topic: str,
    group: str,
    consumer_config: Mapping[str, Any] | None = None,
    **sections: Mapping[str, Any],
) -> Path:
    """The daemon's YAML config for one benchmark phase (the latency baseline reads it too): the
    tests' config (fast group settings, metrics on a free port, JSON logs) with the phase's
    ``consumer_config`` on top, topics made by the harness, and ``sections`` merged in
    (``river={"enabled": False}``)."""
    kafka = {"consumer_config": {**fast_group_config(), **(consumer_config or {})}, "create_topics": False}
    return write_config(path, bootstrap, input_topic, output_topic, dlq_topic, group, kafka=kafka, logging={"level": "INFO"}, **sections)


class TimedDaemon(DaemonProcess):
    """The daemon with its own topics, group and temporary config, timed by a thread that
    scrapes /metrics: when it first served, when it was first assigned (and its CPU then),
    and when it had counted ``expected_events`` input records."""

    def __init__(
        self,
        bootstrap: str,
        input_topic: str,
        output_topic: str,
        dlq_topic: str,
        group: str,
        expected_events: int | None = None,
        consumer_config: Mapping[str, Any] | None = None,
        python_args: Sequence[str] = (),
        sections: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.input_topic = input_topic
        self.output_topic = output_topic
        self.group = group
        self.expected_events = expected_events
        self.dir = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
        config = bench_config(self.dir / "detector.yaml", bootstrap, input_topic, output_topic, dlq_topic, group, consumer_config, **(sections or {}))
        super().__init__(config, self.dir / "daemon.log", python_args=python_args, env=child_env(keep_overrides=False), die_with_parent=True)
        self.started_at: float | None = None
        self.metrics_up_at: float | None = None
        self.assigned_at: float | None = None
        self.cpu_at_assignment: float | None = None  # the process's CPU seconds then (startup)
        self.scored_at: float | None = None  # when events_total reached expected_events
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> TimedDaemon:
        self.started_at = time.monotonic()
        super().start()
        self._watcher = threading.Thread(target=self._watch_assignment, name="bench-assign-watch", daemon=True)
        self._watcher.start()
        return self

    def _watch_assignment(self) -> None:
        """Scrape /metrics every 20 ms until the first assignment, then (if expected_events is
        set) every SCRAPE_EVERY_S until the daemon has counted that many input records."""
        while not self._watch_stop.is_set() and self.process is not None and self.process.poll() is None:
            try:
                m = self.samples(timeout=1.0)
            except OSError:
                time.sleep(0.02)
                continue
            now = time.monotonic()
            if self.metrics_up_at is None:
                self.metrics_up_at = now
            if self.assigned_at is None:
                if sample(m, "stream_detector_assigned_partitions") > 0:
                    self.assigned_at = now
                    self.cpu_at_assignment = self.cpu_seconds()
                    if self.expected_events is None:
                        return
                time.sleep(0.02)
                continue
            seen = sample(m, "stream_detector_events_total", outcome="scored") + sample(m, "stream_detector_events_total", outcome="invalid")
            if self.expected_events is not None and seen >= self.expected_events:
                self.scored_at = now
                return
            # Each scrape renders every series on the daemon's loop thread (about 7 ms here):
            # at 10 per second it took 8 % of a run. Prometheus scrapes every 15 s or so.
            time.sleep(SCRAPE_EVERY_S)

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise RuntimeError(f"daemon exited (code {code}). Log tail:\n{self.log_tail()}")

    def wait_assigned(self, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while self.assigned_at is None:
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not assigned within {timeout:.0f}s. Log tail:\n{self.log_tail()}")
            time.sleep(0.02)
        return self.assigned_at

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:  # type: ignore[override]
        """SIGTERM (SIGKILL after ``timeout``), then remove the temporary config and log (error
        messages raised earlier already carry the log tail). None if it never started."""
        self._watch_stop.set()
        try:
            return None if self.process is None else super().stop(sig, timeout)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The latency baseline: a plain consumer that re-produces a sample of its input
# --------------------------------------------------------------------------------------------

# The echo re-produces every ECHO_EVERY-th record it consumes (the daemon's anomalies are a few
# per cent of its input); it commits its position every ECHO_COMMIT_S.
ECHO_EVERY = 20
ECHO_BATCH = 2000
ECHO_COMMIT_S = 0.5


class EchoProcess:
    """The latency section's baseline: a plain confluent-kafka consumer in its own process and
    group that scores nothing and re-produces every ``ECHO_EVERY``-th record's key and value
    unchanged to ``output_topic``. Its consumer and producer are configured by the daemon's own
    ``consumer_config`` / ``producer_config`` from the same kind of YAML config (fetch.wait.max.ms,
    read_committed, fast group timeouts; idempotence, acks all, linger.ms 5, lz4)."""

    def __init__(
        self,
        bootstrap: str,
        input_topic: str,
        output_topic: str,
        dlq_topic: str,
        group: str,
        consumer_config: dict[str, Any] | None = None,
    ) -> None:
        import multiprocessing

        self.bootstrap = bootstrap
        self.input_topic = input_topic
        self.output_topic = output_topic
        self.group = group
        self.dir = Path(tempfile.mkdtemp(prefix="bench-echo-"))
        self.config_path = bench_config(self.dir / "detector.yaml", bootstrap, input_topic, output_topic, dlq_topic, group, consumer_config)
        # spawn, not fork: the parent may hold librdkafka threads, which fork() does not copy.
        context = multiprocessing.get_context("spawn")
        self._assigned = context.Event()
        self._stop = context.Event()
        self.proc = context.Process(target=_echo_main, args=(str(self.config_path), self._assigned, self._stop), name="bench-echo", daemon=True)

    def start(self) -> EchoProcess:
        self.proc.start()
        return self

    def wait_assigned(self, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while not self._assigned.wait(0.02):
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"echo consumer not assigned within {timeout:.0f}s")
        return time.monotonic()

    def check_alive(self) -> None:
        if not self.proc.is_alive():
            raise RuntimeError(f"echo consumer exited (code {self.proc.exitcode}); its traceback is on stderr")

    def log_tail(self) -> str:
        return "(the echo consumer logs to stderr)"

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop flag, then the echo flushes its producer (failing on undelivered records),
        commits and exits; SIGTERM after ``timeout``. Returns the exit code."""
        if self.proc.pid is not None:
            self._stop.set()
            self.proc.join(timeout)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(10)
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.proc.exitcode


def _echo_main(config_path: str, assigned: Any, stop: Any) -> None:
    """The echo process (see EchoProcess): runs until ``stop`` is set."""
    from confluent_kafka import KafkaException, Producer

    from stream_detector.config import load_settings
    from stream_detector.runtime.daemon import consumer_config, producer_config

    hook = die_with_parent_hook()
    if hook is not None:
        hook()
    settings = load_settings(config_path, environ={})
    errors: list[Any] = []

    def latch(err: Any, *_: Any) -> None:
        if err is not None and not errors:
            errors.append(err)

    consumer = Consumer({**consumer_config(settings), "on_commit": latch})
    producer = Producer(producer_config(settings))
    out = settings.kafka.output_topic
    positions: dict[int, int] = {}  # partition -> next offset to commit
    seen, committed_at = 0, time.monotonic()
    consumer.subscribe([settings.kafka.input_topic], on_assign=lambda *_: assigned.set())
    try:
        while not stop.is_set():
            # As the daemon does: take what has arrived, and wait only for the first record
            # (consume(n, timeout) would wait for n records or the timeout).
            batch = consumer.consume(ECHO_BATCH, timeout=0) or consumer.consume(1, timeout=0.1)
            if len(batch) == 1:
                batch += consumer.consume(ECHO_BATCH - 1, timeout=0)
            for msg in batch:
                if msg.error() is not None:
                    raise KafkaException(msg.error())
                seen += 1
                if seen % ECHO_EVERY == 0:
                    producer.produce(out, msg.value(), key=msg.key(), on_delivery=latch)
                positions[msg.partition()] = msg.offset() + 1
            producer.poll(0)
            if errors:
                raise KafkaException(errors[0])
            if positions and time.monotonic() - committed_at >= ECHO_COMMIT_S:
                # Only the harness's progress signal, not a delivery guarantee: a flush first
                # would stall the loop, which is the cost this baseline is meant to leave out.
                consumer.commit(offsets=_offsets(settings.kafka.input_topic, positions), asynchronous=True)
                committed_at = time.monotonic()
        pending = producer.flush(30)
        if pending or errors:
            raise RuntimeError(f"echo: {pending} records undelivered after flush, first error {errors[:1]}")
        if positions:
            consumer.commit(offsets=_offsets(settings.kafka.input_topic, positions), asynchronous=False)
    finally:
        consumer.close()


def _offsets(topic: str, positions: dict[int, int]) -> list[TopicPartition]:
    return [TopicPartition(topic, partition, offset) for partition, offset in positions.items()]


def wait_group_committed(
    daemons: Sequence[TimedDaemon | EchoProcess],
    expected: int,
    timeout: float,
    poll_s: float = 0.1,
    partitions: int = 3,
) -> float:
    """Monotonic time at which the committed offsets of the daemons' group (one group, one
    input topic of ``partitions`` partitions) first covered ``expected`` records; raises if a
    daemon exits. The latency baseline's echo consumer stands in for a daemon here."""
    first = daemons[0]
    watcher = CommittedWatcher(first.bootstrap, first.group, first.input_topic, partitions)
    try:
        deadline = time.monotonic() + timeout
        while True:
            for daemon in daemons:
                daemon.check_alive()
            total = watcher.total()
            now = time.monotonic()
            if total >= expected:
                return now
            if now > deadline:
                tails = "\n".join(d.log_tail() for d in daemons)
                raise RuntimeError(f"only {total} of {expected} offsets committed after {timeout:.0f}s. Log tail:\n{tails}")
            time.sleep(poll_s)
    finally:
        watcher.close()


def _topics(prefix: str) -> tuple[str, str, str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"{prefix}-in-{tag}", f"{prefix}-out-{tag}", f"{prefix}-dlq-{tag}", f"{prefix}-group-{tag}"


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def run_e2e(n_events: int, log: Log = _say, python_args: list[str] | None = None, scale_out: int = 2, wide_partitions: int = 6) -> dict[str, Any]:
    """One daemon, then (if ``scale_out`` > 1) that many daemons in one group, each phase with
    its own group over the same pre-produced input; then (if ``wide_partitions``) that many
    daemons again over a copy of the input with that many partitions; the ceiling consumer
    before and after."""
    from stream_detector.config import load_settings
    from stream_detector.embedded_broker import EmbeddedBroker
    from stream_detector.generator import produce_to_kafka
    from stream_detector.runtime.topics import ensure_topics

    # The daemon commits at checkpoints (every commit_interval_ms) in versions that have them.
    processing = load_settings(environ={}).processing
    result: dict[str, Any] = {"events": n_events, "commit_interval_ms": getattr(processing, "commit_interval_ms", None)}
    with EmbeddedBroker() as broker:
        bs = broker.bootstrap_servers
        inp, out, dlq, group = _topics("e2e")
        ensure_topics(bs, {inp: 3, out: 3, dlq: 1})
        log(f"e2e: producing {n_events} events into {inp} (3 partitions)")
        t0 = time.perf_counter()
        produced = produce_to_kafka(generated_events(n_events, seed=1), bs, inp)
        result["produce_seconds"] = time.perf_counter() - t0
        result["produce_events_per_s"] = produced / result["produce_seconds"]
        if produced != n_events:
            raise RuntimeError(f"produced {produced} of {n_events}")

        log("e2e: ceiling consumer (before)")
        ceiling = [count_consumer(bs, inp, n_events, broker_pid=broker.pid)]

        log("e2e: daemon")
        result["daemon"] = _throughput_phase(bs, inp, out, dlq, group, n_events, 1, python_args, broker_pid=broker.pid)
        if scale_out > 1:
            log(f"e2e: {scale_out} daemons in one group")
            _, out2, dlq2, group2 = _topics("e2e-scale")
            ensure_topics(bs, {out2: 3, dlq2: 1})
            result["scale_out"] = _throughput_phase(bs, inp, out2, dlq2, group2, n_events, scale_out, python_args, broker_pid=broker.pid)
            if wide_partitions:
                # The same events over more partitions: shows whether the uneven split between
                # two instances is the 3-partition layout or the store keys (it is the keys).
                inp_w, out_w, dlq_w, group_w = _topics(f"e2e-p{wide_partitions}")
                ensure_topics(bs, {inp_w: wide_partitions, out_w: 3, dlq_w: 1})
                log(f"e2e: {scale_out} daemons in one group, input of {wide_partitions} partitions")
                if produce_to_kafka(generated_events(n_events, seed=1), bs, inp_w) != n_events:
                    raise RuntimeError(f"the {wide_partitions}-partition input is incomplete")
                result["scale_out_wide"] = _throughput_phase(
                    bs, inp_w, out_w, dlq_w, group_w, n_events, scale_out, python_args, partitions=wide_partitions, broker_pid=broker.pid
                )

        log("e2e: ceiling consumer (after)")
        ceiling.append(count_consumer(bs, inp, n_events, broker_pid=broker.pid))
        result["ceiling_runs"] = ceiling
        result["ceiling"] = max(ceiling, key=lambda c: c["events_per_s"])
    return result


def _throughput_phase(
    bs: str,
    inp: str,
    out: str,
    dlq: str,
    group: str,
    n_events: int,
    instances: int,
    python_args: list[str] | None,
    partitions: int = 3,
    broker_pid: int | None = None,
) -> dict[str, Any]:
    """``instances`` daemons started together in ``group``, timed until it has committed every
    input record. Steady state starts at the first assignment of any of them. CPU: each
    daemon's from its own assignment (before it, it only starts up) to the last commit, and
    the broker's over the whole phase (it has next to nothing to do while the daemons start)."""
    expected = n_events if instances == 1 else None  # "to the last scored" needs one daemon
    daemons = [TimedDaemon(bs, inp, out, dlq, group, expected_events=expected, python_args=python_args or ()) for _ in range(instances)]
    broker_cpu_start = process_cpu_seconds(broker_pid)
    for daemon in daemons:
        daemon.start()
    try:
        assigned = [d.wait_assigned(timeout=120) for d in daemons]
        done_at = wait_group_committed(daemons, n_events, timeout=600, partitions=partitions)
        cpu = [d.cpu_seconds() for d in daemons]
        broker_cpu_end = process_cpu_seconds(broker_pid)
        time.sleep(0.3)  # let the watcher see the final count if it has not yet
        scraped = [d.samples() for d in daemons]
    finally:
        codes = [d.stop() for d in daemons]
    started = min(d.started_at for d in daemons if d.started_at is not None)
    assigned_at = min(assigned)
    total_s = done_at - started
    steady_s = done_at - assigned_at

    def summed(name: str, **labels: str) -> float:
        return sum(sample(m, name, **labels) for m in scraped)

    batch_s = summed("stream_detector_batch_seconds_sum")
    scored_at = daemons[0].scored_at if instances == 1 else None
    cpu_s = sum(c for c in cpu if c is not None) if all(c is not None for c in cpu) else None
    steady = [None if c is None or d.cpu_at_assignment is None else c - d.cpu_at_assignment for c, d in zip(cpu, daemons, strict=True)]
    steady_cpu_s = None if None in steady else sum(steady)  # type: ignore[arg-type]
    broker_s = None if broker_cpu_start is None or broker_cpu_end is None else broker_cpu_end - broker_cpu_start
    return {
        "instances": instances,
        "partitions": partitions,
        "cpu_seconds_steady_state": steady_cpu_s,
        "cpu_seconds_steady_state_by_instance": steady,
        "broker_cpu_seconds": broker_s,
        # Daemons from their assignment to the last commit, and the broker, per input record.
        "cpu_us_per_event_steady_state": None if steady_cpu_s is None else 1e6 * (steady_cpu_s + (broker_s or 0.0)) / n_events,
        "cpu_seconds_incl_startup": cpu_s,
        "events_per_cpu_s_incl_startup": n_events / cpu_s if cpu_s else None,
        "seconds_steady_state_to_all_scored": (scored_at - assigned_at) if scored_at else None,
        "events_per_s_steady_state_to_all_scored": n_events / (scored_at - assigned_at) if scored_at else None,
        "checkpoints": summed("stream_detector_checkpoint_seconds_count"),
        "checkpoint_seconds_sum": summed("stream_detector_checkpoint_seconds_sum"),
        "restore_seconds_sum": summed("stream_detector_state_restore_seconds_sum"),
        "mean_batch_records": summed("stream_detector_batch_size_events_sum") / max(1.0, summed("stream_detector_batch_size_events_count")),
        "seconds_incl_startup": total_s,
        "seconds_steady_state": steady_s,
        "seconds_to_metrics_up": min((d.metrics_up_at or started) for d in daemons) - started,
        "seconds_to_assignment": assigned_at - started,
        "seconds_to_last_assignment": max(assigned) - started,
        "events_per_s_incl_startup": n_events / total_s,
        "events_per_s_steady_state": n_events / steady_s,
        "batch_seconds_sum": batch_s,
        "batches": summed("stream_detector_batch_seconds_count"),
        # Over all instances: above 1 when they score at the same time.
        "busy_fraction_steady_state": batch_s / steady_s if steady_s > 0 else None,
        "scored": summed("stream_detector_events_total", outcome="scored"),
        "scored_by_instance": [sample(m, "stream_detector_events_total", outcome="scored") for m in scraped],
        "anomalies": summed("stream_detector_anomalies_total"),
        "exit_code": codes[0] if instances == 1 else codes,
    }


def run_latency(
    phases: list[tuple[str, int, dict[str, Any], float | None]], duration_s: float, log: Log = _say, instances: dict[str, int] | None = None
) -> dict[str, Any]:
    """``phases``: (label, input events/s, extra consumer_config for the daemon, seconds or None
    for ``duration_s``); fresh daemons, group and set of topics per phase, on one broker.
    ``instances``: label -> daemons in the phase's group (1 if absent). After each phase its
    baseline (one EchoProcess, with the same consumer_config) runs on fresh topics with the
    same rate, count, warm-up and seed: its result is the phase's "baseline"."""
    from stream_detector.embedded_broker import EmbeddedBroker

    results: dict[str, Any] = {"duration_s": duration_s, "echo_every": ECHO_EVERY, "phases": {}}
    with EmbeddedBroker() as broker:
        bs = broker.bootstrap_servers
        for i, (label, rate, consumer_config, seconds) in enumerate(phases):
            count = int(rate * (seconds or duration_s))
            n = (instances or {}).get(label, 1)
            r = latency_phase(bs, rate, count, 10 + i, consumer_config, n, _prefixed(log, f"latency [{label}]: "))
            r["baseline"] = _baseline_phase(bs, rate, count, 10 + i, consumer_config, _prefixed(log, f"latency [{label}], baseline: "))
            r["consumer_config"] = consumer_config
            r["instances"] = n
            results["phases"][label] = r
    return results


def _prefixed(log: Log, prefix: str) -> Log:
    return lambda what: log(prefix + what)


def merged_scrape(daemons: list[TimedDaemon]) -> Samples:
    """One scrape of every daemon, equal series summed: right for the counters and histograms
    the latency phase reads (not for gauges)."""
    totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for daemon in daemons:
        for name, samples in daemon.samples().items():
            for labels, value in samples:
                key = (name, tuple(sorted(labels.items())))
                totals[key] = totals.get(key, 0.0) + value
    merged: Samples = {}
    for (name, label_items), value in totals.items():
        merged.setdefault(name, []).append((dict(label_items), value))
    return merged


class PacedRun:
    """What ``_paced_run`` did: counts, monotonic times, and the optional scrapes."""

    def __init__(self, warmed: int, measured_ids: set[str]) -> None:
        self.warmed = warmed
        self.measured_ids = measured_ids
        self.produced = 0
        self.started = self.produce_end = self.done_at = 0.0
        self.before: Any = None  # the scrape after the warm-up
        self.after: Any = None  # the scrape once everything was committed
        self.exit_codes: list[int | None] = []

    @property
    def consumed_per_s(self) -> float:
        """Measured events over the time from the first produce to the last commit."""
        return self.produced / (self.done_at - self.started)

    def summary(self) -> dict[str, Any]:
        return {
            "produced": self.produced,
            "warm_up_events": self.warmed,
            "produce_seconds": self.produce_end - self.started,
            "achieved_rate": self.produced / (self.produce_end - self.started),
            "drain_seconds_after_produce": self.done_at - self.produce_end,
        }


def _paced_run(
    members: Sequence[TimedDaemon | EchoProcess],
    bs: str,
    inp: str,
    rate: int,
    count: int,
    seed: int,
    log: Log,
    scrape: Callable[[], Any] | None = None,
) -> PacedRun:
    """Start the group's members, wait for their assignment, then produce the warm-up and the
    ``count`` measured events of ``seed`` at ``rate`` (the daemon phase and its baseline alike),
    each until committed; ``scrape`` runs after the warm-up and at the end. Stops the members."""
    from stream_detector.generator import produce_to_kafka

    # linger.ms 5 (the daemon's own setting) rather than the generator's 20: the input
    # timestamp is taken at produce(), so upstream batching would count as our latency.
    # Not idempotent: each produce_to_kafka call makes a fresh producer, and on tansu a fresh
    # idempotent one holds its first records about 500 ms for its producer id, so the first
    # half second of the measured part (not only of the warm-up) would wait that long.
    producer_config = {"linger.ms": 5, "enable.idempotence": False}
    # Generated before the clock starts: the generator's own CPU would compete with the daemon.
    # The warm-up is the first second of the same stream: a stream of another seed would give
    # every store and product new levels at once (a regime change, not a steady state).
    warm_count = min(count, rate)
    stream = list(generated_events(warm_count + count, seed))
    warm_up, events = stream[:warm_count], stream[warm_count:]
    try:
        for member in members:
            member.start()
        for member in members:
            member.wait_assigned(timeout=120)
        log(f"producing {count} events at {rate}/s for {count / rate:.0f}s")
        # Warm-up (not measured): one second of input at the same rate, until committed. The
        # first records through a fresh consumer and its producer wait about a second for
        # connections and metadata, which is start-up, not the latency of a running consumer.
        warmed = produce_to_kafka(warm_up, bs, inp, rate=rate, client_config=producer_config)
        wait_group_committed(members, warmed, timeout=120)
        run = PacedRun(warmed, {e["event_id"] for e in events})
        run.before = scrape() if scrape else None
        run.started = time.monotonic()
        run.produced = produce_to_kafka(events, bs, inp, rate=rate, client_config=producer_config)
        run.produce_end = time.monotonic()
        run.done_at = wait_group_committed(members, warmed + run.produced, timeout=600)
        run.after = scrape() if scrape else None
    finally:
        codes = [member.stop() for member in members]
    run.exit_codes = codes
    return run


def kafka_latency(bs: str, inp: str, out: str, measured_ids: set[str], outputs: int | None, inputs: int) -> dict[str, Any]:
    """Kafka-timestamp latency: each record of ``out`` whose event_id is one of ``measured_ids``
    (the first such record per event), its timestamp minus that of the input record of the same
    event_id in ``inp``. ``outputs`` / ``inputs``: how many records to read from each topic."""
    records = read_topic(bs, out, expected=outputs)
    out_ts: dict[str, int] = {}
    for value, (_ts_type, ts) in records:
        event_id = orjson.loads(value).get("event_id")
        if event_id in measured_ids:
            out_ts.setdefault(event_id, ts)
    in_ts: dict[str, int] = {}
    in_types = set()
    for value, (ts_type, ts) in read_topic(bs, inp, expected=inputs):
        event_id = orjson.loads(value)["event_id"]
        if event_id in out_ts:
            in_ts[event_id] = ts
            in_types.add(ts_type)
    lat = sorted(out_ts[e] - in_ts[e] for e in out_ts if e in in_ts)
    return {
        "count": len(lat),
        "p50_ms": _pct(lat, 0.5),
        "p99_ms": _pct(lat, 0.99),
        "max_ms": float(lat[-1]) if lat else None,
        "timestamp_types": sorted({t for _, (t, _) in records} | in_types),
    }


def latency_phase(
    bs: str,
    rate: int,
    count: int,
    seed: int,
    consumer_config: dict[str, Any],
    instances: int,
    log: Log,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """One latency phase without its baseline: ``instances`` fresh daemons in a fresh group and
    topics, fed ``count`` events of ``seed`` at ``rate`` after a warm-up; ``sections`` are merged
    into their config (``{"river": {"enabled": False}}``)."""
    from stream_detector.runtime.topics import ensure_topics

    inp, out, dlq, group = _topics(f"lat{rate}")
    ensure_topics(bs, {inp: 3, out: 3, dlq: 1})
    daemons = [TimedDaemon(bs, inp, out, dlq, group, consumer_config=consumer_config, sections=sections) for _ in range(instances)]
    run = _paced_run(daemons, bs, inp, rate, count, seed, log, scrape=lambda: merged_scrape(daemons))
    before, metrics = run.before, run.after
    latency = "stream_detector_end_to_end_latency_seconds"
    buckets = _minus(histogram_buckets(metrics, latency), histogram_buckets(before, latency))
    anomalies = int(sample(metrics, "stream_detector_anomalies_total"))
    hist = {
        "count": int(sample(metrics, f"{latency}_count") - sample(before, f"{latency}_count")),
        "p50_ms": _ms(histogram_quantile(0.5, buckets)),
        "p99_ms": _ms(histogram_quantile(0.99, buckets)),
        "max_le_ms": _ms(histogram_max_bound(buckets)),
    }
    # Kafka timestamps: output record vs the input record of the same event (measured events only).
    ts_stats = kafka_latency(bs, inp, out, run.measured_ids, outputs=anomalies, inputs=run.warmed + run.produced)

    def delta(name: str) -> float:
        return sample(metrics, name) - sample(before, name)

    batches = delta("stream_detector_batch_seconds_count")
    batch_buckets = _minus(histogram_buckets(metrics, "stream_detector_batch_seconds"), histogram_buckets(before, "stream_detector_batch_seconds"))
    checkpoints = delta("stream_detector_checkpoint_seconds_count")
    return {
        "rate": rate,
        **run.summary(),
        "batches": batches,
        "mean_batch_records": delta("stream_detector_batch_size_events_sum") / batches if batches else None,
        "mean_batch_ms": 1000 * delta("stream_detector_batch_seconds_sum") / batches if batches else None,
        "p50_batch_ms": _ms(histogram_quantile(0.5, batch_buckets)),
        "p99_batch_ms": _ms(histogram_quantile(0.99, batch_buckets)),
        "checkpoints": checkpoints,
        "mean_checkpoint_ms": 1000 * delta("stream_detector_checkpoint_seconds_sum") / max(1.0, checkpoints),
        "daemon_events_per_s": run.consumed_per_s,
        "anomalies": anomalies,
        "histogram": hist,
        "timestamps": ts_stats,
    }


def _baseline_phase(bs: str, rate: int, count: int, seed: int, consumer_config: dict[str, Any], log: Log) -> dict[str, Any]:
    """The phase's baseline: one EchoProcess on fresh topics, fed exactly as the daemon was."""
    from stream_detector.runtime.topics import ensure_topics

    inp, out, dlq, group = _topics(f"lat{rate}-echo")
    ensure_topics(bs, {inp: 3, out: 3})  # the dlq topic is only named in the config
    echo = EchoProcess(bs, inp, out, dlq, group, consumer_config=consumer_config)
    run = _paced_run([echo], bs, inp, rate, count, seed, log)
    if run.exit_codes != [0]:
        raise RuntimeError(f"echo consumer exited with code {run.exit_codes[0]} (traceback on stderr)")
    total = run.warmed + run.produced
    return {
        "rate": rate,
        **run.summary(),
        "echo_events_per_s": run.consumed_per_s,
        "timestamps": kafka_latency(bs, inp, out, run.measured_ids, outputs=total // ECHO_EVERY, inputs=total),
    }


def _minus(after: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Cumulative histogram buckets of what was observed between two scrapes."""
    earlier = dict(before)
    return [(bound, count - earlier.get(bound, 0.0)) for bound, count in after]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _pct(sorted_values: list[int], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 1)) - 1))
    return float(sorted_values[k])


if __name__ == "__main__":  # a quick manual check: python -m bench.bench_e2e [EVENTS]
    import json

    print(json.dumps(run_e2e(int(sys.argv[1]) if len(sys.argv) > 1 else 20000), indent=2))
