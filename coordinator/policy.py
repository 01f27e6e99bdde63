"""The leader's policies, pure: departures and rebalance delay, the mass-departure guard,
drains, manual moves and the targets of leaving agents. The leader shell feeds them what
it read and writes what they decide; they take ``now`` as an argument and read no clock.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from coordinator.placement import Member
from shardkeeper.config import ClusterConfig
from shardkeeper.layout import Maintenance, MemberInfo, MoveRequest


def track_departures(
    departed_at: Mapping[str, float], before: Collection[str], live: Collection[str], now: float
) -> dict[str, float]:
    """Agents that left since ``before`` start their clock now; returning ones stop it."""
    out = {a: t for a, t in departed_at.items() if a not in live}
    for agent in before:
        if agent not in live and agent not in out:
            out[agent] = now
    return out


def delayed(departed_at: Mapping[str, float], delay: float, now: float) -> set[str]:
    """Departed agents whose replicas still wait out the rebalance delay."""
    return {a for a, t in departed_at.items() if now - t < delay}


def next_deadline(departed_at: Mapping[str, float], delay: float, now: float) -> float | None:
    """When the next delayed agent's replicas become due for re-replication."""
    due = [t + delay for t in departed_at.values() if t + delay > now]
    return min(due) if due else None


def placement_members(
    live: Mapping[str, MemberInfo],
    known: Mapping[str, MemberInfo],
    waiting: Collection[str],
    draining: Collection[str],
) -> list[Member]:
    """Members placement plans for: live ones, plus departed ones still inside the rebalance
    delay (so their replicas are not re-homed yet), draining ones flagged."""
    infos = dict(live)
    for agent in waiting:
        if agent not in infos and agent in known:
            infos[agent] = known[agent]
    return [
        Member(a, zone=i.zone, weight=i.weight, draining=a in draining)
        for a, i in sorted(infos.items())
    ]


def guard(
    current: Maintenance | None,
    live: Collection[str],
    departed_at: Mapping[str, float],
    config: ClusterConfig,
    now: float,
) -> Maintenance | None:
    """The mass-departure guard: the maintenance state the cluster should be in.

    Enters automatic maintenance when more than ``auto_maintenance_fraction`` of the
    members vanished within ``auto_maintenance_window``, so that a ZooKeeper hiccup or a
    rack outage does not reshuffle the whole cluster. Leaves automatic maintenance on
    its own once enough of those members are back. Manual maintenance is left alone.
    """
    fraction = config.auto_maintenance_fraction
    if current is not None and current.reason != "auto":
        return current
    if current is not None:
        missing = [a for a in current.missing if a not in live]
        if len(missing) <= fraction * (len(live) + len(missing)):
            return None
        return current
    if fraction <= 0:
        return None
    recent = sorted(a for a, t in departed_at.items() if now - t <= config.auto_maintenance_window)
    population = len(live) + len(recent)
    if population >= 2 and len(recent) > fraction * population:
        return Maintenance(
            reason="auto",
            since=now,
            note=f"{len(recent)} of {population} members vanished within"
            f" {config.auto_maintenance_window:g}s",
            missing=tuple(recent),
        )
    return None


@dataclass(frozen=True)
class MoveOutcome:
    name: str
    request: MoveRequest | None
    accepted: bool
    reason: str


def apply_moves(
    target: Sequence[tuple[str, ...]],
    requests: Sequence[tuple[str, MoveRequest | None]],
    live: Collection[str],
    draining: Collection[str],
) -> tuple[list[tuple[str, ...]], list[MoveOutcome]]:
    """Apply `shardkeeper move` requests to the target, in request order.

    A move replaces ``source`` by ``dest`` in the shard's target, in the same position (so
    a primary stays primary once the new replica is in sync); the reconciler then carries
    it out make-before-break. A request that cannot be honoured is refused with a reason.
    """
    out = list(target)
    outcomes = []
    for name, req in requests:
        reason = ""
        if req is None:
            reason = "unreadable request"
        elif not 0 <= req.shard < len(out):
            reason = f"no shard {req.shard} (shards are 0..{len(out) - 1})"
        elif req.source not in out[req.shard]:
            reason = f"{req.source} holds no replica of shard {req.shard}"
        elif req.dest not in live:
            reason = f"{req.dest} is not a live member"
        elif req.dest in draining:
            reason = f"{req.dest} is draining"
        elif req.dest in out[req.shard]:
            reason = f"{req.dest} already holds shard {req.shard}"
        if reason:
            outcomes.append(MoveOutcome(name, req, False, reason))
            continue
        out[req.shard] = tuple(req.dest if a == req.source else a for a in out[req.shard])
        outcomes.append(MoveOutcome(name, req, True, ""))
    return out, outcomes


def hold_moves(
    target: Sequence[tuple[str, ...]],
    pins: Sequence[MoveRequest],
    live: Collection[str],
    draining: Collection[str],
) -> tuple[list[tuple[str, ...]], list[MoveRequest]]:
    """Keep carried-out moves in place against later leveling.

    Placement levels load, and may pick the very replica an operator moved to move back.
    A pin keeps ``dest`` in, and ``source`` out of, the shard's target while both still
    make sense; it lapses when ``dest`` leaves or drains, or the shard no longer fits it.
    """
    out = list(target)
    kept = []
    for pin in pins:
        if pin.shard >= len(out) or pin.dest not in live or pin.dest in draining:
            continue
        row = out[pin.shard]
        if pin.dest in row and pin.source not in row:
            kept.append(pin)
        elif pin.source in row and pin.dest not in row:
            out[pin.shard] = tuple(pin.dest if a == pin.source else a for a in row)
            kept.append(pin)
    return out, kept


def hand_off_targets(
    target: Sequence[tuple[str, ...]],
    in_sync: Sequence[Sequence[str]],
    leaving: Collection[str],
) -> list[tuple[str, ...]]:
    """Targets in which no leaving agent is the primary, where another member can be.

    A leaving agent (shutting down, see ``MemberInfo.leaving``) keeps its place in the
    target as a replica: it comes back with its data. Its primaries go to the first other
    target member that is in sync now (``in_sync``: shard -> the plan's in-sync replicas),
    else to the first other target member. Without this, placement's sticky target would
    keep naming it, and the reconciler would promote it back as soon as it could.
    """
    if not leaving:
        return list(target)
    out = list(target)
    for s, row in enumerate(out):
        if not row or row[0] not in leaving:
            continue
        now = set(in_sync[s]) if s < len(in_sync) else set()
        others = [i for i, a in enumerate(row) if a not in leaving]
        if not others:
            continue
        pick = next((i for i in others if row[i] in now), others[0])
        swapped = list(row)
        swapped[0], swapped[pick] = swapped[pick], swapped[0]
        out[s] = tuple(swapped)
    return out
