"""The cluster summary shown by `shardkeeper status` and `watch`, and what the cluster is
still doing and why. ``summarize`` is pure (built from data already read, no clock);
``read_summary`` reads that data from ZooKeeper, for the CLI and a coordinator's
GET /api/status alike, so that the two cannot drift apart.

``summarize`` builds the status document. ``pending`` says, in words an operator can act
on, why the cluster is not yet fully replicated and settled; ``stable`` is true when
there is nothing to say. ``drain_pending``, ``undrain_pending``, ``move_pending`` and
``rebalance_pending`` do the same for one admin request, for the `--wait` of each command.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

from kazoo.client import KazooClient

from shardkeeper import admin, cluster
from shardkeeper.layout import AgentStatus, Maintenance, MemberInfo, Paths
from shardkeeper.plan import PlanState, assignments

# Failed copies listed one by one in the summary (the count is always complete).
FAILED_SHOWN = 20


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


def balance(counts: list[int], weights: list[float] | None = None) -> float:
    """max/mean replicas per unit of weight (per member when weights are equal); 1.0 is
    perfect, 0.0 when nothing is placed."""
    if not counts or sum(counts) == 0:
        return 0.0
    weights = weights or [1.0] * len(counts)
    mean = sum(counts) / sum(weights)
    return max(c / w for c, w in zip(counts, weights, strict=True)) / mean


def in_place(plan: PlanState, members: Mapping[str, MemberInfo],
             statuses: Mapping[str, AgentStatus]) -> tuple[int, int]:
    """(target replicas held in sync by their target agent, target replicas): the progress
    of the cluster toward the placement it is moving to. A new replica counts once its
    copy has finished and caught up; a departed agent's replicas count as missing."""
    done = total = 0
    for shard, target in enumerate(plan.targets):
        total += len(target)
        for agent in target:
            status = statuses.get(agent) if agent in members else None
            st = status.shards.get(shard) if status else None
            if st is not None and st.in_sync:
                done += 1
    return done, total


def _meta(plan: PlanState, key: str, default: Any) -> Any:
    value = plan.meta.summary.get(key, default) if plan.meta else default
    return value if isinstance(value, type(default)) else default


def down_since(plan: PlanState) -> dict[str, float]:
    """Departed agents -> when they left, as the leader records them in plan/meta."""
    raw = _meta(plan, "down", {})
    return {a: float(t) for a, t in raw.items()
            if isinstance(a, str) and isinstance(t, int | float) and not isinstance(t, bool)}


