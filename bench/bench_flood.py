"""Key floods (issue 19, point 4): daemon throughput, RSS and checkpoint cost when keys are all new.

Every flood event brings three new keys; the baseline is the daemon of the commit before bounded
per-key state (``BASE_REV``), run on the same events in the same run.

Used by ``bench/run.py`` (section ``flood``); see ``docs/benchmarks.md``. For each source tree
(the baseline first, then the working tree), on a fresh embedded broker:

* 2N generated sale events are produced, before the daemon starts, into a new input topic of one
  partition: N as the generator makes them ("normal"), then N whose store_id, product_id and
  customer_id are fresh random 200-character strings ("flood": three new keys per event). One
  generator makes all 2N, so event time goes on increasing across the two phases.
* The daemon (default settings: at-least-once, state enabled, its changelog topic created by
  itself) is started from that tree (``python -m stream_detector run`` with the tree as working
  directory and PYTHONPATH) and drains the backlog. /metrics is scraped every
  ``SCRAPE_EVERY_S``, and the daemon's VmRSS read at each scrape, until the group's committed
  offset covers all 2N records.
* A phase's rate is the scored count between two scrapes that both fall inside it, over the time
  between them: normal from the first scrape with events scored to the last one with at most N;
  flood from the first one with at least N to the last one before 2N. Checkpoints, changelog
  bytes and the checkpoint-duration histogram are counted over contiguous windows: normal from
  the first scrape to the last one with at most N, flood from there to the scrape after the last
  commit. RSS and the state gauges are read at the end of each window.

The baseline has no ``state.max_bytes`` and exports neither the state-size nor the changelog
metrics: those figures are None. The baseline tree is a ``git worktree`` of ``BASE_REV`` made in
/tmp for the run and removed afterwards (``--base-tree`` reuses an existing checkout).

    python -m bench.bench_flood [--events N] [--base-tree PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.bench_e2e import CommittedWatcher, bench_config, histogram_buckets, histogram_quantile
from tests.daemon_helpers import DaemonProcess, Samples, child_env, sample

Log = Callable[[str], None]

ROOT = Path(__file__).resolve().parent.parent
BASE_REV = "21bc1d3"  # the commit before bounded per-key state
SCRAPE_EVERY_S = 0.5
SETTLE_S = 1.5  # after the last commit, before the final scrape
FLOOD_ID_CHARS = 200
FLOODED_FIELDS = {"store_id": "s-", "product_id": "p-", "customer_id": "c-"}
CHECKPOINT = "stream_detector_checkpoint_seconds"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


def phase_events(n: int, seed: int) -> list[dict]:
    """2n generated events: the first n as generated, the last n with fresh flooded ids."""
    from stream_detector.generator import GeneratorConfig, SalesGenerator

    events = [event for event, _label in SalesGenerator(GeneratorConfig(seed=seed)).generate(2 * n)]
    rng = random.Random(seed)
    for event in events[n:]:
        for name, prefix in FLOODED_FIELDS.items():
            event[name] = fresh_id(rng, prefix)
    return events


def fresh_id(rng: random.Random, prefix: str) -> str:
    """``prefix`` and random hex digits, FLOOD_ID_CHARS characters in all."""
    digits = FLOOD_ID_CHARS - len(prefix)
    return f"{prefix}{rng.getrandbits(4 * digits):0{digits}x}"


# --------------------------------------------------------------------------------------------
# Source trees
# --------------------------------------------------------------------------------------------


def tree_env(tree: Path) -> dict[str, str]:
    return {**child_env(keep_overrides=False), "PYTHONPATH": str(tree)}


def imported_from(tree: Path) -> Path:
    """Where ``import stream_detector`` resolves for a child run in ``tree``; raises if outside it."""
    out = subprocess.run(
        [sys.executable, "-c", "import stream_detector; print(stream_detector.__file__)"],
        cwd=tree,
        env=tree_env(tree),
        capture_output=True,
        text=True,
        check=True,
    )
    path = Path(out.stdout.strip()).resolve()
    if not path.is_relative_to(tree.resolve()):
        raise RuntimeError(f"stream_detector imports from {path}, not from {tree}")
    return path


@contextlib.contextmanager
def baseline_tree(rev: str, existing: Path | None) -> Iterator[Path]:
    """``existing``, or a temporary ``git worktree`` of ``rev`` removed on the way out."""
    if existing is not None:
        yield existing
        return
    path = Path(tempfile.mkdtemp(prefix="sd-base-"))
    git = ["git", "-C", str(ROOT), "worktree"]
    subprocess.run([*git, "add", "--detach", str(path), rev], check=True, capture_output=True, text=True)
    try:
        yield path
    finally:
        subprocess.run([*git, "remove", "--force", str(path)], check=False, capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """SIGTERM (run.py's timeout) unwinds like Ctrl-C, so the worktree and broker get removed."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class TreeDaemon(DaemonProcess):
    """The daemon run from ``tree``: its working directory and PYTHONPATH, so that
    ``python -m stream_detector`` imports that tree's package."""

    def __init__(self, tree: Path, config_path: Path, log_path: Path) -> None:
        super().__init__(config_path, log_path, env=tree_env(tree), die_with_parent=True)
        self.tree = tree

    def start(self) -> TreeDaemon:
        from stream_detector.embedded_broker import die_with_parent_hook

        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stream_detector", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tree,
                env=self.env,
                preexec_fn=die_with_parent_hook(),
            )
        return self

    def rss_kib(self) -> int | None:
        return status_kib(None if self.process is None else self.process.pid, "VmRSS")

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise RuntimeError(f"daemon exited (code {code}). Log tail:\n{self.log_tail()}")


