"""Reading a cluster's state from ZooKeeper (shared by the leader and the admin CLI).

Reads of many znodes are issued asynchronously and collected, so that reading 1,000
members costs one round trip's latency, not 1,000. A znode that vanishes between the
listing and the read (an agent leaving) is skipped; a corrupt one raises CorruptZnode
unless the caller asks for it to be skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from shardkeeper.config import ClusterConfig
from shardkeeper.layout import (
    ROUTING_CHUNK,
    AgentPlan,
    AgentStatus,
    MemberInfo,
    Paths,
    PlanMeta,
    RoutingChunk,
    decode_epoch,
    valid_name,
)
from shardkeeper.plan import PlanState, ShardPlan, StoredPlan, digest
from shardkeeper.vocab import CorruptZnode, ShardkeeperError

log = logging.getLogger(__name__)
T = TypeVar("T")


class NoConfig(ShardkeeperError):
    pass


def read_config(client: KazooClient, paths: Paths) -> ClusterConfig:
    try:
        data, _ = client.get(paths.config)
    except NoNodeError:
        raise NoConfig(
            f"cluster {paths.cluster!r} has no config: run `shardkeeper init --cluster"
            f" {paths.cluster} --shards S --replicas R`"
        ) from None
    return ClusterConfig.decode(paths.config, data)


def read_many(
    client: KazooClient,
    parent: str,
    decode: Callable[[str, bytes], T],
    skip_corrupt: bool = False,
) -> dict[str, T]:
    """Decode every child of ``parent``; missing parent or children read as absent."""
    damaged: dict[str, str] = {}
    out = _decode_all(client, parent, decode, damaged, {})
    if damaged and not skip_corrupt:
        raise CorruptZnode(damaged[min(damaged)])
    for reason in damaged.values():
        log.error("ignoring corrupt znode: %s", reason)
    return out


def read_members(
    client: KazooClient, paths: Paths, skip_corrupt: bool = False
) -> dict[str, MemberInfo]:
    return read_many(client, paths.members, MemberInfo.decode, skip_corrupt)


def read_statuses(client: KazooClient, paths: Paths) -> dict[str, AgentStatus]:
    return read_many(client, paths.status, AgentStatus.decode, skip_corrupt=True)


def read_plan_meta(client: KazooClient, paths: Paths) -> PlanMeta | None:
    try:
        data, _ = client.get(paths.plan_meta)
    except NoNodeError:
        return None
    return PlanMeta.decode(paths.plan_meta, data)


def _decode_all(client: KazooClient, parent: str, decode: Callable[[str, bytes], T],
                damaged: dict[str, str], existing: dict[str, int]) -> dict[str, T]:
    try:
        names = client.get_children(parent)
    except NoNodeError:
        return {}
    pending = {n: client.get_async(f"{parent}/{n}") for n in sorted(names)}
    out: dict[str, T] = {}
    for name, result in pending.items():
        path = f"{parent}/{name}"
        try:
            data, _ = result.get()
        except NoNodeError:
            continue
        existing[path] = digest(data) or 0
        try:
            out[name] = decode(path, data)
        except CorruptZnode as e:
            damaged[path] = str(e)
    return out


def read_stored_plan(client: KazooClient, paths: Paths) -> StoredPlan:
    """Read every plan znode without failing on a damaged one (see StoredPlan)."""
    damaged: dict[str, str] = {}
    existing: dict[str, int] = {}
    meta = None
    try:
        data, _ = client.get(paths.plan_meta)
        existing[paths.plan_meta] = digest(data) or 0
        meta = PlanMeta.decode(paths.plan_meta, data)
    except NoNodeError:
        pass
    except CorruptZnode as e:
        damaged[paths.plan_meta] = str(e)
    agents = _decode_all(client, paths.plan_agents, AgentPlan.decode, damaged, existing)
    for name in [n for n in agents if not valid_name(n)]:
        damaged[paths.plan_agent(name)] = f"{paths.plan_agent(name)}: not an agent id"
        del agents[name]
    chunks: dict[int, RoutingChunk] = {}
    for name, chunk in _decode_all(client, paths.routing, RoutingChunk.decode, damaged,
                                   existing).items():
        path = f"{paths.routing}/{name}"
        index = int(name) if name.isdigit() else -1
        if index < 0 or path != paths.routing_chunk(index):
            damaged[path] = f"{path}: not a routing chunk name"
        elif chunk.first != index * ROUTING_CHUNK or len(chunk.replicas) > ROUTING_CHUNK:
            damaged[path] = (f"{path}: starts at shard {chunk.first} with"
                             f" {len(chunk.replicas)} rows, expected {index * ROUTING_CHUNK}")
        else:
            chunks[index] = chunk
    return StoredPlan(meta, agents, chunks, damaged, frozenset(existing), existing)


class IncompletePlan(CorruptZnode):
    """The routing chunks do not add up to the plan plan/meta announces."""


def check_chunks(paths: Paths, meta: PlanMeta, chunks: dict[str, RoutingChunk]) -> None:
    """Raise IncompletePlan unless ``chunks`` are exactly the routing table ``meta`` commits:
    routing by a partial table would send keys to the wrong shards."""
    fix = (f"a new leader writes the whole plan: restart the leading coordinator"
           f" ({meta.leader}) and check its log")
    names = [paths.routing_chunk(i).rsplit("/", 1)[1] for i in range(meta.chunks)]
    missing = [n for n in names if n not in chunks]
    if missing:
        raise IncompletePlan(
            f"the plan (generation {meta.generation}) is incomplete: routing chunk"
            f" {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} missing under"
            f" {paths.routing}; {fix}")
    rows = 0
    for name in sorted(chunks):
        if chunks[name].first != rows:
            raise IncompletePlan(f"{paths.routing}/{name}: starts at shard"
                                 f" {chunks[name].first}, expected {rows}; {fix}")
        rows += len(chunks[name].replicas)
    if rows != meta.shards:
        raise IncompletePlan(
            f"the plan (generation {meta.generation}) is inconsistent: its routing chunks"
            f" hold {rows} shards, plan/meta says {meta.shards}; {fix}")


def read_plan(client: KazooClient, paths: Paths, complete: bool = False) -> PlanState:
    """The stored plan: meta, every agent's znode, and the routing table in shard order.

    Raises CorruptZnode if a plan znode is damaged: the leader rebuilds the plan
    (``coordinator.recover``); readers only report it. ``complete``: also raise
    IncompletePlan when routing chunks are missing (what a reader that routes wants).
    """
    stored = read_stored_plan(client, paths)
    if stored.damaged:
        reason = stored.damaged[min(stored.damaged)]
        raise CorruptZnode(f"{reason} (the leader rebuilds a damaged plan when it next leads)")
    meta = stored.meta
    if meta is None:
        # No plan committed yet (or plan/meta was deleted: the leader rebuilds it). Plan
        # znodes without a meta can also be a first plan being written as we read.
        return PlanState()
    if complete:
        check_chunks(paths, meta, {paths.routing_chunk(i).rsplit("/", 1)[1]: c
                                   for i, c in stored.chunks.items()})
    shards: list[ShardPlan] = []
    targets: list[tuple[str, ...]] = []
    for index in range(meta.chunks):
        chunk = stored.chunks.get(index)
        if chunk is None or chunk.first != len(shards):
            # Missing (deleted, or a torn read of a plan being rewritten): the leader
            # repairs it; an unplaced row stands in for it here.
            chunk = RoutingChunk(meta.generation, len(shards),
                                 ((),) * min(ROUTING_CHUNK, meta.shards - len(shards)))
        for i, replicas in enumerate(chunk.replicas):
            shard = chunk.first + i
            # The term is kept in the agents' assignments (the primary's carries it).
            primary = stored.agents.get(replicas[0]) if replicas else None
            assignment = primary.replicas.get(shard) if primary else None
            term = assignment.term if assignment else 0
            shards.append(ShardPlan(replicas, chunk.bootstrapping.get(shard, ()), term))
            targets.append(chunk.targets.get(shard, replicas))
    return PlanState(meta=meta, agents=stored.agents, shards=tuple(shards),
                     targets=tuple(targets), existing=stored.existing)


def read_leader(client: KazooClient, paths: Paths) -> tuple[str | None, int]:
    """(leader id, epoch): the id written by the last leader, and the fencing version."""
    try:
        data, stat = client.get(paths.epoch)
    except NoNodeError:
        return None, 0
    return decode_epoch(paths.epoch, data), stat.version


def current_leader(client: KazooClient, paths: Paths) -> str | None:
    """The candidate that holds the election lock now, or None."""
    contenders = client.Election(paths.election).contenders()
    return contenders[0] if contenders else None


def settled(client: KazooClient, paths: Paths, agents: set[str], members: bool = True) -> bool:
    """True when ``agents`` are exactly the members and the plan's, nothing is copying, and
    every agent reports holding in sync (REPLICA or PRIMARY, not catching up) exactly what
    its latest plan says. ``members=False``: the plan's members only (a killed agent's
    member znode stays until its session expires, long after the plan left it out)."""
    plan = read_plan(client, paths)
    if plan.meta is None or set(plan.meta.members) != agents:
        return False
    if members and set(read_members(client, paths, skip_corrupt=True)) != agents:
        return False
    if any(p.bootstrapping for p in plan.shards):
        return False
    statuses = read_statuses(client, paths)
    for agent in agents:
        want, got = plan.agents.get(agent), statuses.get(agent)
        if want is None or got is None or got.generation != want.generation:
            return False
        if set(got.shards) != set(want.replicas):
            return False
        if not all(st.in_sync for st in got.shards.values()):
            return False
    return True
