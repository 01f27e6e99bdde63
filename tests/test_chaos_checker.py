"""The chaos history checker on hand-made histories: what it must flag, what it must let
pass (bench/chaos/checker.py is pure, so these take milliseconds)."""

from __future__ import annotations

from bench.chaos.checker import (
    DELETE,
    FAIL,
    GET,
    OK,
    PUT,
    UNKNOWN,
    UNREADABLE,
    Op,
    check,
    write_gaps,
)


def put(value: str, invoke: float, complete: float, outcome: str = OK, key: str = "k") -> Op:
    return Op(0, PUT, key, value, invoke, complete, outcome)


def delete(invoke: float, complete: float, outcome: str = OK, key: str = "k") -> Op:
    return Op(0, DELETE, key, None, invoke, complete, outcome)


def get(value: str | None, invoke: float, complete: float, key: str = "k") -> Op:
    return Op(1, GET, key, value, invoke, complete, OK)


def test_the_last_acknowledged_write_wins():
    v = check([put("a", 0, 1), put("b", 2, 3)], {"k": "b"})
    assert (v.ops, v.acked, v.lost_count, len(v.stale_reads)) == (2, 2, 0, 0)


def test_an_acknowledged_write_that_vanished_is_lost():
    v = check([put("a", 0, 1), put("b", 2, 3)], {"k": "a"})
    assert v.lost_count == 1 and "'b'" in v.lost[0].what


def test_concurrent_writes_may_end_either_way():
    history = [put("a", 0, 3), put("b", 1, 2)]
    assert check(history, {"k": "a"}).lost_count == 0
    assert check(history, {"k": "b"}).lost_count == 0


def test_an_unknown_write_may_land_late_and_win():
    history = [put("a", 0, 1, UNKNOWN), put("b", 2, 3)]
    assert check(history, {"k": "a"}).lost_count == 0, "a may have been applied after b"


def test_a_refused_write_explains_nothing():
    v = check([put("a", 0, 1, FAIL), put("b", 2, 3)], {"k": "a"})
    assert v.lost_count == 1 and v.unexplained, "a value only a refused write wrote"


def test_deletes_and_absent_keys():
    assert check([put("a", 0, 1), delete(2, 3)], {"k": None}).lost_count == 0
    assert check([put("a", 0, 1), delete(2, 3)], {"k": "a"}).lost_count == 1
    assert check([delete(0, 1), put("a", 2, 3)], {"k": None}).lost_count == 1
    assert check([put("a", 0, 1)], {"k": None}).lost_count == 1, "never deleted"
    assert check([put("a", 0, 1, UNKNOWN)], {"k": None}).lost_count == 0


def test_an_old_retry_landing_after_a_newer_write_is_a_lost_write():
    # put a (acknowledged), then put b (acknowledged, invoked after a's ack); the final
    # value a means a's write was applied again after b: b is lost.
    v = check([put("a", 0, 1), put("b", 2, 3)], {"k": "a"})
    assert [a.op.value for a in v.lost] == ["b"]


def test_reads_see_what_was_acknowledged_before_them():
    history = [put("a", 0, 1), put("b", 2, 3), get("b", 4, 5), get("a", 2.5, 3.5)]
    assert check(history, {"k": "b"}).stale_reads == []
    stale = check([*history, get("a", 4, 5)], {"k": "b"})
    assert len(stale.stale_reads) == 1 and "overwritten" in stale.stale_reads[0].what


def test_a_read_of_a_value_never_written_or_written_later_is_flagged():
    assert len(check([put("a", 0, 1), get("zzz", 2, 3)], {"k": "a"}).stale_reads) == 1
    assert len(check([get("a", 0, 1), put("a", 2, 3)], {"k": "a"}).stale_reads) == 1


def test_a_read_of_absent_after_an_acknowledged_put_is_stale_unless_deleted():
    assert len(check([put("a", 0, 1), get(None, 2, 3)], {"k": "a"}).stale_reads) == 1
    history = [put("a", 0, 1), delete(1.5, 4, UNKNOWN), get(None, 2, 3)]
    assert check(history, {"k": None}).stale_reads == [], "the delete may have landed"


def test_keys_that_cannot_be_read_at_the_end_are_reported():
    v = check([put("a", 0, 1)], {"k": UNREADABLE})
    assert v.unreadable == ["k"] and v.lost_count == 0


def test_write_gaps_cover_the_run():
    ops = [put("a", 0, 1), put("b", 1, 5), Op(0, PUT, "x", "c", 6, 6.5, FAIL)]
    assert write_gaps(ops, 0, 10) == [(0, 1), (1, 5), (5, 10)]