def status_kib(pid: int | None, field_name: str) -> int | None:
    """A /proc/<pid>/status field in KiB (VmRSS, VmHWM), None if unknown."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------------------------
# Scrapes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scrape:
    """One look at the daemon: its metrics that matter here, and its RSS."""

    at: float
    scored: float
    invalid: float
    commits: float
    rss_kib: int | None
    changelog_bytes: float | None  # None: a tree without the metric
    state_bytes: float | None
    forgotten: float | None
    keys: dict[str, float]
    checkpoints: list[tuple[float, float]] = field(repr=False)
    checkpoint_sum: float = 0.0

    @property
    def seen(self) -> float:
        return self.scored + self.invalid


def optional(m: Samples, name: str) -> float | None:
    return sample(m, name) if name in m else None


def scrape(daemon: TreeDaemon) -> Scrape:
    m = daemon.samples(timeout=2.0)
    return Scrape(
        at=time.monotonic(),
        scored=sample(m, "stream_detector_events_total", outcome="scored"),
        invalid=sample(m, "stream_detector_events_total", outcome="invalid"),
        commits=sample(m, "stream_detector_commits_total", result="ok"),
        rss_kib=daemon.rss_kib(),
        changelog_bytes=optional(m, "stream_detector_changelog_bytes_total"),
        state_bytes=optional(m, "stream_detector_state_bytes"),
        forgotten=optional(m, "stream_detector_state_keys_forgotten_total"),
        keys={labels["key_set"]: value for labels, value in m.get("stream_detector_keys", [])},
        checkpoints=histogram_buckets(m, CHECKPOINT),
        checkpoint_sum=sample(m, f"{CHECKPOINT}_sum"),
    )


def drain(daemon: TreeDaemon, watcher: CommittedWatcher, total: int, timeout: float) -> list[Scrape]:
    """Scrapes every SCRAPE_EVERY_S from the first answer until the committed offset covers
    ``total`` records, and one more SETTLE_S after that."""
    scrapes: list[Scrape] = []
    deadline = time.monotonic() + timeout
    while True:
        daemon.check_alive()
        if time.monotonic() > deadline:
            seen = scrapes[-1].seen if scrapes else 0
            raise RuntimeError(f"{seen:.0f} of {total} events scored after {timeout:.0f} s. Log tail:\n{daemon.log_tail()}")
        try:
            scrapes.append(scrape(daemon))
        except OSError:
            time.sleep(0.05)  # not serving yet
            continue
        if scrapes[-1].seen >= total and watcher.total() >= total:
            time.sleep(SETTLE_S)  # the state gauges are refreshed at most once a second
            scrapes.append(scrape(daemon))
            return scrapes
        time.sleep(SCRAPE_EVERY_S)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def phase_rate(scrapes: list[Scrape], low: float, high: float) -> float | None:
    """Events per second between the first scrape with ``seen`` >= low and the last one with
    ``seen`` <= high: both inside the phase, so the counts at both ends are exact."""
    inside = [s for s in scrapes if low <= s.seen <= high]
    if len(inside) < 2 or inside[-1].at <= inside[0].at:
        return None
    return (inside[-1].seen - inside[0].seen) / (inside[-1].at - inside[0].at)


def window_figures(start: Scrape, end: Scrape) -> dict[str, Any]:
    """What happened between two scrapes: checkpoints and their cost, and the state at ``end``."""
    commits = end.commits - start.commits
    count = (end.checkpoints[-1][1] - start.checkpoints[-1][1]) if end.checkpoints and start.checkpoints else 0.0
    changelog = None if end.changelog_bytes is None or start.changelog_bytes is None else end.changelog_bytes - start.changelog_bytes
    earlier = dict(start.checkpoints)
    between = [(bound, cumulative - earlier.get(bound, 0.0)) for bound, cumulative in end.checkpoints]
    p50 = histogram_quantile(0.5, between) if count else None
    return {
        "seconds": end.at - start.at,
        "events": end.seen - start.seen,
        "checkpoints": commits,
        "changelog_bytes": changelog,
        "changelog_bytes_per_checkpoint": changelog / commits if changelog is not None and commits else None,
        "checkpoint_p50_s": p50,
        "checkpoint_mean_s": (end.checkpoint_sum - start.checkpoint_sum) / count if count else None,
        "rss_mib": None if end.rss_kib is None else end.rss_kib / 1024,
        "state_bytes": end.state_bytes,
        "keys_forgotten": end.forgotten,
        "keys": end.keys,
    }


def tree_figures(scrapes: list[Scrape], n: int) -> dict[str, Any]:
    """The two phases' figures (module docstring) from one drain of 2n events."""
    last_normal = max((s for s in scrapes if s.seen <= n), key=lambda s: s.at)
    normal = window_figures(scrapes[0], last_normal)
    flood = window_figures(last_normal, scrapes[-1])
    normal["events_per_s"] = phase_rate(scrapes, 1, n)
    flood["events_per_s"] = phase_rate(scrapes, n, 2 * n - 1)
    return {
        "normal": normal,
        "flood": flood,
        "invalid": scrapes[-1].invalid,
        "scrapes": len(scrapes),
        "flood_vs_normal": ratio(flood["events_per_s"], normal["events_per_s"]),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def run_tree(tree: Path, events: list[dict], log: Log, timeout: float, **sections: dict[str, Any]) -> dict[str, Any]:
    """One tree's drain of ``events`` (both phases) on a fresh broker, with ``sections`` in its config."""
    from stream_detector.embedded_broker import EmbeddedBroker
    from stream_detector.generator import produce_to_kafka
    from stream_detector.runtime.topics import ensure_topics

    n = len(events) // 2
    work = Path(tempfile.mkdtemp(prefix="bench-flood-"))
    try:
        with EmbeddedBroker() as broker:
            bs = broker.bootstrap_servers
            tag = uuid.uuid4().hex[:8]
            inp, out, dlq, group = (f"flood-{role}-{tag}" for role in ("in", "out", "dlq", "group"))
            ensure_topics(bs, {inp: 1, out: 1, dlq: 1})
            t0 = time.perf_counter()
            if produce_to_kafka(events, bs, inp) != len(events):
                raise RuntimeError(f"produced fewer than {len(events)} events")
            produce_s = time.perf_counter() - t0
            log(f"flood: {len(events):,} events produced in {produce_s:.1f} s; daemon from {tree}")
            config = bench_config(work / "detector.yaml", bs, inp, out, dlq, group, **sections)
            daemon = TreeDaemon(tree, config, work / "daemon.log").start()
            watcher = CommittedWatcher(bs, group, inp, 1)
            try:
                scrapes = drain(daemon, watcher, len(events), timeout)
                hwm = status_kib(daemon.process.pid if daemon.process else None, "VmHWM")
            finally:
                watcher.close()
                code = daemon.stop()
        result = tree_figures(scrapes, n)
        result.update(tree=str(tree), produce_seconds=produce_s, peak_rss_mib=None if hwm is None else hwm / 1024, exit_code=code)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_flood(
    n: int,
    base_tree: Path | None = None,
    base_rev: str = BASE_REV,
    seed: int = 19,
    log: Log = _say,
    timeout: float = 300.0,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """The baseline tree, then the working tree, each draining the same 2n events. ``max_bytes``:
    the working tree's ``state.max_bytes`` (default: its default); the baseline has none."""
    from stream_detector.config import load_settings

    events = phase_events(n, seed)
    result: dict[str, Any] = {"events_per_phase": n, "base_rev": base_rev, "flood_id_chars": FLOOD_ID_CHARS}
    result["max_bytes"] = max_bytes if max_bytes is not None else load_settings(environ={}).state.max_bytes
    ours = {"state": {"max_bytes": max_bytes}} if max_bytes is not None else {}
    with sigterm_exits(), baseline_tree(base_rev, base_tree) as base:
        for label, tree in (("baseline", base), ("ours", ROOT)):
            log(f"flood: {label}: stream_detector imports from {imported_from(tree)}")
            result[label] = run_tree(tree, events, log, timeout, **(ours if tree == ROOT else {}))
            log(f"flood: {label}: " + ", ".join(f"{p} {num_or_na(result[label][p]['events_per_s'])} ev/s" for p in ("normal", "flood")))
    result["ours_vs_baseline_flood"] = ratio(result["ours"]["flood"]["events_per_s"], result["baseline"]["flood"]["events_per_s"])
    return result


def num_or_na(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=30_000, help="events per phase (normal, then flood)")
    parser.add_argument("--base-tree", type=Path, help=f"a checkout of the baseline (default: a temporary worktree of {BASE_REV})")
    parser.add_argument("--base-rev", default=BASE_REV, help="the baseline commit, when --base-tree is not given")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds each tree may take to drain both phases")
    parser.add_argument("--max-bytes", type=int, help="the working tree's state.max_bytes (default: its default)")
    args = parser.parse_args()
    print(json.dumps(run_flood(args.events, args.base_tree, args.base_rev, timeout=args.timeout, max_bytes=args.max_bytes), indent=2, default=str))


if __name__ == "__main__":
    main()
