"""Scaling out with shared calibration (issue 20): speed of two instances over 12 partitions.

The baseline is the daemon of the commit before shared calibration (``BASE_REV``), run in the
same run on the same broker. Used by ``bench/run.py`` (section ``scale``); see
``docs/benchmarks.md``. For each source tree (the baseline, then the working tree; in rounds
of baseline, ours, ours, baseline when there are two), on one embedded broker:

* Fresh topics and group: an input topic of ``PARTITIONS`` partitions, created before anything
  is produced, an output topic of as many, a dead-letter topic of one. The daemons create their
  changelog and (ours) population topics themselves.
* Two daemons of the tree (``python -m stream_detector run`` with the tree as working directory
  and PYTHONPATH) join the group one after the other: the second starts once the first owns
  every partition, and the phase starts once the two hold them all between them (tansu's
  coordinator wedges if a member joins or leaves in the middle of a rebalance).
* Throughput: a backlog of N generated events (keyed by store_id) is produced as fast as the
  producer goes, /metrics of both daemons is scraped every ``SCRAPE_EVERY_S``, and the rate is
  the scored count between two scrapes over the time between them: from the first scrape with
  an event scored to the last one before all N were, and (the backlog alone, no producer
  competing for the two cores) from the first scrape after the producer finished to the same
  last one.
* Latency: once the group has committed the backlog, one second of the same stream at the
  plan's rate (``RATE``: 5,000 events/s) is a warm-up (left out), then that rate for the phase's
  seconds. p50 and p99
  of the daemons' ``stream_detector_end_to_end_latency_seconds`` (consume to delivery report of
  the anomaly), summed over both instances, the state after the warm-up subtracted, quantiles
  interpolated inside the buckets as Prometheus' ``histogram_quantile`` does; and the same from
  the Kafka timestamps (output record minus input record of the same event_id, both CreateTime).

Both trees get the same config file: every setting at its default (every detector on, the
autoencoder included; at-least-once; state on) but the tests' fast group settings, consumer
``fetch.wait.max.ms`` 10 (what section 4 uses on tansu), topics made by the harness, metrics on
a free port and JSON logs. Neither has a ``scaling`` section, so ours shares calibration (its
default) and the baseline, which refuses the key, has no such setting.

    python -m bench.bench_scale [--quick] [--events N] [--rate N] [--rounds N] [--state-off] [--base-tree PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import yaml

from bench.bench_e2e import (
    CommittedWatcher,
    _minus,
    bench_config,
    generated_events,
    histogram_buckets,
    histogram_max_bound,
    histogram_quantile,
    kafka_latency,
    merged_scrape,
    read_topic,
)
from bench.bench_flood import ROOT, Log, TreeDaemon, baseline_tree, imported_from, ratio, sigterm_exits
from tests.daemon_helpers import Samples, process_cpu_seconds, sample

BASE_REV = "76e00fd"  # the commit before shared calibration
PARTITIONS = 12
INSTANCES = 2
RATE = 5_000  # events/s of the latency phase (issue 20)
SEED = 20
SCRAPE_EVERY_S = 0.25
# What section 4 sets on tansu, which answers a fetch only when fetch.wait.max.ms runs out.
CONSUMER_CONFIG = {"fetch.wait.max.ms": 10}
# The latency phase's producer, as section 4's: linger.ms 5 (the daemon's own) and not
# idempotent (a fresh idempotent producer holds its first records ~500 ms on tansu).
PACED_PRODUCER = {"linger.ms": 5, "enable.idempotence": False}
LATENCY = "stream_detector_end_to_end_latency_seconds"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Plan:
    events: int  # the throughput backlog
    latency_seconds: float
    rounds: int  # 1: baseline, ours; 2: baseline, ours, ours, baseline
    rate: int = RATE
    # False (a probe, both trees alike): no state snapshots, so no changelog traffic.
    state: bool = True


QUICK = Plan(events=100_000, latency_seconds=20.0, rounds=1)
FULL = Plan(events=300_000, latency_seconds=30.0, rounds=2)


# --------------------------------------------------------------------------------------------
# Daemons
# --------------------------------------------------------------------------------------------


def tree_config(path: Path, bs: str, inp: str, out: str, dlq: str, group: str, state: bool = True) -> Path:
    """section 4's daemon config (``bench_config``) without the ``scaling`` section that the
    tests' ``write_config`` adds to turn sharing off: each tree runs its own default.
    ``state=False``: state snapshots off (a probe; the default is on)."""
    config_path = bench_config(path, bs, inp, out, dlq, group, CONSUMER_CONFIG, **({} if state else {"state": {"enabled": False}}))
    config = yaml.safe_load(config_path.read_text())
    config.pop("scaling", None)
    config_path.write_text(yaml.safe_dump(config))
    return config_path


def assigned(daemon: TreeDaemon) -> int:
    """The daemon's assigned (and restored) partitions; 0 while /metrics is not up."""
    daemon.check_alive()
    try:
        return int(sample(daemon.samples(timeout=2.0), "stream_detector_assigned_partitions"))
    except OSError:
        return 0


