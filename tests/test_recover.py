"""Rebuilding a damaged stored plan (coordinator.recover), pure: every plan znode kind is
damaged or removed in turn, and the rebuilt plan must keep every replica where it is."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.reconcile import with_terms
from coordinator.recover import rebuild
from coordinator.writes import plan_writes
from shardkeeper.layout import (
    ROUTING_CHUNK,
    AgentPlan,
    AgentStatus,
    Paths,
    PlanMeta,
    RoutingChunk,
    ShardStatus,
)
from shardkeeper.plan import PlanState, ShardPlan, StoredPlan, assignments
from shardkeeper.vocab import Role

P = Paths("t")
SHARDS = ROUTING_CHUNK + 40  # two chunks
AGENTS = ("a1", "a2", "a3", "a4")


def written(gen: int = 7) -> tuple[PlanState, StoredPlan]:
    """A plan as the leader writes it (through plan_writes), and its stored form."""
    rows = []
    for s in range(SHARDS):
        k = s % len(AGENTS)
        replicas = (AGENTS[k], AGENTS[(k + 1) % len(AGENTS)])
        boot = ((AGENTS[(k + 2) % len(AGENTS)], replicas[0]),) if s % 7 == 0 else ()
        rows.append(ShardPlan(replicas, boot, term=1 + s % 5))
    state = PlanState()
    for g in range(gen):
        _, state = plan_writes(P, state, tuple(rows), tuple(r.replicas for r in rows), AGENTS,
                               epoch=3, leader="c1", replicas=2, shortfall=0, now=1.0)
        if g == 0:
            rows = list(rows)  # later generations write nothing new: one generation only
    chunks = {}
    for c in range(state.meta.chunks):
        first = c * ROUTING_CHUNK
        window = state.shards[first:first + ROUTING_CHUNK]
        chunks[c] = RoutingChunk(state.meta.generation, first, tuple(p.replicas for p in window),
                                 {first + i: p.bootstrapping for i, p in enumerate(window)
                                  if p.bootstrapping})
    stored = StoredPlan(state.meta, dict(state.agents), chunks, {}, state.existing)
    return state, stored


def statuses_of(state: PlanState) -> dict[str, AgentStatus]:
    out = {}
    for agent, plan in state.agents.items():
        shards = {s: ShardStatus("PRIMARY" if a.role == Role.PRIMARY else "REPLICA",
                                 catching_up=a.source is not None)
                  for s, a in plan.replicas.items()}
        out[agent] = AgentStatus(agent, plan.generation, shards)
    return out


def damage(stored: StoredPlan, path: str, delete: bool) -> StoredPlan:
    agents = {a: p for a, p in stored.agents.items() if P.plan_agent(a) != path}
    chunks = {c: ch for c, ch in stored.chunks.items() if P.routing_chunk(c) != path}
    meta = None if path == P.plan_meta else stored.meta
    damaged = dict(stored.damaged)
    existing = set(stored.existing)
    if delete:
        existing.discard(path)
    else:
        damaged[path] = f"{path}: not valid JSON"
    return StoredPlan(meta, agents, chunks, damaged, frozenset(existing))


def paths_of(state: PlanState) -> list[str]:
    return ([P.plan_meta] + [P.plan_agent(a) for a in AGENTS]
            + [P.routing_chunk(c) for c in range(state.meta.chunks)])


def test_an_intact_plan_rebuilds_to_itself() -> None:
    state, stored = written()
    out = rebuild(stored, statuses_of(state), P, shards=SHARDS, replicas=2)
    assert not out.repaired and out.plan.rewrite == frozenset()
    assert out.plan.shards == state.shards and out.plan.agents == state.agents


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=1, max_size=4,
                unique_by=lambda t: t[0]))
def test_any_damaged_or_missing_plan_znodes_are_rebuilt_without_moving_a_replica(hits) -> None:
    state, stored = written()
    everything = paths_of(state)
    hit = [everything[i] for i, _ in hits]
    for (i, delete) in hits:
        stored = damage(stored, everything[i], delete)
    out = rebuild(stored, statuses_of(state), P, shards=SHARDS, replicas=2)
    assert out.repaired and len(out.notes) >= len(hit)
    # Every replica stays where it is: in sync, copying, and primary first.
    assert [p.replicas for p in out.plan.shards] == [p.replicas for p in state.shards]
    for s, (before, after) in enumerate(zip(state.shards, out.plan.shards, strict=True)):
        # A copy is lost only where both its chunk and its primary's znode are gone; it
        # held nothing the shard relies on and simply starts again.
        lost = (P.routing_chunk(s // ROUTING_CHUNK) in hit
                and P.plan_agent(before.primary) in hit)
        assert after.bootstrapping == before.bootstrapping or (lost and not after.bootstrapping)
    for before, after in zip(state.shards, out.plan.shards, strict=True):
        assert after.term in (before.term, 0), "a term is kept or renewed, never invented"
    assert set(hit) <= out.plan.rewrite
    assert out.plan.generation >= state.meta.generation
    # The next generation writes every hit znode, creating deleted ones, and moves nothing.
    rows = with_terms(out.plan.shards, out.plan.shards, out.plan.generation + 1)
    writes, new = plan_writes(P, out.plan, rows, out.plan.targets, AGENTS,
                              epoch=4, leader="c2", replicas=2, shortfall=0, now=2.0)
    ops = {w.path: w.op for w in writes}
    for i, delete in hits:
        assert ops[everything[i]] == ("create" if delete else "set"), everything[i]
    assert new.generation > state.meta.generation
    derived = assignments(rows)
    for agent in AGENTS:
        got, want = new.agents[agent].replicas, state.agents[agent].replicas
        assert got == derived[agent]
        # Every replica an agent holds in sync is still its, in the same role.
        held = {s: a.role for s, a in want.items() if a.source is None}
        assert {s: got[s].role for s in held} == held
        assert all(a.term in (want[s].term, new.generation) for s, a in got.items() if s in want)


def test_with_chunks_and_agent_plans_gone_the_status_reports_place_the_shards() -> None:
    state, stored = written()
    for path in paths_of(state)[1:]:
        stored = damage(stored, path, delete=True)
    out = rebuild(stored, statuses_of(state), P, shards=SHARDS, replicas=2)
    for before, after in zip(state.shards, out.plan.shards, strict=True):
        assert after.replicas == before.replicas, "in-sync holders, the primary first"
        assert after.bootstrapping == () and after.term == 0


def test_the_generation_clears_everything_any_agent_applied() -> None:
    state, stored = written()
    stored = damage(stored, P.plan_meta, delete=True)
    statuses = statuses_of(state)
    statuses["a1"] = AgentStatus("a1", 40, statuses["a1"].shards)
    out = rebuild(stored, statuses, P, shards=SHARDS, replicas=2)
    assert out.plan.generation == 40


def test_a_stored_plan_from_nothing_is_a_new_cluster() -> None:
    out = rebuild(StoredPlan(), {}, P, shards=8, replicas=2)
    assert out.plan == PlanState() and not out.repaired


def test_unreadable_terms_are_renewed_not_guessed() -> None:
    state, stored = written()
    primary = state.shards[0].primary
    agents = dict(stored.agents)
    del agents[primary]
    stored = StoredPlan(stored.meta, agents, stored.chunks,
                        {P.plan_agent(primary): "damaged"}, stored.existing)
    out = rebuild(stored, statuses_of(state), P, shards=SHARDS, replicas=2)
    assert out.plan.shards[0].term == 0
    assert all(p.term == b.term for p, b in zip(out.plan.shards, state.shards, strict=True)
               if p.primary != primary)


def test_meta_from_an_older_shape_keeps_its_counts() -> None:
    state, stored = written()
    meta = PlanMeta(state.meta.generation, 3, "c1", SHARDS, 2, AGENTS, state.meta.chunks)
    out = rebuild(StoredPlan(meta, stored.agents, stored.chunks, {}, stored.existing),
                  statuses_of(state), P, shards=1, replicas=5)
    assert len(out.plan.shards) == SHARDS and out.plan.meta.replicas == 2
    assert AgentPlan in {type(a) for a in out.plan.agents.values()}
