"""Plan diffing: only changed znodes are written, meta last (pure, no ZooKeeper)."""

from __future__ import annotations

from coordinator.layout import ROUTING_CHUNK, AgentPlan, Paths, PlanMeta, RoutingChunk
from coordinator.plan import PlanState, Write, assignments, batches, plan_writes

P = Paths("c")


def write(prev: PlanState, routing, members, now: float = 0.0):
    return plan_writes(P, prev, routing, members, epoch=3, leader="L", replicas=2,
                       shortfall=0, now=now)


def test_first_plan_writes_every_agent_every_chunk_and_meta_last() -> None:
    routing = tuple(("a", "b") if s % 2 else ("b", "c") for s in range(ROUTING_CHUNK + 1))
    writes, state = write(PlanState(), routing, ["a", "b", "c"])
    paths = [w.path for w in writes]
    assert paths[-1] == P.plan_meta
    assert {P.plan_agent(a) for a in "abc"} <= set(paths)
    assert {P.routing_chunk(0), P.routing_chunk(1)} <= set(paths)
    assert all(w.op == "create" for w in writes)
    assert state.generation == 1
    assert AgentPlan.decode("x", writes[0].data).replicas == state.agents["a"].replicas
    assert PlanMeta.decode("m", writes[-1].data).chunks == 2


def test_unchanged_input_writes_nothing() -> None:
    routing = (("a", "b"), ("b", "a"))
    _, state = write(PlanState(), routing, ["a", "b"])
    writes, again = write(state, routing, ["b", "a"])
    assert writes == [] and again is state


def test_only_changed_agents_and_chunks_are_rewritten() -> None:
    n = 3 * ROUTING_CHUNK
    routing = tuple((("a", "b"), ("b", "c"), ("c", "a"))[s % 3] for s in range(n))
    _, state = write(PlanState(), routing, ["a", "b", "c"])
    # Shard 0 moves its replica from b to d: a keeps its assignment (still primary of 0).
    moved = (("a", "d"),) + routing[1:]
    writes, new = write(state, moved, ["a", "b", "c", "d"])
    by_path = {w.path: w for w in writes}
    assert P.plan_agent("a") not in by_path
    assert P.plan_agent("c") not in by_path
    assert by_path[P.plan_agent("b")].op == "set"
    assert by_path[P.plan_agent("d")].op == "create"
    assert [p for p in by_path if "/routing/" in p] == [P.routing_chunk(0)]
    assert RoutingChunk.decode("r", by_path[P.routing_chunk(0)].data).replicas[0] == ("a", "d")
    assert new.generation == 2 and new.agents["a"].generation == 1


def test_departed_agent_znode_is_deleted_but_a_live_empty_agent_gets_an_empty_plan() -> None:
    _, state = write(PlanState(), (("a", "b"), ("b", "c")), ["a", "b", "c"])
    writes, new = write(state, (("b", "d"), ("b", "c")), ["b", "c", "d"])
    assert Write("delete", P.plan_agent("a")) in writes
    assert "a" not in new.agents
    writes, _ = write(new, (("b", "d"), ("d", "b")), ["b", "c", "d"])
    c_plan = [w for w in writes if w.path == P.plan_agent("c")]
    assert c_plan and AgentPlan.decode("c", c_plan[0].data).replicas == {}


def test_membership_change_alone_bumps_the_generation() -> None:
    _, state = write(PlanState(), (("a",),), ["a"])
    writes, new = write(state, (("a",),), ["a", "b"])
    assert [w.path for w in writes] == [P.plan_agent("b"), P.plan_meta]
    assert new.generation == 2


def test_assignments_mark_the_first_replica_primary() -> None:
    assert assignments((("a", "b"), ("b", "a"))) == {
        "a": {0: "primary", 1: "replica"},
        "b": {0: "replica", 1: "primary"},
    }


def test_batches_respect_the_byte_budget_and_keep_order() -> None:
    writes = [Write("set", f"/p/{i}", b"x" * 1000) for i in range(50)]
    out = batches(writes, max_bytes=10_000)
    assert [w for b in out for w in b] == writes
    assert all(sum(len(w.data) for w in b) <= 10_000 for b in out)
    assert len(out) > 1