def wait_for(condition: Any, daemons: list[TreeDaemon], timeout: float, what: str) -> float:
    """Poll ``condition()`` every 50 ms until it holds; the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(d.log_tail(2000) for d in daemons)
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}. Log tails:\n{tails}")
        time.sleep(0.05)
    return time.monotonic()


def join_one_by_one(daemons: list[TreeDaemon], timeout: float = 120.0) -> dict[str, float]:
    """Start the daemons one at a time, each once the group has settled with the ones before it
    (every partition assigned and restored across them); seconds each join took."""
    joins: dict[str, float] = {}
    for i, daemon in enumerate(daemons):
        started = time.monotonic()
        daemon.start()
        members = daemons[: i + 1]

        def settled(members: list[TreeDaemon] = members) -> bool:
            counts = [assigned(d) for d in members]
            return all(counts) and sum(counts) == PARTITIONS

        joins[f"instance {i + 1}"] = wait_for(settled, members, timeout, f"instance {i + 1} to join") - started
    return joins


class Scraper:
    """Scrapes every daemon every SCRAPE_EVERY_S in a thread: (time, scored, invalid) summed."""

    def __init__(self, daemons: list[TreeDaemon]) -> None:
        self.daemons = daemons
        self.points: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-scale-scrape", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    scraped = [d.samples(timeout=2.0) for d in self.daemons]
                except OSError:  # a slow answer: try again
                    continue
                scored = sum(sample(m, "stream_detector_events_total", outcome="scored") for m in scraped)
                invalid = sum(sample(m, "stream_detector_events_total", outcome="invalid") for m in scraped)
                self.points.append((time.monotonic(), scored, invalid))
                self._stop.wait(SCRAPE_EVERY_S)
        except BaseException as exc:  # noqa: BLE001 - raised by the harness's thread
            self.error = exc

    def seen(self) -> float:
        if self.error is not None:
            raise RuntimeError(f"scraping failed: {self.error!r}")
        return self.points[-1][1] + self.points[-1][2] if self.points else 0.0


def window_rate(points: list[tuple[float, float, float]], start: float, total: int) -> dict[str, Any] | None:
    """Events per second from the first scrape at or after ``start`` with an event seen to the
    last one with fewer than ``total``: both inside the drain, so the counts at both ends are
    exact (what happened before the first and after the last scrape is left out)."""
    inside = [(t, s + i) for t, s, i in points if t >= start and 0 < s + i < total]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    (t0, n0), (t1, n1) = inside[0], inside[-1]
    return {"events_per_s": (n1 - n0) / (t1 - t0), "events": n1 - n0, "seconds": t1 - t0, "scrapes": len(inside)}


def machine_cpu_seconds() -> tuple[float, float]:
    """The machine's busy and stolen CPU-seconds so far, all cores (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


