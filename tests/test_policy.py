"""Leader policies (pure): departures, rebalance delay, the mass-departure guard, moves."""

from __future__ import annotations

from coordinator.policy import (
    apply_moves,
    delayed,
    guard,
    hand_off_targets,
    hold_moves,
    next_deadline,
    placement_members,
    track_departures,
)
from shardkeeper.config import ClusterConfig
from shardkeeper.layout import Maintenance, MemberInfo, MoveRequest

CFG = ClusterConfig(shards=8, replicas=2, auto_maintenance_fraction=0.5,
                    auto_maintenance_window=30)


def test_departure_clocks_start_on_leaving_and_stop_on_return() -> None:
    d = track_departures({}, {"a", "b", "c"}, {"a"}, now=10.0)
    assert d == {"b": 10.0, "c": 10.0}
    d = track_departures(d, {"a"}, {"a", "b"}, now=20.0)
    assert d == {"c": 10.0}
    assert delayed(d, delay=15, now=20.0) == {"c"}
    assert delayed(d, delay=5, now=20.0) == set()
    assert next_deadline(d, 15, now=20.0) == 25.0
    assert next_deadline(d, 5, now=20.0) is None


def test_placement_keeps_delayed_members_and_flags_draining() -> None:
    live = {"a": MemberInfo("a", "h:1", zone="z1")}
    known = {**live, "b": MemberInfo("b", "h:2", zone="z2", weight=2.0)}
    members = placement_members(live, known, waiting={"b"}, draining={"a"})
    assert [(m.id, m.zone, m.weight, m.draining) for m in members] == [
        ("a", "z1", 1.0, True), ("b", "z2", 2.0, False)]


def test_guard_enters_auto_maintenance_on_a_mass_departure_only() -> None:
    live = {"a", "b"}
    assert guard(None, live, {"c": 99.0}, CFG, now=100.0) is None  # 1 of 3
    m = guard(None, live, {"c": 99.0, "d": 98.0, "e": 97.0}, CFG, now=100.0)  # 3 of 5
    assert m is not None and m.reason == "auto" and m.missing == ("c", "d", "e")
    # Old departures outside the window don't count.
    assert guard(None, live, {"c": 1.0, "d": 1.0, "e": 1.0}, CFG, now=100.0) is None
    off = ClusterConfig(shards=8, replicas=2, auto_maintenance_fraction=0)
    assert guard(None, live, {"c": 99.0, "d": 98.0, "e": 97.0}, off, now=100.0) is None


def test_auto_maintenance_leaves_when_members_return_manual_never() -> None:
    m = Maintenance("auto", 1.0, missing=("c", "d", "e"))
    assert guard(m, {"a", "b"}, {}, CFG, now=2.0) == m
    assert guard(m, {"a", "b", "c", "d"}, {}, CFG, now=2.0) is None
    manual = Maintenance("manual", 1.0)
    assert guard(manual, {"a", "b", "c", "d", "e"}, {}, CFG, now=2.0) == manual


def test_moves_replace_in_place_and_refuse_bad_requests() -> None:
    target = [("a", "b"), ("b", "c")]
    requests = [
        ("move-1", MoveRequest(0, "a", "c")),
        ("move-2", MoveRequest(5, "a", "c")),
        ("move-3", MoveRequest(1, "a", "d")),
        ("move-4", MoveRequest(1, "b", "x")),
        ("move-5", MoveRequest(1, "b", "d")),
        ("move-6", MoveRequest(1, "c", "b")),
        ("move-7", None),
    ]
    out, outcomes = apply_moves(target, requests, live={"a", "b", "c", "d"}, draining={"d"})
    assert out == [("c", "b"), ("b", "c")]
    reasons = {o.name: o.reason for o in outcomes}
    assert reasons["move-1"] == ""
    assert "no shard 5" in reasons["move-2"]
    assert "a holds no replica of shard 1" in reasons["move-3"]
    assert "x is not a live member" in reasons["move-4"]
    assert "d is draining" in reasons["move-5"]
    assert "b already holds shard 1" in reasons["move-6"]
    assert reasons["move-7"] == "unreadable request"


def test_pins_hold_a_moved_replica_against_leveling() -> None:
    pin = MoveRequest(0, "a", "c")
    # Leveling put the replica back on a: the pin moves it to c again.
    out, kept = hold_moves([("a", "b")], [pin], live={"a", "b", "c"}, draining=set())
    assert out == [("c", "b")] and kept == [pin]
    out, kept = hold_moves([("c", "b")], [pin], live={"a", "b", "c"}, draining=set())
    assert out == [("c", "b")] and kept == [pin]
    # The pin lapses when its destination drains or leaves, or the shard moved on.
    assert hold_moves([("a", "b")], [pin], {"a", "b", "c"}, {"c"}) == ([("a", "b")], [])
    assert hold_moves([("a", "b")], [pin], {"a", "b"}, set()) == ([("a", "b")], [])
    assert hold_moves([("b", "d")], [pin], {"a", "b", "c", "d"}, set()) == ([("b", "d")], [])


def test_hand_off_targets_name_a_primary_that_stays_in_sync_first() -> None:
    target = [("L", "b", "c"), ("L", "b", "c"), ("a", "L"), ("L", "M"), ()]
    in_sync = [("L", "c"), ("L",), ("a", "L"), ("L", "M"), ()]
    out = hand_off_targets(target, in_sync, {"L", "M"})
    assert out[0] == ("c", "b", "L"), "the member in sync now"
    assert out[1] == ("b", "L", "c"), "else the first one that stays"
    assert out[2] == ("a", "L") and out[3] == ("L", "M") and out[4] == ()
    assert hand_off_targets(target, in_sync, set()) == target
