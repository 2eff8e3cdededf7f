"""Feedback on a level_shift record reaches the partition whose pipeline declared the shift."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_detector.alerting.policy import AlertPolicy
from stream_detector.alerting.windows import WindowBook
from stream_detector.config import load_settings
from stream_detector.metrics import Metrics
from stream_detector.runtime.control_loop import ControlTopics
from stream_detector.scoring.level_shift import LevelShiftTracker

SHIFT_ID = "level_shift:store_id:s-1:log_amount:e-9"


class Pipeline:
    """What the control loop asks of a partition's pipeline, with a tracker that declared one shift."""

    def __init__(self) -> None:
        self.feedback = None
        self.level_shifts = LevelShiftTracker(key_sets={"store_id": ("log_amount",)}, features=("log_amount",), axis={"store_id": 0})
        self.level_shifts.undo[SHIFT_ID] = ("store_id", "s-1", "log_amount", [])
        self.restored: list[Any] = []

    def level_shift_feedback(self, shift_id: str, label: str) -> str:
        outcome, restore = self.level_shifts.feedback(shift_id, label)
        if restore is not None:
            self.restored.append(restore)
        return outcome


@dataclass
class Work:
    pipeline: Pipeline
    dirty: bool = False


def control() -> tuple[ControlTopics, Metrics]:
    metrics = Metrics()
    return ControlTopics(load_settings(None, environ={}), metrics, AlertPolicy(WindowBook())), metrics


def counted(metrics: Metrics, label: str, outcome: str) -> float:
    return float(metrics.registry.get_sample_value("stream_detector_feedback_total", {"label": label, "outcome": outcome}) or 0.0)


def test_reject_on_a_level_shift_restores_in_the_partition_that_declared_it():
    topics, metrics = control()
    other, mine = Work(Pipeline()), Work(Pipeline())
    other.pipeline.level_shifts.undo.clear()
    partitions = {("sales", 0): other, ("sales", 1): mine}
    topics.take_feedback(partitions, SHIFT_ID, "reject", "not a real change")
    assert mine.pipeline.restored == [("store_id", "s-1", [])] and mine.dirty and not other.dirty
    assert mine.pipeline.level_shifts.rejected == {("store_id", "s-1", "log_amount"): SHIFT_ID}
    assert counted(metrics, "reject", "applied") == 1.0
    topics.take_feedback(partitions, SHIFT_ID, "accept", "")
    assert counted(metrics, "accept", "duplicate") == 1.0


def test_accept_keeps_the_new_level_and_unknown_ids_wait():
    topics, metrics = control()
    work = Work(Pipeline())
    topics.take_feedback({("sales", 0): work}, SHIFT_ID, "accept", "")
    assert work.pipeline.restored == [] and counted(metrics, "accept", "recorded") == 1.0
    assert work.pipeline.level_shifts.adapting == {} and not work.pipeline.level_shifts.rejected
    topics.take_feedback({("sales", 0): work}, "level_shift:store_id:s-2:log_amount:e-1", "reject", "")
    assert list(topics.pending_feedback) == ["level_shift:store_id:s-2:log_amount:e-1"]
    assert np.isclose(counted(metrics, "reject", "pending"), 1.0)
