"""Turning a placement into the znode writes of one plan generation (pure: no I/O).

The leader keeps the plan it last wrote as a :class:`PlanState`. Given a new placement it
asks :func:`plan_writes` for the znodes that changed, and nothing else: agents whose
assignment is unchanged keep their znode (and so are not woken), routing chunks whose
rows are unchanged are not rewritten, and ``plan/meta`` goes last, as the commit point.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shardkeeper.layout import (
    ROUTING_CHUNK,
    AgentPlan,
    Assignment,
    Paths,
    PlanMeta,
    RoutingChunk,
)
from shardkeeper.plan import PlanState, ShardPlan, Targets, assignments, shard_assignments


@dataclass(frozen=True)
class Write:
    """One znode operation: ``op`` is "create", "set" or "delete"."""

    op: str
    path: str
    data: bytes = b""


def agent_targets(prev: PlanState, shards: tuple[ShardPlan, ...]
                  ) -> dict[str, dict[int, Assignment]]:
    """The assignments of every agent that holds, or held, a shard whose plan changed.

    Agents not in the result keep their stored assignment: at 100,000 shards a membership
    change touches a few hundred shards, so only those are re-derived.
    """
    if prev.meta is None:
        return assignments(shards)
    empty = ShardPlan()
    n = max(len(prev.shards), len(shards))
    changed = [
        s for s in range(n)
        if (prev.shards[s] if s < len(prev.shards) else empty)
        != (shards[s] if s < len(shards) else empty)
    ]
    out: dict[str, dict[int, Assignment]] = {}
    for s in changed:
        for shard_plan in (prev.shards[s] if s < len(prev.shards) else empty,
                           shards[s] if s < len(shards) else empty):
            for agent in shard_plan.holders:
                if agent not in out:
                    old = prev.agents.get(agent)
                    out[agent] = dict(old.replicas) if old is not None else {}
    for s in changed:
        if s < len(prev.shards):
            for agent in prev.shards[s].holders:
                out[agent].pop(s, None)
        if s < len(shards):
            for agent, assignment in shard_assignments(shards[s]).items():
                out[agent][s] = assignment
    return out


def chunk_of(shards: Sequence[ShardPlan], targets: Targets, c: int, generation: int
             ) -> RoutingChunk:
    first = c * ROUTING_CHUNK
    rows = shards[first : first + ROUTING_CHUNK]
    return RoutingChunk(
        generation=generation,
        first=first,
        replicas=tuple(p.replicas for p in rows),
        bootstrapping={first + i: p.bootstrapping for i, p in enumerate(rows) if p.bootstrapping},
        targets={
            first + i: tuple(targets[first + i])
            for i, p in enumerate(rows)
            if first + i < len(targets) and tuple(targets[first + i]) != p.replicas
        },
    )


def changed_chunks(prev: PlanState, shards: Sequence[ShardPlan], targets: Targets) -> list[int]:
    n_chunks = (len(shards) + ROUTING_CHUNK - 1) // ROUTING_CHUNK
    out = []
    for c in range(n_chunks):
        window = slice(c * ROUTING_CHUNK, (c + 1) * ROUTING_CHUNK)
        if prev.shards[window] != tuple(shards[window]) or prev.targets[window] != targets[window]:
            out.append(c)
    return out


def plan_writes(
    paths: Paths,
    prev: PlanState,
    shards: Sequence[ShardPlan],
    targets: Targets,
    members: Iterable[str],
    *,
    epoch: int,
    leader: str,
    replicas: int,
    shortfall: int,
    now: float,
    summary: dict | None = None,
    force: bool = False,
) -> tuple[list[Write], PlanState]:
    """The writes that take the stored plan from ``prev`` to ``shards``, and the new state.

    Returns no writes when neither the plan, the target nor the member list changed,
    unless ``force`` (a summary an agent waits for: at least plan/meta is written). A
    departed agent's plan znode is deleted; a live agent without replicas gets an empty
    plan, so that it drops what it holds.
    """
    shards = tuple(shards)
    targets = tuple(tuple(t) for t in targets)
    members = tuple(sorted(members))
    if (
        prev.meta is not None
        and not force
        and not prev.rewrite
        and prev.shards == shards
        and prev.targets == targets
        and prev.meta.members == members
    ):
        return [], prev
    generation = prev.generation + 1
    writes: list[Write] = []
    existing = set(prev.existing)

    def put(path: str, data: bytes) -> None:
        writes.append(Write("set" if path in existing else "create", path, data))
        existing.add(path)

    new_agents: dict[str, AgentPlan] = {}
    assigned: dict[tuple[str, int], int] = {}
    wanted = agent_targets(prev, shards)
    live = set(members)
    for agent in sorted(set(wanted) | set(prev.agents) | live):
        old = prev.agents.get(agent)
        mine = wanted.get(agent, old.replicas if old is not None else {})
        path = paths.plan_agent(agent)
        if not mine and agent not in live:
            if path in existing:
                writes.append(Write("delete", path))
                existing.discard(path)
            continue
        if old is not None and old.replicas == mine and path not in prev.rewrite:
            new_agents[agent] = old
            assigned.update((k, prev.assigned[k]) for k in ((agent, s) for s in mine)
                            if k in prev.assigned)
            continue
        plan = AgentPlan(generation=generation, epoch=epoch, replicas=mine)
        new_agents[agent] = plan
        put(path, plan.encode())
        if old is not None:
            # Assignments the new znode carries unchanged keep their age: the agent's
            # reports about them stay current (joins need not wait for every agent to
            # apply every plan that changed some other shard of theirs). Inlined
            # prev.assigned_at: this runs for every assignment of every rewritten agent.
            before, aged = old.replicas.get, prev.assigned.get
            for s, assignment in mine.items():
                was = before(s)
                if was is assignment or was == assignment:
                    assigned[(agent, s)] = aged((agent, s), old.generation)
    kept = {paths.plan_agent(a) for a in new_agents}
    for path in sorted(p for p in existing if p.startswith(paths.plan_agents + "/")):
        if path not in kept:  # a leftover no agent owns (damaged, or a stray name)
            writes.append(Write("delete", path))
            existing.discard(path)
    n_chunks = (len(shards) + ROUTING_CHUNK - 1) // ROUTING_CHUNK
    forced = {c for c in range(n_chunks) if paths.routing_chunk(c) in prev.rewrite}
    for c in sorted(set(changed_chunks(prev, shards, targets)) | forced):
        put(paths.routing_chunk(c), chunk_of(shards, targets, c, generation).encode())
    chunk_paths = {paths.routing_chunk(c) for c in range(n_chunks)}
    for path in sorted(p for p in existing if p.startswith(paths.routing + "/")):
        if path not in chunk_paths:  # past the end (fewer shards), or a stray name
            writes.append(Write("delete", path))
            existing.discard(path)
    meta = PlanMeta(
        generation=generation,
        epoch=epoch,
        leader=leader,
        shards=len(shards),
        replicas=replicas,
        members=members,
        chunks=n_chunks,
        shortfall=shortfall,
        created=now,
        summary=summary or {},
    )
    put(paths.plan_meta, meta.encode())
    return writes, PlanState(meta=meta, agents=new_agents, shards=shards, targets=targets,
                             existing=frozenset(existing), assigned=assigned)


def batches(writes: Sequence[Write], max_bytes: int = 512 * 1024) -> list[list[Write]]:
    """Split writes into multi() batches that stay well under jute.maxbuffer (1 MiB)."""
    out: list[list[Write]] = [[]]
    size = 0
    for w in writes:
        cost = len(w.data) + len(w.path) + 64
        if out[-1] and size + cost > max_bytes:
            out.append([])
            size = 0
        out[-1].append(w)
        size += cost
    return [b for b in out if b]