class CpuMeter:
    """CPU used over a phase by the daemons, the broker, this process and the whole machine;
    what is left of the machine's is other processes' (another job on the shared cores)."""

    def __init__(self, daemons: list[TreeDaemon], broker_pid: int | None) -> None:
        self.daemons = daemons
        self.broker_pid = broker_pid
        self._start = self._read()

    def _read(self) -> dict[str, Any]:
        busy, steal = machine_cpu_seconds()
        return {
            "at": time.monotonic(),
            "daemons": [d.cpu_seconds() for d in self.daemons],
            "broker": process_cpu_seconds(self.broker_pid),
            "harness": time.process_time(),
            "machine": busy,
            "steal": steal,
        }

    def stop(self) -> dict[str, Any]:
        """Seconds and CPU-seconds since construction; ``*_cores``: CPU-seconds per second."""
        a, b = self._start, self._read()
        seconds = b["at"] - a["at"]
        daemons = [None if x is None or y is None else y - x for x, y in zip(a["daemons"], b["daemons"], strict=True)]
        broker = None if a["broker"] is None or b["broker"] is None else b["broker"] - a["broker"]
        ours = sum(x or 0.0 for x in daemons) + (broker or 0.0) + b["harness"] - a["harness"]
        machine = b["machine"] - a["machine"]
        return {
            "seconds": seconds,
            "daemons_cpu_seconds": daemons,
            "broker_cpu_seconds": broker,
            "harness_cpu_seconds": b["harness"] - a["harness"],
            "machine_cpu_seconds": machine,
            "ours_cores": ours / seconds,
            "other_cores": max(0.0, machine - ours) / seconds,
            "steal_cores": (b["steal"] - a["steal"]) / seconds,
        }


# --------------------------------------------------------------------------------------------
# One tree
# --------------------------------------------------------------------------------------------


