"""Limits on alert windows and the log lines that trace them (issue 19, point 8).

A window longer than ``alerts.max_window_seconds`` is refused, from the control topic (a
ControlError with the bounded reason ``too_long``) and from the configuration (a ConfigError
naming the key); every window logs what added it, and once, when it starts suppressing alerts,
its scope, span and source.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from stream_detector.alerting.policy import AlertPolicy
from stream_detector.alerting.windows import AlertWindow, ControlError, WindowBook
from stream_detector.config import load_settings
from stream_detector.errors import ConfigError
from stream_detector.metrics import CONTROL_OUTCOMES
from tests.unit.alerting.helpers import DAY, T0, record

WEEK = 7 * DAY
FOREVER = {"name": "forever", "action": "suppress", "start": "2026-01-01T00:00:00Z", "end": "2162-01-01T00:00:00Z"}
STOCKTAKE = {"name": "stocktake", "action": "suppress", "scope": {"store_id": ["s-001"]}, "start": "2026-11-27", "end": "2026-11-28"}


def test_a_control_window_longer_than_the_maximum_is_refused_and_keeps_the_old_one():
    book = WindowBook(max_seconds=WEEK)
    assert book.apply_control(STOCKTAKE, source="control[0]@1") == "added"
    with pytest.raises(ControlError) as caught:
        book.apply_control(FOREVER)
    assert caught.value.reason == "too_long" and caught.value.reason in CONTROL_OUTCOMES
    assert "'forever' spans 49,673.0 days" in caught.value.detail and "alerts.max_window_seconds (604,800 s = 7.0 days)" in caught.value.detail
    with pytest.raises(ControlError, match="too_long"):  # nor can a known window be stretched
        book.apply_control({**STOCKTAKE, "end": "2027-11-28"})
    assert [(w.name, w.end.year) for w in book.windows] == [("stocktake", 2026)]
    exactly = {**STOCKTAKE, "name": "week", "end": "2026-12-04"}  # the maximum itself is allowed
    assert book.apply_control(exactly) == "added"
    assert WindowBook().apply_control(FOREVER) == "added"  # no maximum given: none applied


def test_config_windows_longer_than_the_maximum_are_a_config_error(tmp_path: Path):
    path = tmp_path / "detector.yaml"
    path.write_text("alerts:\n  windows:\n    - {name: forever, start: '2026-01-01', end: '2162-01-01'}\n")
    with pytest.raises(ConfigError, match=r"alerts: .*'forever' spans .*more than alerts\.max_window_seconds"):
        load_settings(path, environ={})
    settings = load_settings(path, environ={"STREAM_DETECTOR_ALERTS__MAX_WINDOW_SECONDS": str(200 * 365 * DAY)})
    assert settings.alerts.windows[0].name == "forever"
    assert load_settings(environ={}).alerts.max_window_seconds == 31 * DAY
    with pytest.raises(ConfigError, match=r"alerts\.max_window_seconds"):
        load_settings(environ={"STREAM_DETECTOR_ALERTS__MAX_WINDOW_SECONDS": "0"})


def test_control_changes_are_logged_with_their_scope_and_source(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, "stream_detector.alerting")
    book = WindowBook(max_seconds=WEEK)
    book.apply_control(STOCKTAKE, source="control[0]@7")
    book.apply_control({"action": "cancel", "name": "stocktake"}, source="control[0]@8")
    added, cancelled = (r.getMessage() for r in caplog.records)
    assert added == (
        "alert window 'stocktake' added by control[0]@7: suppress alerts of store_id in [s-001] "
        "from 2026-11-27T00:00:00+00:00 to 2026-11-28T00:00:00+00:00 (24.0 hours)"
    )
    assert cancelled == "alert window 'stocktake' cancelled by control[0]@8"


def test_a_window_logs_once_when_it_starts_suppressing(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, "stream_detector.alerting")
    book = WindowBook([AlertWindow(name="xmas", start="2026-12-25", end="2026-12-26")], max_seconds=WEEK)
    book.apply_control(STOCKTAKE, source="control[0]@3")
    book.apply_control({**STOCKTAKE, "name": "promo", "action": "annotate", "scope": {}}, source="control[0]@4")
    policy = AlertPolicy(book)
    caplog.clear()

    assert policy.review(record("e-1", "s-002"), T0 + 60, None).publish  # annotated only: nothing suppressed
    for i in range(3):
        assert not policy.review(record(f"e-{i + 2}", "s-001"), T0 + 60 + i, None).publish
    assert not policy.review({"key_set": "store_id", "key": "s-000"}, T0 + 28 * DAY + 60, None).publish  # a collective alert, in xmas
    started = [r for r in caplog.records if "started suppressing" in r.getMessage()]
    assert [(r.levelno, r.window, r.window_source) for r in started] == [  # type: ignore[attr-defined]
        (logging.WARNING, "stocktake", "control[0]@3"),  # from the control topic: a warning
        (logging.INFO, "xmas", "config"),
    ]
    assert started[0].getMessage() == (
        "alert window 'stocktake' (from control[0]@3) started suppressing alerts, first event e-2: suppress alerts of "
        "store_id in [s-001] from 2026-11-27T00:00:00+00:00 to 2026-11-28T00:00:00+00:00 (24.0 hours)"
    )
    assert "first key store_id=s-000: suppress alerts of every key" in started[1].getMessage()

    caplog.clear()  # replaced: the new window logs again when it suppresses
    book.apply_control({**STOCKTAKE, "scope": {"store_id": [f"s-{i:03d}" for i in range(25)]}}, source="control[0]@9")
    assert not policy.review(record("e-9", "s-001"), T0 + 120, None).publish
    [again] = [r for r in caplog.records if "started suppressing" in r.getMessage()]
    assert "store_id in [s-000, s-001, s-002, s-003, s-004, s-005, s-006, s-007, s-008, s-009, ... 15 more]" in again.getMessage()
