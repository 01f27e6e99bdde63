"""The plan as both roles and the CLI read it: per shard the in-sync replicas (primary
first), the replicas still bootstrapping (each with its source) and the primary's term,
plus the placement target the leader is moving toward.

This is the decoded form of ``plan/meta``, ``plan/agents/<id>`` and ``plan/routing/<chunk>``
(their codecs are in :mod:`shardkeeper.layout`; :func:`shardkeeper.cluster.read_plan`
assembles it). The leader's reconciler (``coordinator.reconcile``) computes new
``ShardPlan`` rows, ``coordinator.writes`` turns them into znode writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import xxhash

from shardkeeper.layout import AgentPlan, Assignment, PlanMeta, RoutingChunk
from shardkeeper.vocab import Role

# shard -> agents, primary first (a placement target, or the in-sync replicas)
Targets = tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class ShardPlan:
    replicas: tuple[str, ...] = ()  # in sync, primary first
    bootstrapping: tuple[tuple[str, str], ...] = ()  # (agent, source agent)
    # The primary's term: the plan generation that made it primary (see
    # ``coordinator.reconcile.with_terms``); 0 only for a shard without a primary.
    term: int = 0

    @property
    def primary(self) -> str | None:
        return self.replicas[0] if self.replicas else None

    @property
    def holders(self) -> tuple[str, ...]:
        return self.replicas + tuple(a for a, _ in self.bootstrapping)


@dataclass(frozen=True)
class PlanState:
    """The plan as stored in ZooKeeper: meta, every plan/agents znode, every shard's plan,
    and the placement target it is moving toward.

    ``existing`` holds the path of every plan znode that exists (so that the next write
    creates or sets it); ``rewrite`` the plan znodes the next generation must write even
    if their content is unchanged, because they were found damaged or missing.
    """

    meta: PlanMeta | None = None
    agents: dict[str, AgentPlan] = field(default_factory=dict)
    shards: tuple[ShardPlan, ...] = ()
    targets: Targets = ()
    existing: frozenset[str] = frozenset()
    rewrite: frozenset[str] = frozenset()
    # The leader's memory, never stored: the generation that last changed an (agent,
    # shard) assignment, where that is older than the agent's plan znode (see assigned_at).
    assigned: dict[tuple[str, int], int] = field(default_factory=dict, compare=False)

    @property
    def generation(self) -> int:
        return self.meta.generation if self.meta else 0

    def assigned_at(self, agent: str, shard: int) -> int:
        """The generation since which ``agent``'s assignment for ``shard`` is what it is:
        a status the agent wrote under that plan or a later one speaks of this assignment.
        Without the leader's memory of it (a new term), the agent's plan generation, which
        is never older."""
        mine = self.agents.get(agent)
        since = mine.generation if mine is not None else 0
        return self.assigned.get((agent, shard), since)

    @property
    def routing(self) -> Targets:
        """In-sync replicas per shard, primary first: what clients route by."""
        return tuple(p.replicas for p in self.shards)


def shard_assignments(shard: ShardPlan) -> dict[str, Assignment]:
    primary = shard.primary
    copying = tuple(a for a, _ in shard.bootstrapping)
    out: dict[str, Assignment] = {}
    term = shard.term
    for i, agent in enumerate(shard.replicas):
        if i == 0:
            out[agent] = Assignment(Role.PRIMARY, peers=shard.replicas[1:], bootstrapping=copying,
                                    term=term)
        else:
            out[agent] = Assignment(Role.REPLICA, primary=primary, term=term)
    for agent, source in shard.bootstrapping:
        out[agent] = Assignment(Role.REPLICA, primary=primary, source=source, term=term)
    return out


def assignments(shards: Sequence[ShardPlan]) -> dict[str, dict[int, Assignment]]:
    """Invert shard -> plan into agent -> {shard: Assignment}."""
    out: dict[str, dict[int, Assignment]] = {}
    for s, shard in enumerate(shards):
        for agent, assignment in shard_assignments(shard).items():
            out.setdefault(agent, {})[s] = assignment
    return out


@dataclass(frozen=True)
class StoredPlan:
    """Every plan znode as read, readable or not: what the leader rebuilds a plan from.

    ``damaged`` maps the path of each plan znode that exists but cannot be decoded (or
    does not fit the rest) to the reason (which names the path); a path in neither the
    readable parts nor ``damaged`` does not exist.
    """

    meta: PlanMeta | None = None
    agents: dict[str, AgentPlan] = field(default_factory=dict)
    chunks: dict[int, RoutingChunk] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)
    existing: frozenset[str] = frozenset()  # every plan znode path that exists
    digests: dict[str, int] = field(default_factory=dict)  # path -> digest of its bytes

    @property
    def empty(self) -> bool:
        return not self.existing


def digest(data: bytes | None) -> int | None:
    """A plan znode's content in brief, so that the leader can tell whether a znode still
    holds what it wrote without keeping every znode's bytes."""
    return None if data is None else xxhash.xxh64_intdigest(data)
