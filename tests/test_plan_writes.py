"""Plan diffing: only changed znodes are written, meta last (pure, no ZooKeeper)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.writes import Write, batches, plan_writes
from shardkeeper.layout import ROUTING_CHUNK, AgentPlan, Assignment, Paths, PlanMeta, RoutingChunk
from shardkeeper.plan import PlanState, ShardPlan, assignments
from shardkeeper.vocab import Role

P = Paths("c")


def plans(rows) -> tuple[ShardPlan, ...]:
    return tuple(ShardPlan(tuple(r), term=1 if r else 0) for r in rows)


def write(prev: PlanState, shards, members, targets=None):
    targets = targets if targets is not None else tuple(s.replicas for s in shards)
    return plan_writes(P, prev, shards, targets, members, epoch=3, leader="L", replicas=2,
                       shortfall=0, now=0.0)


def test_first_plan_writes_every_agent_every_chunk_and_meta_last() -> None:
    rows = plans(("a", "b") if s % 2 else ("b", "c") for s in range(ROUTING_CHUNK + 1))
    writes, state = write(PlanState(), rows, ["a", "b", "c"])
    paths = [w.path for w in writes]
    assert paths[-1] == P.plan_meta
    assert {P.plan_agent(a) for a in "abc"} <= set(paths)
    assert {P.routing_chunk(0), P.routing_chunk(1)} <= set(paths)
    assert all(w.op == "create" for w in writes)
    assert state.generation == 1
    assert AgentPlan.decode("x", writes[0].data).replicas == state.agents["a"].replicas
    assert PlanMeta.decode("m", writes[-1].data).chunks == 2


def test_unchanged_input_writes_nothing() -> None:
    rows = plans([("a", "b"), ("b", "a")])
    _, state = write(PlanState(), rows, ["a", "b"])
    writes, again = write(state, rows, ["b", "a"])
    assert writes == [] and again is state


def test_only_changed_agents_and_chunks_are_rewritten() -> None:
    n = 3 * ROUTING_CHUNK
    rows = plans((("a", "b"), ("c", "b"), ("c", "a"))[s % 3] for s in range(n))
    _, state = write(PlanState(), rows, ["a", "b", "c"])
    # Shard 1 moves its replica b -> d: the primary c learns its new peer, b drops the shard.
    moved = rows[:1] + (ShardPlan(("c", "d"), term=2),) + rows[2:]
    writes, new = write(state, moved, ["a", "b", "c", "d"])
    by_path = {w.path: w for w in writes}
    assert P.plan_agent("a") not in by_path
    assert by_path[P.plan_agent("b")].op == "set"
    assert by_path[P.plan_agent("c")].op == "set"
    assert by_path[P.plan_agent("d")].op == "create"
    assert [p for p in by_path if "/routing/" in p] == [P.routing_chunk(0)]
    assert RoutingChunk.decode("r", by_path[P.routing_chunk(0)].data).replicas[1] == ("c", "d")
    assert new.generation == 2 and new.agents["a"].generation == 1


def test_bootstraps_and_targets_are_stored_in_the_chunk() -> None:
    rows = (ShardPlan(("a", "b"), (("c", "b"),), term=1),)
    writes, state = write(PlanState(), rows, ["a", "b", "c"], targets=(("a", "c"),))
    chunk = RoutingChunk.decode("r", next(w.data for w in writes if "/routing/" in w.path))
    assert chunk.bootstrapping == {0: (("c", "b"),)}
    assert chunk.targets == {0: ("a", "c")}
    c = AgentPlan.decode("c", next(w.data for w in writes if w.path == P.plan_agent("c")))
    assert c.replicas[0] == Assignment(Role.REPLICA, primary="a", source="b", term=1)
    a = AgentPlan.decode("a", next(w.data for w in writes if w.path == P.plan_agent("a")))
    assert a.replicas[0] == Assignment(Role.PRIMARY, peers=("b",), bootstrapping=("c",), term=1)


def test_departed_agent_znode_is_deleted_but_a_live_empty_agent_gets_an_empty_plan() -> None:
    _, state = write(PlanState(), plans([("a", "b"), ("b", "c")]), ["a", "b", "c"])
    writes, new = write(state, plans([("b", "d"), ("b", "c")]), ["b", "c", "d"])
    assert Write("delete", P.plan_agent("a")) in writes
    assert "a" not in new.agents
    writes, _ = write(new, plans([("b", "d"), ("d", "b")]), ["b", "c", "d"])
    c_plan = [w for w in writes if w.path == P.plan_agent("c")]
    assert c_plan and AgentPlan.decode("c", c_plan[0].data).replicas == {}


def test_membership_change_alone_bumps_the_generation() -> None:
    _, state = write(PlanState(), plans([("a",)]), ["a"])
    writes, new = write(state, plans([("a",)]), ["a", "b"])
    assert [w.path for w in writes] == [P.plan_agent("b"), P.plan_meta]
    assert new.generation == 2


def test_assignments_mark_the_first_replica_primary() -> None:
    got = assignments(plans([("a", "b"), ("b", "a")]))
    assert got["a"][0] == Assignment(Role.PRIMARY, peers=("b",), term=1)
    assert got["a"][1] == Assignment(Role.REPLICA, primary="b", term=1)


def test_batches_respect_the_byte_budget_and_keep_order() -> None:
    writes = [Write("set", f"/p/{i}", b"x" * 1000) for i in range(50)]
    out = batches(writes, max_bytes=10_000)
    assert [w for b in out for w in b] == writes
    assert all(sum(len(w.data) for w in b) <= 10_000 for b in out)
    assert len(out) > 1


agent_ids = st.sampled_from(["a", "b", "c", "d", "e"])
shard_plans = st.builds(
    lambda replicas, copying: ShardPlan(
        tuple(replicas), tuple((a, replicas[0]) for a in copying if a not in replicas)
        if replicas else (), term=1 if replicas else 0),
    st.lists(agent_ids, max_size=3, unique=True),
    st.lists(agent_ids, max_size=2, unique=True),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(shard_plans, min_size=1, max_size=12), min_size=2, max_size=5))
def test_incremental_agent_plans_equal_a_full_recomputation(history) -> None:
    state = PlanState()
    members = ["a", "b", "c", "d", "e"]
    for rows in history:
        _, state = write(state, tuple(rows), members)
        full = assignments(tuple(rows))
        for agent in members:
            assert state.agents[agent].replicas == full.get(agent, {})


def test_an_assignment_keeps_its_age_while_the_agents_other_shards_change() -> None:
    """Re-replication rewrites every agent's plan at each step (its primaries' peers
    change as copies join); a copy's report must not wait for the agent to apply the
    latest of those plans, only one as new as its own assignment."""
    from coordinator.decide import caught_up
    from shardkeeper.layout import AgentStatus, ShardStatus

    copying = (ShardPlan(("a",), (("b", "a"),), term=1), ShardPlan(("b", "a"), term=1))
    _, first = write(PlanState(), copying, ["a", "b"])
    # Shard 1 changes (its primary b loses its peer a): b's znode is rewritten.
    changed = (copying[0], ShardPlan(("b",), term=1))
    _, second = write(first, changed, ["a", "b"])
    assert second.agents["b"].generation == 2
    assert second.assigned_at("b", 0) == 1 and second.assigned_at("b", 1) == 2
    done = {"b": AgentStatus("b", 1, {0: ShardStatus("REPLICA"), 1: ShardStatus("PRIMARY")}),
            "a": AgentStatus("a", 2, {0: ShardStatus("PRIMARY")})}
    assert set(caught_up(second, done)) == {("b", 0), ("a", 0)}, "b's copy of 0 is current"
    # Once shard 0's own assignment changes, the old report no longer counts.
    _, third = write(second, (ShardPlan(("a",), (("b", "c"),), term=1), changed[1]),
                     ["a", "b", "c"])
    assert ("b", 0) not in caught_up(third, done)
    # A new term of the leader knows no ages: the agent's plan generation, never older.
    fresh = PlanState(meta=third.meta, agents=third.agents, shards=third.shards)
    assert fresh.assigned_at("b", 0) == third.agents["b"].generation


def caught_up_in_full(plan: PlanState, statuses) -> set[tuple[str, int]]:
    """The oracle: every reported replica checked, as the leader did before the views."""
    out = set()
    for agent, status in statuses.items():
        mine = plan.agents.get(agent)
        if mine is None:
            continue
        for s, st_ in status.shards.items():
            if s in mine.replicas and st_.in_sync and (
                    status.generation >= plan.assigned_at(agent, s)):
                out.add((agent, s))
    return out


def fenced_in_full(plan: PlanState, statuses) -> set[tuple[str, int]]:
    out = set()
    for agent, mine in plan.agents.items():
        status = statuses.get(agent)
        if status is None or status.generation < mine.generation:
            continue
        for shard, a in mine.replicas.items():
            if a.role == Role.PRIMARY:
                out.update((peer, shard) for peer in a.peers)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(shard_plans, min_size=1, max_size=12), min_size=1, max_size=5),
       st.randoms(use_true_random=False))
def test_the_leaders_report_views_answer_as_the_full_sets_would(history, rnd) -> None:
    """CaughtUp and Fenced answer pair by pair what scanning every report gave, along
    plan histories with reports of every age, state and staleness."""
    from coordinator.decide import caught_up, failed_copies, fenced_successors
    from shardkeeper.layout import AgentStatus, ShardStatus

    state = PlanState()
    members = ["a", "b", "c", "d", "e"]
    for rows in history:
        _, state = write(state, tuple(rows), members)
        statuses = {}
        for agent in members:
            if rnd.random() < 0.2:
                continue  # no report from this one
            shards = {s: ShardStatus(rnd.choice(["REPLICA", "PRIMARY", "BOOTSTRAPPING",
                                                 "ERROR"]), catching_up=rnd.random() < 0.3,
                                     reason="boom")
                      for s in range(14) if rnd.random() < 0.6}
            statuses[agent] = AgentStatus(agent, rnd.randint(0, state.generation), shards)
        caught, fenced = caught_up(state, statuses), fenced_successors(state, statuses)
        want_caught, want_fenced = caught_up_in_full(state, statuses), fenced_in_full(
            state, statuses)
        assert set(caught) == want_caught and set(fenced) == want_fenced
        for agent in [*members, "zz"]:
            for s in range(-1, 15):
                assert ((agent, s) in caught) == ((agent, s) in want_caught)
                assert ((agent, s) in fenced) == ((agent, s) in want_fenced)
        assert failed_copies(state, statuses) == {
            (a, s): "boom" for a, status in statuses.items() for s, st_ in status.shards.items()
            if st_.state == "ERROR" and a in state.agents and s in state.agents[a].replicas
            and status.generation >= state.assigned_at(a, s)}
