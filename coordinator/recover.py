"""Rebuilding the stored plan when plan znodes are damaged or missing (pure).

A leader starting its term reads every plan znode (``shardkeeper.cluster.read_stored_plan``)
and calls :func:`rebuild`. Nothing in the plan is trusted blindly, and nothing damaged
makes the leader give up: each shard's row comes from the best source still readable,

1. its routing chunk (in-sync replicas, copies, target), with the primary's term from the
   primary's agent znode;
2. else the agents' plan znodes (who is primary, its peers, who copies from whom);
3. else the agents' status reports: what live agents actually hold in sync;

and every damaged or missing plan znode is marked for rewriting, so the next generation
repairs it. A term that cannot be read is left 0: ``with_terms`` then gives the primary a
new term, which fences any older one (safe; the replicas repair against it). The new
generation is above every generation anything in the cluster has seen, so that no agent
ignores the repaired plan as old.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shardkeeper.layout import ROUTING_CHUNK, AgentPlan, AgentStatus, Paths, PlanMeta
from shardkeeper.plan import PlanState, ShardPlan, StoredPlan, assignments
from shardkeeper.vocab import Role, ShardState


@dataclass(frozen=True)
class Rebuilt:
    plan: PlanState
    notes: tuple[str, ...] = ()  # what was repaired, for the audit log

    @property
    def repaired(self) -> bool:
        return bool(self.notes)


def rebuild(stored: StoredPlan, statuses: Mapping[str, AgentStatus], paths: Paths, *,
            shards: int, replicas: int) -> Rebuilt:
    """The plan to continue from, and notes on what had to be repaired.

    ``shards`` and ``replicas`` are the cluster's (from the config) for when plan/meta
    itself is unreadable.
    """
    if stored.empty:
        return Rebuilt(PlanState())
    notes = [f"{reason}: rewritten" for reason in sorted(stored.damaged.values())]
    meta = stored.meta
    if meta is None and paths.plan_meta not in stored.damaged:
        notes.append(f"{paths.plan_meta}: missing: rewritten")
    count = meta.shards if meta is not None else shards
    rows, targets, from_elsewhere = rebuild_rows(stored, statuses, count)
    for chunk in sorted(from_elsewhere):
        if paths.routing_chunk(chunk) not in stored.damaged:
            notes.append(f"{paths.routing_chunk(chunk)}: missing: rebuilt from the agents'"
                         " plans and status reports")
    derived = assignments(rows)
    agents: dict[str, AgentPlan] = {}
    rewrite = set(stored.damaged)
    for agent in sorted(set(stored.agents) | set(derived)):
        mine = derived.get(agent, {})
        old = stored.agents.get(agent)
        path = paths.plan_agent(agent)
        if old is not None and old.replicas == mine:
            agents[agent] = old
            continue
        if old is None and path not in stored.damaged:
            notes.append(f"{path}: missing: rebuilt from the routing table")
        elif old is not None:
            notes.append(f"{path}: disagreed with the rebuilt routing table: rewritten")
        agents[agent] = AgentPlan(old.generation if old else 0, old.epoch if old else 0, mine)
        rewrite.add(path)
    if meta is None:
        rewrite.add(paths.plan_meta)
    rewrite.update(paths.routing_chunk(c) for c in from_elsewhere)
    generation = max(
        [meta.generation if meta else 0]
        + [a.generation for a in stored.agents.values()]
        + [c.generation for c in stored.chunks.values()]
        + [s.generation for s in statuses.values()]
    )
    meta = PlanMeta(
        generation=generation,
        epoch=meta.epoch if meta else 0,
        leader=meta.leader if meta else "",
        shards=count,
        replicas=meta.replicas if meta else replicas,
        members=meta.members if meta else tuple(sorted(derived)),
        chunks=(count + ROUTING_CHUNK - 1) // ROUTING_CHUNK,
        shortfall=meta.shortfall if meta else 0,
        created=meta.created if meta else 0.0,
        summary=meta.summary if meta else {},
    )
    plan = PlanState(meta=meta, agents=agents, shards=rows, targets=targets,
                     existing=stored.existing, rewrite=frozenset(rewrite))
    return Rebuilt(plan, tuple(notes))


def rebuild_rows(stored: StoredPlan, statuses: Mapping[str, AgentStatus], count: int
                 ) -> tuple[tuple[ShardPlan, ...], tuple[tuple[str, ...], ...], set[int]]:
    """(rows, targets, chunks rebuilt from elsewhere) for shards 0..count-1."""
    from_plans = rows_from_agent_plans(stored.agents)
    from_status = rows_from_statuses(statuses)
    rows: list[ShardPlan] = []
    targets: list[tuple[str, ...]] = []
    rebuilt: set[int] = set()
    for shard in range(count):
        chunk = stored.chunks.get(shard // ROUTING_CHUNK)
        offset = shard % ROUTING_CHUNK
        if chunk is not None and offset < len(chunk.replicas):
            replicas = chunk.replicas[offset]
            row = ShardPlan(replicas, chunk.bootstrapping.get(shard, ()),
                            term_of(stored.agents, shard, replicas))
            rows.append(row)
            targets.append(chunk.targets.get(shard, replicas))
            continue
        rebuilt.add(shard // ROUTING_CHUNK)
        row = from_plans.get(shard) or from_status.get(shard) or ShardPlan()
        rows.append(row)
        targets.append(row.replicas)
    return tuple(rows), tuple(targets), rebuilt


def term_of(agents: Mapping[str, AgentPlan], shard: int, replicas: tuple[str, ...]) -> int:
    """The primary's term as its own agent znode holds it; 0 if unreadable."""
    primary = agents.get(replicas[0]) if replicas else None
    assignment = primary.replicas.get(shard) if primary else None
    if assignment is None or assignment.role != Role.PRIMARY:
        return 0
    return assignment.term