def live_members(plan: PlanState, members: Mapping[str, MemberInfo]
                 ) -> dict[str, MemberInfo]:
    """The members that are up. The leader plans a member as down as soon as its process
    is known dead (a closed liveness link), before its session and so its member znode
    expire: such a member is down here too."""
    down = down_since(plan)
    planned = set(plan.meta.members) if plan.meta else set()
    return {a: m for a, m in members.items() if not (a in down and a not in planned)}


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
    throttle: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The status document. ``throttle`` is (max_moves_per_agent, max_moves_total), named
    in the reasons `pending` gives when copies wait for it."""
    held = assignments(plan.shards)
    down = down_since(plan)
    planned = set(plan.meta.members) if plan.meta else set()
    live = live_members(plan, members)
    # An agent the plan still places but that has no member znode is down too, even when
    # the leader has not recorded it yet (no leader, or the pass is still to come).
    gone = {a for a in held if a not in live} | {a for a in down if a not in live}
    rows = []
    for agent in sorted(set(live) | gone):
        info = members.get(agent)
        mine = held.get(agent, {})
        status = statuses.get(agent) if agent in live else None
        if agent not in live:
            state = "down"
        elif agent in draining:
            state = "drained" if not mine else "draining"
        else:
            state = "active"
        rows.append(
            {
                "id": agent,
                "address": info.address if info else "",
                "zone": info.zone if info else "",
                "weight": info.weight if info else None,
                "replicas": len(mine),
                "primaries": sum(1 for a in mine.values() if a.role == "primary"),
                "copying": sum(1 for a in mine.values() if a.source is not None),
                "state": state,
                "down_since": down.get(agent) if agent not in live else None,
                "applied_generation": status.generation if status else None,
                "held": len(status.shards) if status else 0,
                "catching_up": sum(st.catching_up for st in status.shards.values())
                if status else 0,
                # Replicas this agent keeps only because no other eligible agent can
                # take them (the target is short of R): why a drain does not finish.
                "kept": sum(1 for s in mine if s < len(plan.targets)
                            and agent not in plan.targets[s]
                            and len(plan.targets[s]) < replicas),
            }
        )
    failed = sorted((s, agent, st.reason) for agent, status in statuses.items()
                    if agent in live for s, st in status.shards.items()
                    if st.state == "ERROR")
    done, total = in_place(plan, live, statuses)
    lagging = sorted(
        a for a, status in statuses.items()
        if a in live and a in plan.agents
        and status.generation < plan.agents[a].generation)
    live_rows = [r for r in rows if r["state"] == "active" and r["weight"]]
    return {
        "cluster": cluster,
        "leader": leader,
        "epoch": epoch,
        "generation": plan.generation,
        "shards": shards,
        "replicas": replicas,
        "members": rows,
        "under_replicated": under_replicated(plan.routing, replicas, live, statuses)
        if plan.routing
        else shards,
        "shortfall": plan.meta.shortfall if plan.meta else 0,
        "moves": {
            "in_flight": sum(len(p.bootstrapping) for p in plan.shards),
            "deferred": int(_meta(plan, "deferred", 0)),
        },
        "unavailable": int(_meta(plan, "unavailable", 0)),
        "maintenance": dataclasses.asdict(maintenance) if maintenance else None,
        "draining": sorted(draining),
        # Over the members that take replicas, per unit of weight.
        "balance": round(balance([r["replicas"] for r in live_rows],
                                 [r["weight"] for r in live_rows]), 4),
        "progress": {"in_place": done, "target": total},
        "catching_up": sum(r["catching_up"] for r in rows),
        "failed_copies": {
            "count": len(failed),
            "first": [{"shard": s, "agent": a, "reason": why}
                      for s, a, why in failed[:FAILED_SHOWN]],
        },
        "lagging": lagging,
        "unplanned": {"joined": sorted(set(live) - planned) if plan.meta else [],
                      "left": sorted(planned - set(live))},
        "leader_view": {
            "draining": sorted(a for a in _meta(plan, "draining", []) if isinstance(a, str)),
            "waiting": sorted(a for a in _meta(plan, "waiting", []) if isinstance(a, str)),
            "maintenance": _meta(plan, "maintenance", "") or None,
        },
        "throttle": list(throttle) if throttle else None,
    }


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def pending(s: Mapping[str, Any]) -> list[str]:
    """Why the cluster is not fully replicated and settled, most fundamental first;
    empty when it is (every shard in sync R times, nothing copying or waiting)."""
    out: list[str] = []
    if not s["generation"]:
        out.append("no plan yet: " + ("the leader has not planned (are agents running?)"
                                      if s["leader"] else "no coordinator is running"))
        return out
    no_leader = "" if s["leader"] else " (no coordinator is running to plan for it)"
    joined, left = s["unplanned"]["joined"], s["unplanned"]["left"]
    if joined:
        out.append(f"{', '.join(joined)} joined and {'is' if len(joined) == 1 else 'are'}"
                   f" not in the plan yet{no_leader}")
    if left:
        out.append(f"{', '.join(left)} left and {'is' if len(left) == 1 else 'are'}"
                   f" still in the plan{no_leader}")
    if s["unavailable"]:
        out.append(f"{_n(s['unavailable'], 'shard')} have no live in-sync replica: they wait"
                   " for an agent that held them to come back")
    if s["shortfall"]:
        eligible = sum(1 for m in s["members"] if m["state"] == "active")
        out.append(f"shortfall {s['shortfall']}: R={s['replicas']} but only"
                   f" {_n(eligible, 'member')} can take replicas (not draining)")
    m = s["maintenance"]
    if m and (s["moves"]["deferred"] or s["under_replicated"]):
        out.append(f"maintenance mode ({m['reason']}): no moves until `shardkeeper resume`"
                   + (f" or {', '.join(m['missing'])} return" if m.get("missing") else ""))
    waiting = s["leader_view"]["waiting"]
    if waiting:
        whose = ("its replicas wait for it" if len(waiting) == 1
                 else "their replicas wait for them")
        out.append(f"{', '.join(waiting)} left within rebalance_delay: {whose} to return"
                   " (`shardkeeper rebalance` skips the wait)")
    if s["under_replicated"]:
        out.append(f"{_n(s['under_replicated'], 'shard')} under-replicated (fewer than"
                   f" {s['replicas']} in-sync replicas)")
    moves = s["moves"]
    if moves["in_flight"]:
        done, total = s["progress"]["in_place"], s["progress"]["target"]
        out.append(f"{_n(moves['in_flight'], 'copy', 'copies')} in flight"
                   f" ({done}/{total} replicas in place)")
    if moves["deferred"] and not m:
        limits = (f" (max_moves_per_agent={s['throttle'][0]},"
                  f" max_moves_total={s['throttle'][1]})" if s.get("throttle") else "")
        out.append(f"{_n(moves['deferred'], 'copy', 'copies')} waiting for the throttle"
                   f"{limits}")
    if s["catching_up"]:
        out.append(f"{_n(s['catching_up'], 'replica')} catching up (fetching writes"
                   " missed)")
    failed = s["failed_copies"]
    if failed["count"]:
        first = failed["first"][0]
        out.append(f"{_n(failed['count'], 'copy', 'copies')} failed, e.g. shard"
                   f" {first['shard']} on {first['agent']}: {first['reason'] or 'no reason'}"
                   " (the leader retries from another source)")
    if s["lagging"]:
        out.append(f"{', '.join(s['lagging'][:5])}{' ...' if len(s['lagging']) > 5 else ''}"
                   " not yet applied their latest plan (busy, or stopped?)")
    for row in s["members"]:
        if row["kept"]:
            out.append(f"{row['id']} keeps {_n(row['kept'], 'replica')}:"
                       f" {_n(row['kept'], 'shard has', 'shards have')} no other eligible"
                       f" agent to move to (R={s['replicas']})")
    progress = s["progress"]
    if not out and progress["in_place"] < progress["target"]:
        out.append(f"{progress['in_place']}/{progress['target']} replicas in place")
    return out


def stable(s: Mapping[str, Any]) -> bool:
    """Fully replicated (every shard in sync R times), nothing copying, waiting or
    catching up, and the plan made for the current members."""
    return not pending(s)


def _row(s: Mapping[str, Any], agent: str) -> Mapping[str, Any] | None:
    return next((m for m in s["members"] if m["id"] == agent), None)


def drain_pending(s: Mapping[str, Any], agent: str) -> list[str]:
    """Why ``agent`` is not drained yet; empty once the leader holds the drain and the
    agent holds no replica in the plan nor on disk (its status), or it is down."""
    row = _row(s, agent)
    if agent not in s["leader_view"]["draining"]:
        why = "" if s["leader"] else ": no coordinator is running"
        return [f"the leader has not taken up the drain of {agent} yet{why}"]
    if row is None or (not row["replicas"] and (row["state"] == "down" or not row["held"])):
        return []
    out = [f"{agent} still holds {_n(row['replicas'] or row['held'], 'replica')}"]
    eligible = sum(1 for m in s["members"] if m["state"] == "active")
    if row["kept"]:
        out.append(f"{_n(row['kept'], 'shard has', 'shards have')} no other eligible agent"
                   f" to move to (R={s['replicas']}, {_n(eligible, 'member')} not draining)")
    out += [r for r in pending(s) if not r.startswith(f"{agent} keeps ")]
    return out


def undrain_pending(s: Mapping[str, Any], agent: str) -> list[str]:
    """Why an undrain has not finished: the leader still treats ``agent`` as draining, or
    the replicas it gets back are still being copied."""
    if agent in s["leader_view"]["draining"]:
        why = "" if s["leader"] else ": no coordinator is running"
        return [f"the leader still treats {agent} as draining{why}"]
    progress = s["progress"]
    moving = s["moves"]["in_flight"] or s["moves"]["deferred"] or s["catching_up"]
    if moving or progress["in_place"] < progress["target"]:
        return pending(s)
    return []


def move_pending(s: Mapping[str, Any], shard: int, source: str, dest: str,
                 row: tuple[tuple[str, ...], tuple[str, ...]]) -> list[str]:
    """Why the move of ``shard`` from ``source`` to ``dest`` has not finished; ``row`` is
    the shard's (in-sync replicas, agents copying) in the current plan."""
    in_sync, copying = row
    if dest in in_sync and source not in in_sync and source not in copying:
        return []
    if dest in copying:
        return [f"{dest} is copying shard {shard}"]
    if dest in in_sync:
        return [f"{dest} holds shard {shard}; {source} still to drop it"]
    out = [f"{dest} has not started copying shard {shard}"]
    return out + [r for r in pending(s) if "throttle" in r or "maintenance" in r]


def rebalance_pending(s: Mapping[str, Any]) -> list[str]:
    return pending(s)


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
        throttle=(config.max_moves_per_agent, config.max_moves_total),
    )
