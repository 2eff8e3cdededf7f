"""stream_detector.reporting: progress lines."""

from __future__ import annotations

import io
import time

from stream_detector.reporting import Progress


def test_progress_prints_at_most_every_interval():
    stream = io.StringIO()
    progress = Progress("evaluate", total=100, stream=stream, interval=0.05)
    progress(10)  # too soon after the start
    time.sleep(0.06)
    progress(50)
    progress(60)  # too soon after the last line
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert "50/100 events (50.0 %)" in lines[0] and "events/s" in lines[0]
