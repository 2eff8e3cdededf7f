"""RepeatFilter: the first message of a kind passes, its repeats at most once per interval with a count."""

from __future__ import annotations

import logging

from stream_detector.logs import RepeatFilter, librdkafka_kind


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(message: str, level: int = logging.WARNING, name: str = "stream_detector.librdkafka") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_repeats_within_the_interval_are_dropped_then_summarised_with_a_count():
    clock = Clock()
    flt = RepeatFilter(10.0, clock=clock)
    assert flt.filter(_record("Connect failed (after 0ms in state CONNECT)"))
    passed = []
    for i in range(220):  # 22 a second for 10 s, with changing numbers
        clock.now = i * 0.045
        record = _record(f"Connect failed (after {i}ms in state CONNECT)")
        if flt.filter(record):
            passed.append(record)
    assert passed == []
    clock.now = 10.0
    summary = _record("Connect failed (after 9ms in state CONNECT)")
    assert flt.filter(summary)
    assert summary.repeated == 220
    # The count starts again after each line that passes.
    clock.now = 10.5
    assert not flt.filter(_record("Connect failed (after 1ms in state CONNECT)"))
    clock.now = 20.0
    again = _record("Connect failed (after 1ms in state CONNECT)")
    assert flt.filter(again)
    assert again.repeated == 1


def test_kinds_are_separate_by_message_level_and_logger():
    flt = RepeatFilter(10.0, clock=Clock())
    assert flt.filter(_record("broker down"))
    assert flt.filter(_record("something else"))
    assert flt.filter(_record("broker down", level=logging.ERROR))
    assert flt.filter(_record("broker down", name="stream_detector.daemon"))
    assert not flt.filter(_record("broker down"))
    first = _record("once")
    assert flt.filter(first)
    assert not hasattr(first, "repeated")


def test_the_number_of_kinds_is_bounded():
    clock = Clock()
    flt = RepeatFilter(10.0, max_kinds=3, clock=clock)
    for word in ("a", "b", "c", "d"):
        assert flt.filter(_record(word))
    assert len(flt._kinds) == 3
    assert flt.filter(_record("a"))  # forgotten: passes again


def test_librdkafka_lines_from_every_broker_and_thread_are_one_kind():
    flt = RepeatFilter(10.0, clock=Clock(), kind=librdkafka_kind)
    lines = [
        "FAIL [rdkafka#consumer-7] [thrd:127.0.0.1:52471/111]: 127.0.0.1:52471/111: Connect to ipv4#127.0.0.1:52471 failed: Connection refused",
        "FAIL [rdkafka#consumer-7] [thrd:127.0.0.1:52471/bootstrap]: 127.0.0.1:52471/bootstrap: Connect to ipv4#127.0.0.1:52471 failed: Connection refused",
    ]
    lines.append(
        "FAIL [rdkafka#consumer-7] [thrd:GroupCoordinator]: GroupCoordinator: 127.0.0.1:52471: Connect to ipv4#127.0.0.1:52471 failed: " + "Connection refused"
    )
    lines.append(lines[1] + " (after 0ms in state CONNECT, 1 identical error(s) suppressed)")
    assert [flt.filter(_record(line)) for line in lines] == [True, False, False, False]
    # Another client, or another facility, is another kind.
    assert flt.filter(_record(lines[0].replace("consumer", "producer")))
    assert flt.filter(_record("SESSTMOUT [rdkafka#consumer-7] [thrd:main]: Consumer group session timed out"))
