"""Whether the daemon makes progress: what /readyz and /healthz say, and when it gives up.

Progress is a checkpoint committed, or nothing uncommitted with the input read to its end.
Rewinds and waiting work are counted from the last progress:

* a rewind (after a failure) that is the ``processing.max_rewinds_without_progress``-th in a
  row without progress raises ``StalledError``: the same records fail every time, and a
  restart reconnects;
* work that waits ``processing.max_stall_s`` for progress raises ``StalledError`` too (a broker
  replaced under the daemon that never acknowledges its records);
* /readyz says 503 while it rewinds without progress, or once work has waited
  ``not_ready_after_s``; /healthz fails once the loop has stopped on a failure, or when it has
  not turned for ``processing.max_stall_s`` (blocked).

The loop reports its turns and progress here; the clock is injectable for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from stream_detector.config import ProcessingConfig
from stream_detector.errors import StalledError

# /readyz says 503 once work has waited this long for a checkpoint (or 3 commit intervals).
NOT_READY_AFTER_S = 10.0


class Liveness:
    def __init__(self, processing: ProcessingConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.processing = processing
        self.clock = clock
        self.progress_at = clock()  # the last progress
        self.heartbeat = clock()  # the loop's last turn (or wait step)
        self.rewinds = 0  # in a row, since the last progress
        self.failed: str | None = None  # why the loop stopped, if it failed

    def started(self) -> None:
        self.progress_at = self.heartbeat = self.clock()

    def paused(self, seconds: float) -> None:
        """The loop spent ``seconds`` on work that is not waiting for a checkpoint (restoring
        newly assigned partitions): neither a stall nor a blocked loop."""
        self.progress_at += seconds
        self.heartbeat = self.clock()

    def made_progress(self) -> None:
        self.progress_at = self.clock()
        self.rewinds = 0

    def rewound(self) -> None:
        """Count a rewind; ``StalledError`` when it is one too many in a row."""
        self.rewinds += 1
        bound = self.processing.max_rewinds_without_progress
        if self.rewinds > bound:
            raise StalledError(
                f"{bound} rewind(s) in a row without a checkpoint committed (processing.max_rewinds_without_progress): "
                "the same records fail every time; exiting so that a restart reconnects"
            )

    def check(self, stopping: bool) -> None:
        """A turn of the loop (or a step of a wait); ``StalledError`` when work has waited
        processing.max_stall_s for progress, unless stopping (the shutdown has its own bound)."""
        self.heartbeat = now = self.clock()
        limit = self.processing.max_stall_s
        if limit is not None and now - self.progress_at > limit and not stopping:
            raise StalledError(
                f"no progress for {now - self.progress_at:.0f} s (processing.max_stall_s: {limit:g}): "
                "nothing committed while work waits; exiting so that a restart reconnects"
            )

    @property
    def not_ready_after_s(self) -> float:
        """Work waiting this long for a checkpoint makes /readyz say 503: NOT_READY_AFTER_S or 3
        commit intervals, and at most half of processing.max_stall_s (503 before the exit)."""
        p = self.processing
        after = max(NOT_READY_AFTER_S, 3 * p.commit_interval_ms / 1000.0)
        return after if p.max_stall_s is None else min(after, p.max_stall_s / 2)

    def readiness(self, running: bool, partitions: int) -> tuple[bool, str]:
        """/readyz: (ready, why) for a loop that is ``running`` with ``partitions`` assigned."""
        if not running:
            return False, "not running"
        if not partitions:
            return False, "no partitions assigned (or state not restored) yet"
        if self.rewinds:
            bound = self.processing.max_rewinds_without_progress
            return False, f"rewinding without progress: {self.rewinds} rewind(s) since the last checkpoint (processing.max_rewinds_without_progress: {bound})"
        waited = self.clock() - self.progress_at
        if waited > self.not_ready_after_s:
            return False, f"no checkpoint for {waited:.0f} s: waiting for the broker"
        return True, f"ready: {partitions} partition(s) assigned, state restored"

    def liveness(self, running: bool) -> tuple[bool, str]:
        """/healthz: fails once the loop has stopped on a failure, or when it has not turned for
        processing.max_stall_s (blocked); the process then exits, or should be restarted."""
        if self.failed is not None:
            return False, f"the consume loop stopped: {self.failed}"
        limit = self.processing.max_stall_s
        blocked = self.clock() - self.heartbeat
        if running and limit is not None and blocked > limit:
            return False, f"the consume loop has not turned for {blocked:.0f} s (processing.max_stall_s: {limit:g})"
        return True, "ok"
