"""The leader's pass, pure (coordinator.decide): the settle gate, audit events, maintenance,
drains, moves and the writes' order, driven the way the leader shell drives it."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.decide import INITIAL_SETTLE, Inputs, Memory, Outcome, decide
from shardkeeper.config import ClusterConfig
from shardkeeper.layout import (
    AgentStatus,
    Maintenance,
    MemberInfo,
    MoveRequest,
    Paths,
    ShardStatus,
    decode_events,
)
from shardkeeper.vocab import Role

PATHS = Paths("t")
CONFIG = ClusterConfig(shards=8, replicas=2)


def members(*ids: str) -> dict[str, MemberInfo]:
    return {a: MemberInfo(a, f"127.0.0.1:{i + 1}") for i, a in enumerate(ids)}


def in_sync_statuses(memory: Memory, live) -> dict[str, AgentStatus]:
    """Every live agent applied its plan and holds what it asks, in sync (copies done)."""
    out = {}
    for agent, plan in memory.plan.agents.items():
        if agent not in live:
            continue
        shards = {s: ShardStatus("PRIMARY" if a.role == Role.PRIMARY else "REPLICA")
                  for s, a in plan.replicas.items()}
        out[agent] = AgentStatus(agent, plan.generation, shards)
    return out


def run(memory: Memory, now: float, live, **kw) -> Outcome:
    inputs = Inputs(now=now, config=kw.pop("config", CONFIG), members=live,
                    statuses=kw.pop("statuses", in_sync_statuses(memory, live)), **kw)
    return decide(memory, inputs, paths=PATHS, leader="c1", epoch=7)


def settle(memory: Memory, now: float, live, **kw) -> tuple[Memory, float, list[str]]:
    """Pass after pass with agents reporting in sync, until nothing changes."""
    kinds: list[str] = []
    for _ in range(50):
        out = run(memory, now, live, **kw)
        kinds += [e.kind for e in out.audit]
        memory, now = out.memory, now + 0.1
        if not out.writes and memory.plan.meta is not None:
            return memory, now, kinds
        if memory.plan.meta is None:
            now = max(now, out.deadline or now)  # the settle gate of a new cluster
    raise AssertionError("no fixed point")


def audit_of(out: Outcome) -> list[str]:
    appended = [w for w in out.writes if w.op == "append"]
    assert len(appended) <= 1, "one audit znode per pass"
    return [e.kind for w in appended for e in decode_events(w.path, w.data)]


def test_a_new_cluster_waits_for_membership_to_settle_then_writes_meta_last() -> None:
    live = members("a1", "a2", "a3")
    first = run(Memory(), 100.0, live)
    assert first.writes == () and first.deadline == 100.0 + INITIAL_SETTLE
    second = run(first.memory, 100.0 + INITIAL_SETTLE, live)
    assert second.plan_written and second.generation == 1
    assert second.writes[-1].path == PATHS.plan_meta
    assert audit_of(second) == ["member-joined"] * 3 + ["plan"]
    assert [e.kind for e in second.audit] == audit_of(second)
    assert all(w.op == "create" for w in second.writes if w.path != PATHS.event_prefix)


def test_a_departure_is_audited_once_and_its_primaries_fail_over() -> None:
    live = members("a1", "a2", "a3")
    memory, now, _ = settle(Memory(), 0.0, live)
    survivors = members("a1", "a2")
    out = run(memory, now + 5, survivors)
    assert "member-left" in audit_of(out)
    assert all(p.primary in survivors for p in out.memory.plan.shards)
    again = run(out.memory, now + 6, survivors)
    assert "member-left" not in [e.kind for e in again.audit]


def test_the_rebalance_delay_sets_a_deadline_and_rebalance_skips_it() -> None:
    config = replace(CONFIG, rebalance_delay=60.0)
    memory, now, _ = settle(Memory(), 0.0, members("a1", "a2", "a3"), config=config)
    out = run(memory, now, members("a1", "a2"), config=config)
    assert out.deadline == now + 60.0
    assert not any(a == "a3" for p in out.memory.plan.shards for a, _ in p.bootstrapping)
    out = run(out.memory, now + 1, members("a1", "a2"), config=config, rebalance=True)
    assert "rebalance" in audit_of(out) and out.deadline is None


def test_mass_departure_enters_automatic_maintenance_and_returning_members_leave_it() -> None:
    everyone = members("a1", "a2", "a3", "a4")
    memory, now, _ = settle(Memory(), 0.0, everyone)
    out = run(memory, now, members("a1"))
    assert "maintenance-entered" in audit_of(out)
    entered = next(w for w in out.writes if w.path == PATHS.maintenance)
    maintenance = Maintenance.decode(entered.path, entered.data)
    assert maintenance.reason == "auto" and set(maintenance.missing) == {"a2", "a3", "a4"}
    assert not any(p.bootstrapping for p in out.memory.plan.shards), "no copies while paused"
    back = run(out.memory, now + 1, everyone, maintenance=maintenance)
    assert "maintenance-left" in audit_of(back)
    assert any(w.op == "delete" and w.path == PATHS.maintenance for w in back.writes)


def test_drain_done_is_reported_once_when_nothing_is_left() -> None:
    live = members("a1", "a2", "a3")
    memory, now, _ = settle(Memory(), 0.0, live)
    memory, now, kinds = settle(memory, now, live, draining=frozenset({"a3"}))
    assert kinds.count("drain-done") == 1
    assert not any("a3" in p.holders for p in memory.plan.shards)
    assert memory.drained_reported == {"a3"}
    undrained = run(memory, now, live)
    assert undrained.memory.drained_reported == frozenset()


def test_moves_are_consumed_accepted_or_refused_with_a_reason() -> None:
    live = members("a1", "a2", "a3")
    memory, now, _ = settle(Memory(), 0.0, live)
    holder = memory.plan.shards[0].replicas[0]
    other = next(a for a in live if a not in memory.plan.shards[0].replicas)
    moves = (("move-0000000001", MoveRequest(0, holder, other)),
             ("move-0000000002", MoveRequest(0, "a9", other)),
             ("move-0000000003", None))
    out = run(memory, now, live, moves=moves)
    deleted = {w.path for w in out.writes if w.op == "delete"}
    assert {f"{PATHS.moves}/{n}" for n, _ in moves} <= deleted
    assert audit_of(out).count("move-refused") == 2 and "move-accepted" in audit_of(out)
    assert other in out.memory.plan.targets[0] and holder not in out.memory.plan.targets[0]


def test_a_shard_without_a_live_in_sync_replica_is_reported_once() -> None:
    config = replace(CONFIG, replicas=1, auto_maintenance_fraction=0.0)
    memory, now, _ = settle(Memory(), 0.0, members("a1", "a2"), config=config)
    out = run(memory, now, members("a1"), config=config)
    assert "shards-unavailable" in audit_of(out)
    # Another member joins: new plans are written, the same shards stay unavailable.
    memory, now, kinds = settle(out.memory, now + 1, members("a1", "a3"), config=config)
    assert "plan" in kinds and "shards-unavailable" not in kinds
    assert memory.unavailable_reported == out.memory.unavailable_reported


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sets(st.sampled_from(["a1", "a2", "a3", "a4", "a5"])), min_size=1,
                max_size=8))
def test_decide_is_deterministic_and_writes_meta_last(history) -> None:
    memory, now = Memory(), 0.0
    for ids in history:
        live = members(*sorted(ids))
        out = run(memory, now, live)
        assert out == run(memory, now, live)
        plan_writes = [w for w in out.writes if "/plan/" in w.path]
        if out.plan_written:
            assert plan_writes[-1].path == PATHS.plan_meta
            assert out.writes[-1].path == PATHS.plan_meta
        memory, now = out.memory, now + 2 * INITIAL_SETTLE


def test_a_config_that_changes_the_shard_count_is_refused_once_and_the_old_one_kept() -> None:
    live = members("a1", "a2", "a3")
    memory, now, _ = settle(Memory(), 0.0, live)
    bad = ClusterConfig(shards=64, replicas=2)
    out = run(memory, now, live, config=bad)
    assert audit_of(out) == ["config-refused"]
    assert "64 shards" in out.audit[0].message and "8" in out.audit[0].message
    assert len(out.memory.plan.shards) == 8
    # The cluster keeps planning (a departure fails over) and says it only once.
    out = run(out.memory, now + 1, members("a1", "a2"), config=bad)
    assert "config-refused" not in audit_of(out) and "member-left" in audit_of(out)
    assert len(out.memory.plan.shards) == 8 and out.memory.plan.meta.shards == 8


def test_an_unreadable_config_keeps_the_last_one_and_failover_goes_on() -> None:
    live = members("a1", "a2", "a3")
    memory, now, _ = settle(Memory(), 0.0, live)
    out = run(memory, now, members("a1", "a2"), config=None, config_error="not valid JSON")
    assert "config-refused" in audit_of(out) and "member-left" in audit_of(out)
    assert all(p.primary in ("a1", "a2") for p in out.memory.plan.shards)
    # A new term with no config read yet: the stored plan's counts are used.
    fresh = Memory.at_start(out.memory.plan)
    again = run(fresh, now + 1, members("a1"), config=None, config_error="missing")
    assert again.plan_written and len(again.memory.plan.shards) == 8
    # A new cluster without a config plans nothing.
    assert run(Memory(), now, live, config=None).writes == ()


def test_an_agent_whose_member_znode_vanished_but_whose_session_lives_stays_placed() -> None:
    live = members("a1", "a2", "a3")
    memory, now, _ = settle(Memory(), 0.0, live)
    statuses = in_sync_statuses(memory, live)  # a3's status znode is still there
    out = run(memory, now, members("a1", "a2"), statuses=statuses)
    assert "member-left" not in [e.kind for e in out.audit]
    assert out.memory.plan.shards == memory.plan.shards


def test_repairs_found_at_the_start_of_a_term_are_audited_once() -> None:
    live = members("a1", "a2")
    memory, now, _ = settle(Memory(), 0.0, live)
    fresh = Memory.at_start(memory.plan, notes=("/x/plan/meta: missing: rewritten",))
    out = run(fresh, now, live)
    assert audit_of(out) == ["plan-repaired"]
    assert run(out.memory, now + 1, live).audit == ()


def test_a_copy_reported_failed_is_re_pointed_and_audited_with_its_reason() -> None:
    live = members("a1", "a2", "a3")
    memory, now, _ = settle(Memory(), 0.0, live)
    out = run(memory, now, members("a1", "a2", "a3", "a4"))
    shard, (copier, source) = next((s, p.bootstrapping[0]) for s, p in
                                   enumerate(out.memory.plan.shards) if p.bootstrapping)
    statuses = in_sync_statuses(out.memory, live)
    statuses[copier] = AgentStatus(copier, out.memory.plan.agents[copier].generation,
                                   {shard: ShardStatus("ERROR", reason="404 unknown_shard")})
    retried = run(out.memory, now + 1, members("a1", "a2", "a3", "a4"), statuses=statuses)
    [event] = [e for e in retried.audit if e.kind == "copy-failed"]
    assert f"shard {shard} from {source}" in event.message and "404" in event.message
    assert (copier, source) not in retried.memory.plan.shards[shard].bootstrapping


def test_placement_past_its_deadline_writes_a_valid_plan_and_continues_next_pass() -> None:
    live = members("a1", "a2", "a3")
    memory, now, _ = settle(Memory(), 0.0, live)
    bigger = members("a1", "a2", "a3", "a4", "a5")
    cut = decide(memory, Inputs(now=now, config=CONFIG, members=bigger,
                                statuses=in_sync_statuses(memory, live)),
                 paths=PATHS, leader="c1", epoch=7, should_stop=lambda: True)
    assert not cut.balanced and cut.deadline == now, "the next pass is due at once"
    assert all(len(set(p.replicas)) == len(p.replicas) for p in cut.memory.plan.shards)
    full = run(cut.memory, now + 0.1, bigger)
    assert full.balanced
    per_agent = {a: sum(a in t for t in full.memory.plan.targets) for a in bigger}
    assert max(per_agent.values()) - min(per_agent.values()) <= 1, per_agent


def test_down_members_are_recorded_with_since_and_survive_a_new_term() -> None:
    live = members("a1", "a2", "a3")
    memory, now, _ = settle(Memory(), 0.0, live)
    out = run(memory, 100.0, members("a1", "a2"))
    assert out.memory.plan.meta.summary["down"] == {"a3": 100.0}
    fresh = Memory.at_start(out.memory.plan, announce="c2 leads with epoch 9")
    assert fresh.down == {"a3": 100.0}
    again = run(fresh, 200.0, members("a1", "a2"))
    assert "leader-elected" in [e.kind for e in again.audit]
    later = run(again.memory, 100.0 + 3601, members("a1", "a2", "a4"))
    assert "a3" not in later.memory.plan.meta.summary["down"], "an hour later it is gone"
    back = run(out.memory, 150.0, live)
    assert back.memory.plan.meta.summary["down"] == {}, "a returning member is up"


def test_a_leaving_member_hands_off_its_primaries_and_is_answered_in_plan_meta() -> None:
    live = members("a1", "a2", "a3")
    memory, now, _ = settle(Memory(), 0.0, live)
    held = [s for s, p in enumerate(memory.plan.shards) if p.primary == "a1"]
    assert held
    leaving = {**live, "a1": replace(live["a1"], leaving=True)}
    out = run(memory, now, leaving)
    assert "member-leaving" in audit_of(out) and out.plan_written
    assert all(p.primary != "a1" for p in out.memory.plan.shards)
    assert all("a1" in out.memory.plan.shards[s].replicas for s in held), "replicas stay"
    assert out.memory.plan.meta.leaving() == {"a1": 0}
    # Nothing else to do: no more writes, and the answer is not repeated.
    again = run(out.memory, now + 1, leaving, statuses=in_sync_statuses(out.memory, leaving))
    assert again.writes == ()
    # Gone, then back as a new incarnation: it may be primary again (balance).
    gone = run(again.memory, now + 2, members("a2", "a3"))
    assert gone.memory.plan.meta.leaving() == {}


def test_a_leaving_member_that_must_keep_its_primaries_is_answered_at_once() -> None:
    config = replace(CONFIG, replicas=1)
    live = members("a1", "a2")
    memory, now, _ = settle(Memory(), 0.0, live, config=config)
    mine = sum(1 for p in memory.plan.shards if p.primary == "a1")
    leaving = {**live, "a1": replace(live["a1"], leaving=True)}
    out = run(memory, now, leaving, config=config)
    # No replica anywhere else: the plan does not change, but plan/meta answers.
    assert [w.path for w in out.writes if w.op != "append"] == [PATHS.plan_meta]
    assert out.memory.plan.meta.leaving() == {"a1": mine}


def test_only_replicas_the_primary_applied_as_peers_are_fenced_successors() -> None:
    from coordinator.decide import fenced_successors
    from shardkeeper.layout import AgentPlan, Assignment
    from shardkeeper.plan import PlanState, ShardPlan

    plan = PlanState(agents={
        "a": AgentPlan(5, 7, {0: Assignment(Role.PRIMARY, peers=("b",), term=3),
                              1: Assignment(Role.REPLICA, primary="b", term=4)}),
        "b": AgentPlan(6, 7, {1: Assignment(Role.PRIMARY, peers=("a", "c"), term=4)}),
    }, shards=(ShardPlan(("a", "b"), term=3), ShardPlan(("b", "a", "c"), term=4)))
    statuses = {"a": AgentStatus("a", 5, {}), "b": AgentStatus("b", 5, {})}
    fenced = fenced_successors(plan, statuses)  # a view: asked pair by pair, or listed
    assert set(fenced) == {("b", 0)}, "b has not applied generation 6"
    assert ("b", 0) in fenced and ("a", 1) not in fenced and ("b", 9) not in fenced
    statuses["b"] = AgentStatus("b", 6, {})
    assert set(fenced_successors(plan, statuses)) == {("b", 0), ("a", 1), ("c", 1)}
    del statuses["a"]
    assert set(fenced_successors(plan, statuses)) == {("a", 1), ("c", 1)}


def test_a_dead_agent_stays_departed_while_its_session_s_znodes_go_one_by_one() -> None:
    """ZooKeeper deletes an expired session's member and status znodes one at a time; in
    between, the dead agent must not come back (a spurious join doubled the copies)."""
    from coordinator.decide import still_dead

    live = members("a1", "a2", "a3", "a4")
    memory, now, _ = settle(Memory(), 100.0, live)
    statuses = in_sync_statuses(memory, live)
    gone = {a: m for a, m in live.items() if a != "a4"}
    dead = {("a4", live["a4"].started)}
    kept, agents = still_dead(dead, live, statuses)  # killed: both znodes still there
    assert agents == {"a4"}
    out = run(memory, now, live, statuses=statuses, dead=agents)
    assert "member-left" in [e.kind for e in out.audit]
    memory = out.memory
    kept, agents = still_dead(kept, gone, statuses)  # member znode gone, status not yet
    assert agents == {"a4"}, "its status alone must not make it live again"
    out = run(memory, now + 0.1, gone, statuses=statuses, dead=agents)
    assert "member-joined" not in [e.kind for e in out.audit]
    assert "a4" not in out.memory.live_before
    without = {a: s for a, s in statuses.items() if a != "a4"}
    assert still_dead(kept, gone, without) == (set(), frozenset()), "session over: forgotten"
    again = {**gone, "a4": replace(live["a4"], started=live["a4"].started + 5)}
    assert still_dead(kept, again, statuses) == (set(), frozenset()), "a new incarnation"
