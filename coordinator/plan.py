"""Turning a placement into the znode writes of one plan generation (pure: no I/O).

The leader keeps the plan it last wrote as a :class:`PlanState`. Given a new placement it
asks :func:`plan_writes` for the znodes that changed, and nothing else: agents whose
assignment is unchanged keep their znode (and so are not woken), routing chunks whose
rows are unchanged are not rewritten, and ``plan/meta`` goes last, as the commit point.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from coordinator.layout import (
    ROLE_PRIMARY,
    ROLE_REPLICA,
    ROUTING_CHUNK,
    AgentPlan,
    Paths,
    PlanMeta,
    RoutingChunk,
    chunk_routing,
)

Routing = tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Write:
    """One znode operation: ``op`` is "create", "set" or "delete"."""

    op: str
    path: str
    data: bytes = b""


@dataclass(frozen=True)
class PlanState:
    """The plan as stored in ZooKeeper: meta, every plan/agents znode, and the routing rows."""

    meta: PlanMeta | None = None
    agents: dict[str, AgentPlan] = field(default_factory=dict)
    routing: Routing = ()

    @property
    def generation(self) -> int:
        return self.meta.generation if self.meta else 0


def assignments(routing: Routing) -> dict[str, dict[int, str]]:
    """Invert shard -> replicas into agent -> {shard: role}; the first replica is primary."""
    out: dict[str, dict[int, str]] = {}
    for shard, replicas in enumerate(routing):
        for i, agent in enumerate(replicas):
            out.setdefault(agent, {})[shard] = ROLE_PRIMARY if i == 0 else ROLE_REPLICA
    return out


def changed_chunks(old: Routing, new: Routing) -> list[int]:
    n_chunks = (len(new) + ROUTING_CHUNK - 1) // ROUTING_CHUNK
    return [
        c
        for c in range(n_chunks)
        if old[c * ROUTING_CHUNK : (c + 1) * ROUTING_CHUNK]
        != new[c * ROUTING_CHUNK : (c + 1) * ROUTING_CHUNK]
    ]


def plan_writes(
    paths: Paths,
    prev: PlanState,
    routing: Routing,
    members: Iterable[str],
    *,
    epoch: int,
    leader: str,
    replicas: int,
    shortfall: int,
    now: float,
) -> tuple[list[Write], PlanState]:
    """The writes that take the stored plan from ``prev`` to ``routing``, and the new state.

    Returns no writes when neither the routing nor the member list changed. A departed
    agent's plan znode is deleted; a live agent that lost all replicas gets an empty plan,
    so that it drops what it holds.
    """
    members = tuple(sorted(members))
    if prev.meta is not None and prev.routing == routing and prev.meta.members == members:
        return [], prev
    generation = prev.generation + 1
    writes: list[Write] = []
    new_agents: dict[str, AgentPlan] = {}
    target = assignments(routing)
    live = set(members)
    for agent in sorted(set(target) | set(prev.agents) | live):
        shards = target.get(agent, {})
        old = prev.agents.get(agent)
        path = paths.plan_agent(agent)
        if not shards and agent not in live:
            if old is not None:
                writes.append(Write("delete", path))
            continue
        if old is not None and old.replicas == shards:
            new_agents[agent] = old
            continue
        plan = AgentPlan(generation=generation, epoch=epoch, replicas=shards)
        new_agents[agent] = plan
        writes.append(Write("create" if old is None else "set", path, plan.encode()))
    old_chunks = (len(prev.routing) + ROUTING_CHUNK - 1) // ROUTING_CHUNK
    chunks = chunk_routing(routing)
    for c in changed_chunks(prev.routing, routing):
        data = RoutingChunk(generation, c * ROUTING_CHUNK, chunks[c]).encode()
        writes.append(Write("create" if c >= old_chunks else "set", paths.routing_chunk(c), data))
    writes += [Write("delete", paths.routing_chunk(c)) for c in range(len(chunks), old_chunks)]
    meta = PlanMeta(
        generation=generation,
        epoch=epoch,
        leader=leader,
        shards=len(routing),
        replicas=replicas,
        members=members,
        chunks=len(chunks),
        shortfall=shortfall,
        created=now,
    )
    writes.append(Write("create" if prev.meta is None else "set", paths.plan_meta, meta.encode()))
    return writes, PlanState(meta=meta, agents=new_agents, routing=routing)


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
