"""The operator's views without ZooKeeper: the status document (down members, progress),
what is pending and why, the what-if on the leader's own placement and reconcile code,
the watch screen, progress bars off a terminal, JSON logs and the environment variables
of every option. Plans come from the leader's pure pass (coordinator.decide)."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import replace
from typing import Any

import click
import pytest

from coordinator.decide import Memory
from coordinator.placement import Member, place
from shardkeeper.cli.term import Progress, Screen
from shardkeeper.cli.view import change_line, frame, state_key, status_text
from shardkeeper.cli.whatif import Change, diff, what_if
from shardkeeper.config import ClusterConfig
from shardkeeper.layout import AgentStatus, AuditEvent, Maintenance, MemberInfo, ShardStatus
from shardkeeper.plan import PlanState
from shardkeeper.process import JsonFormatter
from shardkeeper.summary import (
    drain_pending,
    move_pending,
    pending,
    stable,
    summarize,
    undrain_pending,
)
from tests.test_decide import in_sync_statuses, members, run, settle

CONFIG = ClusterConfig(shards=8, replicas=2)


def settled(*ids: str, config: ClusterConfig = CONFIG, **kw: Any) -> tuple[Memory, float]:
    memory, now, _ = settle(Memory(), 0.0, members(*ids), config=config, **kw)
    return memory, now


def doc(memory: Memory, live: dict[str, MemberInfo], statuses: dict | None = None,
        **kw: Any) -> dict[str, Any]:
    return summarize(cluster="t", leader="c1", epoch=1, shards=CONFIG.shards,
                     replicas=CONFIG.replicas, plan=memory.plan, members=live,
                     statuses=in_sync_statuses(memory, live) if statuses is None else statuses,
                     throttle=(4, 64), **kw)


# -- the status document and what is pending ---------------------------------------------

def test_a_settled_cluster_is_stable_with_every_replica_in_place() -> None:
    memory, _ = settled("a1", "a2", "a3")
    s = doc(memory, members("a1", "a2", "a3"))
    assert stable(s) and pending(s) == []
    assert s["progress"] == {"in_place": 16, "target": 16}
    assert [m["state"] for m in s["members"]] == ["active"] * 3
    assert all(m["down_since"] is None for m in s["members"])


def test_a_departed_member_is_listed_down_since_the_leader_saw_it_leave() -> None:
    memory, now = settled("a1", "a2", "a3")
    out = run(memory, now + 5, members("a1", "a2"))
    # The survivors report what they held before: the new copies have not finished.
    s = doc(out.memory, members("a1", "a2"), in_sync_statuses(memory, {"a1", "a2"}))
    down = [m for m in s["members"] if m["state"] == "down"]
    assert [(m["id"], m["down_since"]) for m in down] == [("a3", now + 5)]
    assert down[0]["replicas"] == 0 and down[0]["address"] == ""
    assert not stable(s), "a3's replicas are still being copied"
    assert any("copies in flight" in r for r in pending(s))
    assert s["progress"]["in_place"] < s["progress"]["target"]
    text = status_text(s, now=now + 65)
    assert "a3" in text and "down" in text and "(60s ago)" in text


def test_a_member_whose_process_died_is_down_before_its_session_expires() -> None:
    """The leader plans a dead process as departed at once (its member znode lingers)."""
    memory, now = settled("a1", "a2", "a3")
    out = run(memory, now + 1, members("a1", "a2", "a3"), dead=frozenset({"a3"}))
    s = doc(out.memory, members("a1", "a2", "a3"))
    row = next(m for m in s["members"] if m["id"] == "a3")
    assert row["state"] == "down" and row["down_since"] == now + 1
    assert s["unplanned"] == {"joined": [], "left": []}


def test_an_agent_the_plan_places_without_a_member_znode_is_down() -> None:
    """No leader to record it: the plan still names the agent, which is gone."""
    memory, _ = settled("a1", "a2", "a3")
    s = doc(memory, members("a1", "a2"), statuses=in_sync_statuses(memory, {"a1", "a2"}))
    row = next(m for m in s["members"] if m["id"] == "a3")
    assert row["state"] == "down" and row["down_since"] is None and row["replicas"] > 0
    assert s["under_replicated"] > 0
    assert any("a3 left and is still in the plan" in r for r in pending(s))


def test_pending_says_why_in_words() -> None:
    memory, now = settled("a1", "a2")
    live = members("a1", "a2")
    statuses = in_sync_statuses(memory, live)
    assert "no plan yet: no coordinator is running" in pending(
        summarize(cluster="t", leader=None, epoch=0, shards=8, replicas=2, plan=PlanState(),
                  members=live, statuses={}))
    # An agent that has not applied its plan, a copy reported failed, one catching up.
    a1 = statuses["a1"]
    shard = min(a1.shards)
    statuses["a1"] = replace(a1, generation=a1.generation - 1, shards={
        **a1.shards, shard: ShardStatus("ERROR", reason="disk full")})
    statuses["a2"] = replace(statuses["a2"], shards={
        s: replace(st, catching_up=True) for s, st in statuses["a2"].shards.items()})
    reasons = " | ".join(pending(doc(memory, live, statuses)))
    assert "a1 not yet applied their latest plan" in reasons
    assert f"shard {shard} on a1: disk full" in reasons
    assert "replicas catching up" in reasons
    # Joined but not planned yet; maintenance; copies held back by the throttle.
    joined = doc(memory, members("a1", "a2", "a4"))
    assert any("a4 joined and is not in the plan yet" in r for r in pending(joined))
    out = run(memory, now + 1, members("a1", "a2", "a3", "a4"),
              config=replace(CONFIG, max_moves_total=1))
    throttled = doc(out.memory, members("a1", "a2", "a3", "a4"))
    assert any("waiting for the throttle (max_moves_per_agent=4, max_moves_total=64)" in r
               for r in pending(throttled))
    paused = doc(out.memory, members("a1", "a2", "a3", "a4"),
                 maintenance=Maintenance("manual", now, "upgrade"))
    assert any(r.startswith("maintenance mode (manual)") for r in pending(paused))


def test_a_drain_that_cannot_finish_says_no_other_agent_can_take_the_replicas() -> None:
    memory, now = settled("a1", "a2")
    out = run(memory, now + 1, members("a1", "a2"), draining=frozenset({"a2"}))
    s = doc(out.memory, members("a1", "a2"), draining={"a2"})
    reasons = drain_pending(s, "a2")
    assert reasons[0] == "a2 still holds 8 replicas"
    assert "8 shards have no other eligible agent to move to (R=2, 1 member not draining)" \
        in reasons
    assert any(r.startswith("shortfall 8") for r in reasons)
    # Before the leader took it up, that is what it says.
    assert drain_pending(doc(memory, members("a1", "a2"), draining={"a2"}), "a2") == [
        "the leader has not taken up the drain of a2 yet"]


def test_a_drain_is_done_when_the_agent_holds_nothing_in_plan_or_on_disk() -> None:
    live = members("a1", "a2", "a3")
    memory, now = settled("a1", "a2", "a3")
    memory, now, _ = settle(memory, now, live, draining=frozenset({"a3"}))
    s = doc(memory, live, draining={"a3"})
    assert drain_pending(s, "a3") == []
    assert next(m for m in s["members"] if m["id"] == "a3")["state"] == "drained"
    # Still holding files (its status lags the plan): not done.
    statuses = in_sync_statuses(memory, live)
    statuses["a3"] = AgentStatus("a3", memory.plan.agents["a3"].generation,
                                 {0: ShardStatus("REPLICA")})
    assert drain_pending(doc(memory, live, statuses, draining={"a3"}), "a3") == [
        "a3 still holds 1 replica"]
    # Undrained: done once the leader no longer treats it as draining and all is in place.
    assert undrain_pending(s, "a3") == ["the leader still treats a3 as draining"]
    memory, now, _ = settle(memory, now, live)
    assert undrain_pending(doc(memory, live), "a3") == []


def test_move_pending_follows_the_shard_row() -> None:
    memory, _ = settled("a1", "a2", "a3")
    s = doc(memory, members("a1", "a2", "a3"))
    assert move_pending(s, 0, "a1", "a3", (("a2", "a3"), ())) == []
    assert move_pending(s, 0, "a1", "a3", (("a1", "a2"), ("a3",))) == ["a3 is copying shard 0"]
    assert move_pending(s, 0, "a1", "a3", (("a1", "a2", "a3"), ())) == [
        "a3 holds shard 0; a1 still to drop it"]


# -- the what-if -----------------------------------------------------------------------

def whatif(memory: Memory, live: dict[str, MemberInfo], change: Change,
           config: ClusterConfig = CONFIG, **kw: Any) -> dict[str, Any]:
    return what_if(config, memory.plan, live, in_sync_statuses(memory, live),
                   kw.get("draining", ()), kw.get("maintenance"), change)


def test_what_if_a_drain_moves_exactly_the_agents_replicas_at_no_risk() -> None:
    live = members("a1", "a2", "a3")
    memory, _ = settled("a1", "a2", "a3")
    held = sum("a3" in p.replicas for p in memory.plan.shards)
    w = whatif(memory, live, Change(drain=("a3",)))
    assert {"moves", "primary_changes", "balance_before", "balance_after", "shortfall",
            "shards_at_risk", "members"} <= set(w)
    assert len(w["moves"]) == held and {m["from"] for m in w["moves"]} == {"a3"}
    assert w["shards_at_risk"] == [] and w["shortfall"] == 0
    rows = {m["id"]: m for m in w["members"]}
    assert rows["a3"]["replicas_before"] == held and rows["a3"]["replicas_after"] == 0
    assert rows["a3"]["state"] == "draining"
    assert sum(m["replicas_after"] for m in w["members"]) == 16
    # The leader's own placement decides the result: where the drain ends is place()'s.
    target = place(memory.plan.targets, [Member("a1"), Member("a2"), Member("a3",
                   draining=True)], 8, 2)
    assert [set(r) for r in target.replicas] == [
        {a for a in live if any(m["shard"] == s and m["to"] == a for m in w["moves"])}
        | (set(memory.plan.shards[s].replicas) - {"a3"})
        for s in range(8)]


def test_what_if_a_removal_puts_every_shard_it_held_at_risk() -> None:
    live = members("a1", "a2", "a3")
    memory, _ = settled("a1", "a2", "a3")
    held = sorted(s for s, p in enumerate(memory.plan.shards) if "a3" in p.replicas)
    w = whatif(memory, live, Change(remove=("a3",)))
    assert w["shards_at_risk"] == held
    assert next(m for m in w["members"] if m["id"] == "a3")["state"] == "removed"
    assert w["primary_changes"] == [c for c in w["primary_changes"] if c["from"] == "a3"]


def test_what_if_a_drain_with_no_room_keeps_the_replicas_and_says_so() -> None:
    live = members("a1", "a2")
    memory, _ = settled("a1", "a2")
    w = whatif(memory, live, Change(drain=("a2",)))
    assert w["moves"] == [] and w["shards_at_risk"] == [] and w["shortfall"] == 8
    assert any("a2 would keep 8 replicas" in n for n in w["notes"])


def test_what_if_adding_agents_and_weights_levels_by_weight() -> None:
    live = members("a1", "a2")
    config = replace(CONFIG, shards=100)
    memory, _ = settled("a1", "a2", config=config)
    w = whatif(memory, live, Change(add=(MemberInfo("a3", "", "z", 2.0),),
                                    weight=(("a1", 2.0),)), config=config)
    rows = {m["id"]: m for m in w["members"]}
    assert rows["a3"]["state"] == "added" and rows["a3"]["zone"] == "z"
    assert rows["a3"]["replicas_after"] > rows["a2"]["replicas_after"]
    assert w["balance_after"] <= 1.05 and w["shards_at_risk"] == []
    assert w["first_step"]["copies"] + w["first_step"]["deferred"] == len(w["moves"])


def test_what_if_under_maintenance_moves_nothing_and_says_why() -> None:
    live = members("a1", "a2", "a3")
    memory, _ = settled("a1", "a2", "a3")
    w = whatif(memory, live, Change(drain=("a3",)),
               maintenance=Maintenance("manual", 0.0, "upgrade"))
    assert w["moves"] == [] and any("maintenance mode" in n for n in w["notes"])


def test_diff_pairs_departures_with_arrivals() -> None:
    moves, primaries = diff((("a", "b"), ("a", "b")), (("c", "b"), ("a", "b")))
    assert moves == [{"shard": 0, "from": "a", "to": "c"}]
    assert primaries == [{"shard": 0, "from": "a", "to": "c"}]
    moves, _ = diff((("a",),), (("a", "b"),))
    assert moves == [{"shard": 0, "from": None, "to": "b"}]


# -- the watch screen and lines ----------------------------------------------------------

def test_the_watch_frame_shows_down_members_progress_and_events_within_its_height() -> None:
    memory, now = settled("a1", "a2", "a3")
    out = run(memory, now + 5, members("a1", "a2"))
    s = doc(out.memory, members("a1", "a2"))
    events = [AuditEvent(now + 5, "member-left", "a3 left")]
    lines = frame(s, events, now + 7)
    text = "\n".join(lines)
    assert "down for 2s" in text and "replicas in place [" in text
    assert "not stable:" in text and "member-left" in text
    assert len(frame(s, events, now + 7, height=12)) <= 12
    line = change_line(s, now + 7)
    assert "members 2 active, 1 down" in line and line.endswith("moving")
    assert state_key(s) != state_key(doc(memory, members("a1", "a2", "a3")))


def test_progress_off_a_terminal_is_plain_lines_and_always_ends_with_the_last() -> None:
    out = io.StringIO()
    bar = Progress("draining a3", stream=out, every=3600)
    bar.update(0, 10, "copying")
    bar.update(5, 10, "copying")  # within the interval: folded into a later line
    bar.update(10, 10, "done", final=True)
    assert out.getvalue().splitlines() == ["draining a3: 0/10 (0%)  copying",
                                           "draining a3: 10/10 (100%)  done"]
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()


def test_a_screen_redraws_over_its_previous_frame() -> None:
    out = io.StringIO()
    screen = Screen(out)
    screen.draw(["one", "two"])
    screen.draw(["three"])
    assert out.getvalue() == "\x1b[Jone\ntwo\n" + "\x1b[2F\x1b[Jthree\n"


# -- logs and options ----------------------------------------------------------------------

def test_json_logs_carry_time_with_zone_level_role_id_event_and_fields() -> None:
    record = logging.LogRecord("coordinator.leader", logging.WARNING, "f.py", 1,
                               "plan %d written", (7,), None)
    record.generation = 7
    line = json.loads(JsonFormatter("coordinator", "c1").format(record))
    assert line["level"] == "warning" and line["role"] == "coordinator" and line["id"] == "c1"
    assert line["event"] == "plan 7 written" and line["fields"] == {"generation": 7}
    assert line["time"][10] == "T" and line["time"][-6] in "+-", "ISO 8601 with its zone"


def all_options(command: click.Command, path: str = "") -> list[tuple[str, click.Option]]:
    out = [(f"{path} {command.name}", p) for p in command.params
           if isinstance(p, click.Option) and not p.hidden and p.name != "help"]
    for sub in getattr(command, "commands", {}).values():
        out += all_options(sub, f"{path} {command.name}")
    return out


def test_every_option_of_every_command_has_a_shardkeeper_environment_variable() -> None:
    from shardkeeper.cli import main

    ctx = click.Context(main)
    commands = [main.get_command(ctx, name) for name in main.list_commands(ctx)]
    options = [o for c in commands for o in all_options(c)]
    assert len(options) > 100 and any("dev up" in where for where, _ in options)
    missing = [f"{where} {o.opts[0]}" for where, o in options
               if not (isinstance(o.envvar, str) and o.envvar.startswith("SHARDKEEPER_"))
               and o.name != "version"]
    assert missing == [], missing


@pytest.mark.parametrize("command", ["status", "shards", "events", "config show", "verify",
                                     "plan", "dev status", "watch"])
def test_every_command_that_shows_state_has_json(command: str) -> None:
    from shardkeeper.cli import main

    ctx = click.Context(main)
    cmd: Any = main
    for word in command.split():
        cmd = cmd.get_command(ctx, word)
    assert any("--json" in p.opts for p in cmd.params)


def test_the_docs_cover_every_command_and_option() -> None:
    """docs/operations.md documents every command and option; the README's CLI table
    names every command."""
    from pathlib import Path

    from shardkeeper.cli import main

    root = Path(__file__).resolve().parent.parent
    ops = (root / "docs" / "operations.md").read_text()
    readme = (root / "README.md").read_text()
    ctx = click.Context(main)
    missing = []
    for name in main.list_commands(ctx):
        command = main.get_command(ctx, name)
        leaves = (command.commands.items() if isinstance(command, click.Group)
                  else [("", command)])
        for sub, leaf in leaves:
            if isinstance(leaf, click.Group):  # agent trash
                leaves_ = [(f"{sub} {n}", c) for n, c in leaf.commands.items()]
            else:
                leaves_ = [(sub, leaf)]
            for path, cmd in leaves_:
                words = f"{name} {path}".strip()
                if f"`shardkeeper {words}" not in ops:
                    missing.append(f"operations.md: shardkeeper {words}")
                if f"shardkeeper {name}" not in readme and f"`{name}" not in readme:
                    missing.append(f"README: {name}")
                missing += [f"operations.md: {words} {o.opts[0]}" for o in cmd.params
                            if isinstance(o, click.Option) and o.opts[0] not in ops]
    assert missing == [], missing
