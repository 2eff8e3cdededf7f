"""evaluation.labels: window matching and the labels file of ``generate --labels``."""

from __future__ import annotations

import pytest

from stream_detector.errors import ConfigError
from stream_detector.evaluation import CollectiveAlert, Labels, WindowLabel, match_windows


def test_match_windows_key_interval_and_grace():
    windows = [WindowLabel("store_stopped", "s-1", 1000.0, 2000.0), WindowLabel("store_stopped", "s-2", 5000.0, 6000.0)]
    alerts = [
        CollectiveAlert("s-1", 2500.0),  # after the end, within 15 min: detected, 1500 s after the start
        CollectiveAlert("s-1", 2800.0),  # a second alert for the same window
        CollectiveAlert("s-2", 4000.0),  # before its window
        CollectiveAlert("s-2", 6901.0),  # 901 s after the end: too late
        CollectiveAlert("s-3", 1500.0),  # another store
        CollectiveAlert("s-2", 5500.0, kind="other_kind"),  # another kind of window
    ]
    matches, unmatched = match_windows(windows, alerts, grace_s=900.0)
    assert [m.detected for m in matches] == [True, False]
    assert matches[0].first_alert == 2500.0 and matches[0].delay_s == 1500.0
    assert matches[1].delay_s is None
    assert sorted((a.key, a.event_time) for a in unmatched) == [("s-2", 4000.0), ("s-2", 5500.0), ("s-2", 6901.0), ("s-3", 1500.0)]


def test_labels_load_reads_generate_output(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_bytes(
        b'{"kind":"price_spike","event_id":"e-0-1"}\n'
        b"\n"
        b'{"kind":"store_stopped","store_id":"s-022","start":"2026-01-05T11:08:00.000Z","end":"2026-01-05T13:42:00.000Z"}\n'
    )
    labels = Labels.load(path)
    assert labels.points == {"e-0-1": "price_spike"}
    (window,) = labels.windows
    assert (window.kind, window.key, window.end - window.start) == ("store_stopped", "s-022", 154 * 60.0)
    path.write_bytes(b'{"kind":"store_stopped","store_id":"s-1"}\n')
    with pytest.raises(ConfigError, match="line 1"):
        Labels.load(path)


def test_change_labels_are_read_as_change_points(tmp_path):
    from stream_detector.evaluation import ChangeLabel

    path = tmp_path / "labels.jsonl"
    path.write_bytes(
        b'{"kind": "price_spike", "event_id": "e1"}\n'
        b'{"kind": "level_shift", "start": "2026-01-05T00:01:00.000Z", "scenario": "price_change", '
        b'"key_set": "product_id", "key": "p-0001", "feature": "unit_price", "factor": 2.5}\n'
    )
    labels = Labels.load(path)
    assert labels.points == {"e1": "price_spike"} and labels.windows == []
    assert labels.changes == [ChangeLabel("level_shift", "product_id", "p-0001", 1_767_571_260.0, "price_change", "unit_price", 2.5)]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"kind": "level_shift", "key": "s-1", "start": "2026-01-05T00:00:00Z"}\n')
    with pytest.raises(ConfigError, match="line 1: a level_shift label needs a 'key_set'"):
        Labels.load(bad)
