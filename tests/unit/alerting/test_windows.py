"""Alert windows: spans of event time, scoped to keys, and the control records that change them."""

from __future__ import annotations

import pytest

from stream_detector.alerting.windows import AlertWindow, ControlError, WindowBook
from tests.unit.alerting.helpers import DAY, T0


def test_window_covers_its_span_and_scope():
    w = AlertWindow(name="black-friday", start="2026-11-27T00:00:00Z", end="2026-11-28T00:00:00", scope={"store_id": ["s-001"]})
    assert w.end.tzinfo is not None  # naive means UTC
    assert w.covers(T0, {"store_id": "s-001"})
    assert not w.covers(T0, {"store_id": "s-002"})
    assert not w.covers(T0 - 1, {"store_id": "s-001"})
    assert not w.covers(T0 + DAY, {"store_id": "s-001"})  # end is exclusive
    everywhere = AlertWindow(name="xmas", start="2026-12-25", end="2026-12-26")
    assert everywhere.covers(T0 + 28 * DAY + 5, None)


def test_control_records_add_replace_cancel_and_reject_bad_ones():
    book = WindowBook()
    promo = {"name": "promo-42", "start": "2026-11-27T00:00:00Z", "end": "2026-11-29T00:00:00Z", "action": "annotate", "scope": {"product_id": ["p-0042"]}}
    assert book.apply_control(promo) == "added"
    assert book.apply_control({**promo, "action": "suppress"}) == "replaced"
    assert book.windows[0].action == "suppress"
    assert book.active(T0 + 3600) == 1
    assert book.apply_control({"action": "cancel", "name": "promo-42"}) == "cancelled"
    assert book.apply_control({"action": "cancel", "name": "promo-42"}) == "unknown_window"
    with pytest.raises(ControlError, match="end.*must be after start"):
        book.apply_control({**promo, "end": "2026-11-26T00:00:00Z"})
    with pytest.raises(ControlError, match="action"):
        book.apply_control({**promo, "action": "mute"})
    with pytest.raises(ControlError, match="not_an_object"):
        book.apply_control(["promo"])
    assert len(book) == 0


def test_control_errors_carry_a_bounded_reason_and_name_the_field():
    """The reason becomes a metric label (a few fixed values); the detail names what is wrong."""
    book = WindowBook()
    cases = [
        ({"action": "cancel"}, "invalid_window", "cancel needs a window name"),
        ({"action": "cancel", "name": ""}, "invalid_window", "cancel needs a window name"),
        ({"name": "sale", "end": "2026-11-28"}, "invalid_window", "start: "),
        ({"name": "sale", "start": "2026-11-27", "end": "2026-11-28", "colour": "red"}, "invalid_window", "colour: "),
        ({"name": "sale", "start": "2026-11-27", "end": "2026-11-28", "scope": {"store_id": "s-001"}}, "invalid_window", "scope.store_id: "),
        ("sale", "not_an_object", "got str"),
        (None, "not_an_object", "got NoneType"),
    ]
    for message, reason, detail in cases:
        with pytest.raises(ControlError) as caught:
            book.apply_control(message)
        assert caught.value.reason == reason, message
        assert detail in caught.value.detail, (message, caught.value.detail)
        assert str(caught.value).startswith(f"{reason}: ")
    assert len(book) == 0


def test_active_counts_spans_and_matching_also_checks_the_scope():
    book = WindowBook(
        [
            AlertWindow(name="friday", start="2026-11-27", end="2026-11-28"),
            AlertWindow(name="weekend", start="2026-11-28", end="2026-11-30", scope={"store_id": ["s-001", "s-002"], "channel": ["online"]}),
        ]
    )
    assert book.active(T0 - 1) == 0 and book.active(T0) == 1 and book.active(T0 + DAY) == 1 and book.active(T0 + 3 * DAY) == 0
    assert [w.name for w in book.matching(T0 + 60, {"store_id": "s-009"})] == ["friday"]
    saturday = T0 + DAY + 60
    # Every scoped field must match one of its values.
    assert [w.name for w in book.matching(saturday, {"store_id": "s-002", "channel": "online"})] == ["weekend"]
    assert book.matching(saturday, {"store_id": "s-002", "channel": "store"}) == []
    assert book.matching(saturday, {"store_id": "s-002"}) == []
    assert book.matching(saturday, None) == []  # a scoped window needs fields to match
    # Numeric event fields are compared as text.
    numeric = AlertWindow(name="store-17", start="2026-11-27", end="2026-11-28", scope={"store_id": ["17"]})
    assert numeric.covers(T0, {"store_id": 17})