def run_tree(bs: str, tree: Path, stream: list[dict], plan: Plan, log: Log, broker_pid: int | None) -> dict[str, Any]:
    """Two daemons of ``tree`` in a fresh group and topics: the throughput backlog, then the paced
    latency phase, from one generated ``stream`` (backlog, warm-up, measured events)."""
    from stream_detector.generator import produce_to_kafka
    from stream_detector.runtime.topics import ensure_topics

    n, warm = plan.events, plan.rate
    backlog, warm_up, paced = stream[:n], stream[n : n + warm], stream[n + warm :]
    tag = uuid.uuid4().hex[:8]
    inp, out, dlq, group = (f"scale-{role}-{tag}" for role in ("in", "out", "dlq", "group"))
    ensure_topics(bs, {inp: PARTITIONS, out: PARTITIONS, dlq: 1})
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    configs = [tree_config(work / f"detector-{i}.yaml", bs, inp, out, dlq, group, plan.state) for i in range(INSTANCES)]
    daemons = [TreeDaemon(tree, config, work / f"daemon-{i}.log") for i, config in enumerate(configs)]
    watcher = CommittedWatcher(bs, group, inp, PARTITIONS)
    result: dict[str, Any] = {"tree": str(tree), "group": group, "input_topic": inp}
    try:
        result["join_seconds"] = join_one_by_one(daemons)
        result["partitions_by_instance"] = [assigned(d) for d in daemons]
        log(f"scale: {tree}: joined ({result['join_seconds']}), partitions by instance {result['partitions_by_instance']}")
        result["throughput"] = throughput_phase(bs, inp, daemons, watcher, backlog, broker_pid)
        t = result["throughput"]
        log(f"scale: {tree}: throughput {fmt(t['first_to_last'])} ev/s first to last scored, {fmt(t['backlog'])} ev/s after the producer stopped")

        warmed = produce_to_kafka(warm_up, bs, inp, rate=plan.rate, client_config=PACED_PRODUCER)
        wait_for(lambda: watcher.total() >= n + warmed, daemons, 120, "the warm-up to be committed")
        before = merged_scrape(daemons)
        meter = CpuMeter(daemons, broker_pid)
        started = time.monotonic()
        log(f"scale: {tree}: producing {len(paced):,} events at {plan.rate:,}/s")
        produced = produce_to_kafka(paced, bs, inp, rate=plan.rate, client_config=PACED_PRODUCER)
        produce_end = time.monotonic()
        done = wait_for(lambda: watcher.total() >= n + warmed + produced, daemons, 300, "the paced events to be committed")
        after = merged_scrape(daemons)
        result["latency"] = latency_figures(before, after)
        result["latency"].update(
            cpu=meter.stop(),
            produced=produced,
            achieved_rate=produced / (produce_end - started),
            drain_seconds_after_produce=done - produce_end,
            daemons_events_per_s=produced / (done - started),
        )
        measured = {e["event_id"] for e in paced}
        outputs = int(sample(after, "stream_detector_anomalies_total"))
        result["latency"]["timestamps"] = kafka_latency(bs, inp, out, measured, outputs=outputs, inputs=n + warmed + produced)
        result["population"] = population_figures(bs, group, daemons, after)
        h, ts = result["latency"]["histogram"], result["latency"]["timestamps"]
        log(f"scale: {tree}: latency p50 / p99 (ms) histogram {fmt(h['p50_ms'])} / {fmt(h['p99_ms'])}, timestamps {fmt(ts['p50_ms'])} / {fmt(ts['p99_ms'])}")
    finally:
        watcher.close()
        # One at a time, as the integration tests stop them.
        result["exit_codes"] = [d.stop() if d.process is not None else None for d in daemons]
        result["logs"] = [log_findings(d.log_path) for d in daemons]
        shutil.rmtree(work, ignore_errors=True)
    return result


def throughput_phase(bs: str, inp: str, daemons: list[TreeDaemon], watcher: CommittedWatcher, backlog: list[dict], broker_pid: int | None) -> dict[str, Any]:
    """Produce ``backlog`` while the settled group consumes it; the rates of the module docstring."""
    from stream_detector.generator import produce_to_kafka

    n = len(backlog)
    meter = CpuMeter(daemons, broker_pid)
    with Scraper(daemons) as scraper:
        started = time.monotonic()
        if produce_to_kafka(backlog, bs, inp) != n:
            raise RuntimeError(f"produced fewer than {n} events")
        produce_end = time.monotonic()
        wait_for(lambda: scraper.seen() >= n, daemons, 300, f"{n:,} events to be scored")
        scored_at = time.monotonic()
        cpu = meter.stop()
    committed_at = wait_for(lambda: watcher.total() >= n, daemons, 60, f"{n:,} offsets to be committed")
    scraped = [d.samples() for d in daemons]
    daemons_cpu = None if None in cpu["daemons_cpu_seconds"] else sum(cpu["daemons_cpu_seconds"])
    first_to_last = window_rate(scraper.points, started, n)
    backlog_rate = window_rate(scraper.points, produce_end, n)
    return {
        "events": n,
        "produce_seconds": produce_end - started,
        "first_to_last": None if first_to_last is None else first_to_last["events_per_s"],
        "first_to_last_window": first_to_last,
        "backlog": None if backlog_rate is None else backlog_rate["events_per_s"],
        "backlog_window": backlog_rate,
        "seconds_to_all_scored": scored_at - started,
        "seconds_to_all_committed": committed_at - started,
        "scored_by_instance": [sample(m, "stream_detector_events_total", outcome="scored") for m in scraped],
        "anomalies": sum(sample(m, "stream_detector_anomalies_total") for m in scraped),
        "cpu": cpu,
        # From the first produce to the last event scored, daemons and broker, per event.
        "cpu_us_per_event": None if daemons_cpu is None else 1e6 * (daemons_cpu + (cpu["broker_cpu_seconds"] or 0.0)) / n,
        "scrapes": len(scraper.points),
    }


