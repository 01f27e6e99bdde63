"""The cluster summary shown by `shardkeeper status` and served by a coordinator's
GET /api/status: ``summarize`` is pure (built from data already read), ``read_summary``
reads that data from ZooKeeper."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

from kazoo.client import KazooClient

from shardkeeper import admin, cluster
from shardkeeper.layout import AgentStatus, Maintenance, MemberInfo, Paths
from shardkeeper.plan import PlanState, assignments


def under_replicated(
    routing: tuple[tuple[str, ...], ...],
    replicas: int,
    members: Mapping[str, MemberInfo],
    statuses: Mapping[str, AgentStatus],
) -> int:
    """Shards held in sync (as reported in status) by fewer than R live members."""
    holders = [0] * len(routing)
    for agent, status in statuses.items():
        if agent not in members:
            continue
        for shard, st in status.shards.items():
            if shard < len(holders) and st.in_sync:
                holders[shard] += 1
    return sum(1 for n in holders if n < replicas)


def balance(counts: list[int]) -> float:
    """max/mean replicas per member; 1.0 is perfect, 0.0 when nothing is placed."""
    if not counts or sum(counts) == 0:
        return 0.0
    return max(counts) / (sum(counts) / len(counts))


def summarize(
    *,
    cluster: str,
    leader: str | None,
    epoch: int,
    shards: int,
    replicas: int,
    plan: PlanState,
    members: Mapping[str, MemberInfo],
    statuses: Mapping[str, AgentStatus],
    maintenance: Maintenance | None = None,
    draining: Collection[str] = (),
) -> dict[str, Any]:
    held = assignments(plan.shards)
    rows = []
    for agent in sorted(members):
        info = members[agent]
        mine = held.get(agent, {})
        status = statuses.get(agent)
        rows.append(
            {
                "id": agent,
                "address": info.address,
                "zone": info.zone,
                "weight": info.weight,
                "replicas": len(mine),
                "primaries": sum(1 for a in mine.values() if a.role == "primary"),
                "copying": sum(1 for a in mine.values() if a.source is not None),
                "state": ("drained" if not mine else "draining") if agent in draining
                else "active",
                "applied_generation": status.generation if status else None,
                "held": len(status.shards) if status else 0,
                "catching_up": sum(st.catching_up for st in status.shards.values())
                if status else 0,
            }
        )
    return {
        "cluster": cluster,
        "leader": leader,
        "epoch": epoch,
        "generation": plan.generation,
        "shards": shards,
        "replicas": replicas,
        "members": rows,
        "under_replicated": under_replicated(plan.routing, replicas, members, statuses)
        if plan.routing
        else shards,
        "shortfall": plan.meta.shortfall if plan.meta else 0,
        "moves": {
            "in_flight": sum(len(p.bootstrapping) for p in plan.shards),
            "deferred": int(plan.meta.summary.get("deferred", 0)) if plan.meta else 0,
        },
        "unavailable": int(plan.meta.summary.get("unavailable", 0)) if plan.meta else 0,
        "maintenance": dataclasses.asdict(maintenance) if maintenance else None,
        "draining": sorted(draining),
        "balance": round(balance([r["replicas"] for r in rows]), 4),
    }


def read_summary(client: KazooClient, paths: Paths) -> dict[str, Any]:
    """The `status --json` document, read with ``client``. The CLI and the coordinator's
    /api/status both call this, so that the two cannot drift apart."""
    config = cluster.read_config(client, paths)
    _, epoch = cluster.read_leader(client, paths)
    return summarize(
        cluster=paths.cluster,
        leader=cluster.current_leader(client, paths),
        epoch=epoch,
        shards=config.shards,
        replicas=config.replicas,
        plan=cluster.read_plan(client, paths, complete=True),
        members=cluster.read_members(client, paths, skip_corrupt=True),
        statuses=cluster.read_statuses(client, paths),
        maintenance=admin.maintenance(client, paths),
        draining=admin.draining(client, paths),
    )