def rows_from_agent_plans(agents: Mapping[str, AgentPlan]) -> dict[int, ShardPlan]:
    """Shard rows as the readable agent znodes describe them: the primary with the highest
    term, then its peers and copies. A peer whose own znode is unreadable is kept (it
    most likely still holds the shard: dropping it would cost redundancy); one whose
    readable znode says it follows another primary, or nothing, is not."""
    primaries: dict[int, tuple[int, str]] = {}
    for agent, plan in sorted(agents.items()):
        for shard, a in plan.replicas.items():
            if a.role == Role.PRIMARY and a.term >= primaries.get(shard, (-1, ""))[0]:
                primaries[shard] = (a.term, agent)
    out: dict[int, ShardPlan] = {}
    for shard, (term, primary) in primaries.items():
        mine = agents[primary].replicas[shard]

        def follows(agent: str, shard: int = shard, primary: str = primary) -> bool:
            if agent not in agents:
                return True
            b = agents[agent].replicas.get(shard)
            return b is not None and b.role == Role.REPLICA and b.primary == primary

        in_sync = (primary,) + tuple(p for p in mine.peers if follows(p) and p != primary)
        copying = []
        for agent in mine.bootstrapping:
            b = agents[agent].replicas.get(shard) if agent in agents else None
            source = b.source if b is not None else in_sync[0]
            if follows(agent) and agent not in in_sync and source in in_sync:
                copying.append((agent, source))
        out[shard] = ShardPlan(in_sync, tuple(copying), term)
    return out


def rows_from_statuses(statuses: Mapping[str, AgentStatus]) -> dict[int, ShardPlan]:
    """Shard rows from what agents report holding in sync (the last resort). The agent
    reporting PRIMARY goes first; the term is unknown (0), so the primary gets a new one."""
    holders: dict[int, list[tuple[bool, str]]] = {}
    for agent, status in sorted(statuses.items()):
        for shard, st in status.shards.items():
            if st.in_sync:
                holders.setdefault(shard, []).append((st.state != ShardState.PRIMARY, agent))
    return {s: ShardPlan(tuple(a for _, a in sorted(h))) for s, h in holders.items()}