def latency_figures(before: Samples, after: Samples) -> dict[str, Any]:
    """The latency histogram and batch figures of both daemons between two merged scrapes."""
    buckets = _minus(histogram_buckets(after, LATENCY), histogram_buckets(before, LATENCY))

    def delta(name: str) -> float:
        return sample(after, name) - sample(before, name)

    batches = delta("stream_detector_batch_seconds_count")
    return {
        "histogram": {
            "count": int(delta(f"{LATENCY}_count")),
            "p50_ms": ms(histogram_quantile(0.5, buckets)),
            "p99_ms": ms(histogram_quantile(0.99, buckets)),
            "max_le_ms": ms(histogram_max_bound(buckets)),
        },
        "anomalies": delta("stream_detector_anomalies_total"),
        "batches": batches,
        "mean_batch_records": delta("stream_detector_batch_size_events_sum") / batches if batches else None,
        "mean_batch_ms": 1000 * delta("stream_detector_batch_seconds_sum") / batches if batches else None,
        "checkpoints": delta("stream_detector_checkpoint_seconds_count"),
        "checkpoint_mean_ms": 1000 * delta("stream_detector_checkpoint_seconds_sum") / max(1.0, delta("stream_detector_checkpoint_seconds_count")),
        # State snapshots written to the changelog (both trees export it).
        "changelog_bytes": delta("stream_detector_changelog_bytes_total"),
    }


def population_figures(bs: str, group: str, daemons: list[TreeDaemon], merged: Samples) -> dict[str, Any] | None:
    """Ours only: the population metrics and the topic's records and bytes (None for a tree
    without the metric: the baseline)."""
    if "stream_detector_population_records_total" not in merged:
        return None
    outcomes = {labels["outcome"]: value for labels, value in merged["stream_detector_population_records_total"]}
    topic = f"{group}-population"  # the default name: neither config names one
    records = read_topic(bs, topic, expected=int(outcomes.get("sent", 0)), idle_s=2.0)
    return {
        "topic": topic,
        "records_by_outcome": outcomes,
        "calibration_partitions_by_instance": [sample(d.samples(), "stream_detector_calibration_partitions") for d in daemons],
        "topic_records": len(records),
        "topic_bytes": sum(len(value or b"") for value, _ts in records),
    }


def log_findings(path: Path) -> dict[str, Any]:
    """Warnings and errors in a daemon's JSON log: counts, and the first few messages."""
    counts: Counter[str] = Counter()
    first: list[str] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"counts": {}, "first": []}
    for line in lines:
        try:
            record = orjson.loads(line)
            level, message = str(record.get("level", "")), str(record.get("message", ""))
        except orjson.JSONDecodeError:
            level, message = "not json", line
        if level in ("warning", "error", "critical", "not json"):
            counts[level] += 1
            if len(first) < 5:
                first.append(f"{level}: {message[:300]}")
    return {"counts": dict(counts), "first": first}


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000.0 * seconds


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def best(values: list[float | None], higher: bool) -> float | None:
    """The best of a tree's runs: other jobs on the shared cores only ever slow a run down, so
    the best run is the one they disturbed least. None if a run has no figure."""
    if not values or None in values:
        return None
    known = [v for v in values if v is not None]
    return max(known) if higher else min(known)


def run_scale(plan: Plan, base_tree: Path | None = None, base_rev: str = BASE_REV, log: Log = _say) -> dict[str, Any]:
    """Both trees on one broker, ``plan.rounds`` rounds (every other one in reverse order), and
    each tree's best run (``best``); ratios are ours over the baseline, of the best runs and
    round by round."""
    from stream_detector.embedded_broker import EmbeddedBroker

    stream = list(generated_events(plan.events + plan.rate + int(plan.rate * plan.latency_seconds), SEED))
    result: dict[str, Any] = {
        "base_rev": base_rev,
        "partitions": PARTITIONS,
        "instances": INSTANCES,
        "events": plan.events,
        "rate": plan.rate,
        "latency_seconds": plan.latency_seconds,
        "rounds": plan.rounds,
        "seed": SEED,
        "consumer_config": CONSUMER_CONFIG,
        "state": plan.state,
        "runs": {"baseline": [], "ours": []},
    }
    # Every other round in reverse, so that neither tree always runs on the fresher broker.
    order = [("baseline", "ours") if i % 2 == 0 else ("ours", "baseline") for i in range(plan.rounds)]
    result["order"] = [label for labels in order for label in labels]
    t0 = time.perf_counter()
    with sigterm_exits(), baseline_tree(base_rev, base_tree) as base, EmbeddedBroker() as broker:
        trees = {"baseline": base, "ours": ROOT}
        for label, tree in trees.items():
            log(f"scale: {label}: stream_detector imports from {imported_from(tree)}")
        for labels in order:
            for label in labels:
                log(f"scale: {label} ({trees[label]})")
                result["runs"][label].append(run_tree(broker.bootstrap_servers, trees[label], stream, plan, log, broker.pid))
    result["seconds"] = time.perf_counter() - t0
    for label, runs in result["runs"].items():
        result[label] = {
            "events_per_s": best([r["throughput"]["first_to_last"] for r in runs], higher=True),
            "backlog_events_per_s": best([r["throughput"]["backlog"] for r in runs], higher=True),
            "p50_ms": best([r["latency"]["histogram"]["p50_ms"] for r in runs], higher=False),
            "p99_ms": best([r["latency"]["histogram"]["p99_ms"] for r in runs], higher=False),
            "timestamps_p50_ms": best([r["latency"]["timestamps"]["p50_ms"] for r in runs], higher=False),
            "timestamps_p99_ms": best([r["latency"]["timestamps"]["p99_ms"] for r in runs], higher=False),
            "cpu_us_per_event": best([r["throughput"]["cpu_us_per_event"] for r in runs], higher=False),
        }
    b, o = result["baseline"], result["ours"]
    result["ratios"] = {key: ratio(o[key], b[key]) for key in b}
    # Round by round (the two trees' runs next to each other in time), for the spread.
    pairs = list(zip(result["runs"]["baseline"], result["runs"]["ours"], strict=True))
    result["round_ratios"] = {
        "events_per_s": [ratio(our["throughput"]["first_to_last"], base["throughput"]["first_to_last"]) for base, our in pairs],
        "p99_ms": [ratio(our["latency"]["histogram"]["p99_ms"], base["latency"]["histogram"]["p99_ms"]) for base, our in pairs],
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.events:,} events, {QUICK.latency_seconds:.0f} s paced, one round")
    parser.add_argument("--events", type=int, help=f"the throughput backlog (default: {FULL.events:,}, {QUICK.events:,} with --quick)")
    parser.add_argument("--rate", type=int, default=RATE, help="events/s of the latency phase")
    parser.add_argument("--rounds", type=int, help="rounds of the two trees (default: 1 with --quick, else 2)")
    parser.add_argument("--state-off", action="store_true", help="a probe: state.enabled false in both trees (no changelog)")
    parser.add_argument("--base-tree", type=Path, help=f"a checkout of the baseline (default: a temporary worktree of {BASE_REV})")
    parser.add_argument("--base-rev", default=BASE_REV, help="the baseline commit, when --base-tree is not given")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    plan = dataclasses.replace(plan, events=args.events or plan.events, rate=args.rate, rounds=args.rounds or plan.rounds, state=not args.state_off)
    result = run_scale(plan, args.base_tree, args.base_rev)
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
