"""`shardkeeper plan`: what a drain, a removal, a new agent or a weight change would do,
computed by the leader's own code on what was read from the live cluster, writing nothing.

Pure (what was read in, a document out): the placement is ``coordinator.placement.place``
on the stored target with the changed members, exactly as the leader calls it (members
through ``coordinator.policy.placement_members``); the first make-before-break step is
``coordinator.reconcile.next_step`` with the cluster's throttle, which says which shards
would fall below R in-sync replicas on the way. Nothing here re-decides placement.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import zip_longest
from typing import Any

from coordinator import policy
from coordinator.decide import caught_up, failed_copies
from coordinator.placement import place
from coordinator.reconcile import Step, Throttle, next_step
from shardkeeper.config import ClusterConfig
from shardkeeper.layout import AgentStatus, Maintenance, MemberInfo
from shardkeeper.plan import PlanState, ShardPlan, Targets
from shardkeeper.summary import balance, down_since

# Moves and primary changes listed in the text output (--json lists them all).
SHOWN = 20


@dataclass(frozen=True)
class Change:
    """The hypothetical changes, all applied together."""

    drain: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    add: tuple[MemberInfo, ...] = ()  # id, zone and weight matter
    weight: tuple[tuple[str, float], ...] = ()

    def describe(self) -> list[str]:
        return ([f"drain {a}" for a in self.drain] + [f"remove {a}" for a in self.remove]
                + [f"add {m.id}" + (f" in zone {m.zone}" if m.zone else "")
                   + f" with weight {m.weight:g}" for m in self.add]
                + [f"weight {a}={w:g}" for a, w in self.weight])


def counts(rows: Targets) -> tuple[Counter[str], Counter[str]]:
    """(replicas, primaries) per agent in a target."""
    replicas: Counter[str] = Counter(a for row in rows for a in row)
    primaries: Counter[str] = Counter(row[0] for row in rows if row)
    return replicas, primaries


def diff(before: Targets, after: Targets) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(moves, primary changes) from one target to another. A move pairs a replica that
    leaves a shard with one that arrives (``from`` or ``to`` is None when the shard loses or
    gains a replica, e.g. at a shortfall)."""
    moves: list[dict[str, Any]] = []
    primaries: list[dict[str, Any]] = []
    for shard, (old, new) in enumerate(zip_longest(before, after, fillvalue=())):
        if old == new:
            continue
        gone = [a for a in old if a not in new]
        came = [a for a in new if a not in old]
        moves += [{"shard": shard, "from": a, "to": b} for a, b in zip_longest(gone, came)]
        if old[:1] != new[:1]:
            primaries.append({"shard": shard, "from": old[0] if old else None,
                              "to": new[0] if new else None})
    return moves, primaries


def weighted_balance(rows: Targets, members: Mapping[str, MemberInfo],
                     draining: Collection[str]) -> float:
    """`status`'s balance of a target: over the members that take replicas."""
    replicas, _ = counts(rows)
    eligible = sorted(a for a in members if a not in draining)
    return round(balance([replicas[a] for a in eligible],
                         [members[a].weight for a in eligible]), 4)


def apply(change: Change, members: Mapping[str, MemberInfo], draining: Collection[str]
          ) -> tuple[dict[str, MemberInfo], frozenset[str]]:
    """The members and draining agents once ``change`` is made."""
    after = {a: m for a, m in members.items() if a not in change.remove}
    after.update({m.id: m for m in change.add})
    for agent, weight in change.weight:
        if agent in after:
            after[agent] = replace(after[agent], weight=weight)
    return after, frozenset((set(draining) | set(change.drain)) - set(change.remove))


# Rounds of reconcile simulated to reach where the change settles (each round: copies
# start, finish and join, old replicas drop, primaries move); it takes about four.
MAX_ROUNDS = 20
UNTHROTTLED = Throttle(max_moves_per_agent=1 << 30, max_moves_total=1 << 30)


def converge(plan: PlanState, target: Targets, live: Collection[str],
             statuses: Mapping[str, AgentStatus], throttle: Throttle, replicas: int
             ) -> tuple[tuple[ShardPlan, ...], Step, set[int]]:
    """Where the cluster settles once it has moved toward ``target``, by the leader's own
    reconcile steps: the first with what agents report now and the cluster's throttle,
    then as if every copy finished at once. Returns (the settled plan, the first step, the
    shards below R in-sync replicas at some step). Make-before-break shows here: a drain
    keeps a replica no other agent can take, and only a removal loses replicas at once."""
    first = next_step(plan.shards, target, set(live), caught_up(plan, statuses), throttle,
                      min_in_sync=replicas, failed=failed_copies(plan, statuses))
    low = {s for s, p in enumerate(first.plan) if len(p.replicas) < replicas}
    current = first.plan
    rest = replace(UNTHROTTLED, paused=throttle.paused)
    for _ in range(MAX_ROUNDS):
        done = {(a, s) for s, p in enumerate(current) for a, _ in p.bootstrapping}
        step = next_step(current, target, set(live), done, rest, min_in_sync=replicas)
        low |= {s for s, p in enumerate(step.plan) if len(p.replicas) < replicas}
        if step.plan == current:
            break
        current = step.plan
    return current, first, low


def what_if(config: ClusterConfig, plan: PlanState, members: Mapping[str, MemberInfo],
            statuses: Mapping[str, AgentStatus], draining: Collection[str],
            maintenance: Maintenance | None, change: Change) -> dict[str, Any]:
    """The document `shardkeeper plan --json` prints (see docs/operations.md). Needs a
    plan (``plan.meta``)."""
    shards, replicas = config.shards, config.replicas
    after_members, after_draining = apply(change, members, draining)
    target = place(plan.targets, policy.placement_members(after_members, {}, (), after_draining),
                   shards, replicas)
    # What the leader's own next pass would change with no change at all (unfinished
    # balancing, agents gone within rebalance_delay): counted in the moves, and said.
    baseline = place(plan.targets, policy.placement_members(members, {}, (), draining),
                     shards, replicas)
    own_moves, _ = diff(plan.targets, baseline.replicas)
    throttle = Throttle(config.max_moves_per_agent, config.max_moves_total,
                        paused=maintenance is not None)
    settled, first, low = converge(plan, target.replicas, after_members, statuses, throttle,
                                   replicas)
    holders = tuple(p.holders for p in plan.shards)
    final = tuple(p.replicas for p in settled)
    moves, primary_changes = diff(holders, final)
    r_before, _ = counts(holders)
    _, p_before = counts(plan.routing)
    r_after, p_after = counts(final)
    rows = []
    for agent in sorted(set(members) | set(after_members) | set(r_before)):
        info = after_members.get(agent) or members.get(agent)
        if agent in change.remove:
            state = "removed"
        elif agent not in members and agent in after_members:
            state = "added"
        elif agent not in members:
            state = "down"
        elif agent in after_draining:
            state = "draining"
        else:
            state = "active"
        rows.append({
            "id": agent, "zone": info.zone if info else "",
            "weight": info.weight if info else None, "state": state,
            "replicas_before": r_before[agent], "replicas_after": r_after[agent],
            "primaries_before": p_before[agent], "primaries_after": p_after[agent],
        })
    notes = []
    gone = sorted(a for a in r_before if a not in members)
    if gone:
        waiting = [a for a in gone if a in down_since(plan)]
        notes.append(f"{', '.join(gone)} {'holds' if len(gone) == 1 else 'hold'} replicas but"
                     f" {'is' if len(gone) == 1 else 'are'} not a member now"
                     + (" (left within rebalance_delay)" if waiting else "")
                     + ": counted as gone")
    for row in rows:
        if row["state"] in ("draining", "removed") and row["replicas_after"]:
            kept = row["replicas_after"]
            notes.append(f"{row['id']} would keep {kept} replica{'s' * (kept != 1)}: no other"
                         f" eligible agent can take them (R={replicas}), so its drain would"
                         " not complete")
    if own_moves:
        notes.append(f"the leader's target differs from placement now by {len(own_moves)}"
                     " replicas without any change (balancing it has not finished, or agents"
                     " that left): included above")
    if maintenance is not None:
        notes.append(f"maintenance mode ({maintenance.reason}): no copy starts until"
                     " `shardkeeper resume`; only failover happens")
    return {
        "generation": plan.generation,
        "changes": change.describe(),
        "moves": moves,
        "primary_changes": primary_changes,
        "balance_before": weighted_balance(holders, members, draining),
        "balance_after": weighted_balance(final, after_members, after_draining),
        "shortfall_before": plan.meta.shortfall if plan.meta else 0,
        "shortfall": target.shortfall,
        "shards_at_risk": sorted(low),
        "unavailable": sorted(set(first.unavailable)),
        "first_step": {"copies": first.in_flight, "deferred": first.deferred},
        "members": rows,
        "notes": notes,
        "replicas": replicas,
        "throttle": [config.max_moves_per_agent, config.max_moves_total],
    }


def _listing(title: str, entries: Sequence[dict[str, Any]]) -> list[str]:
    if not entries:
        return []
    lines = [f"{title} (shard: from -> to)"]
    lines += [f"  {e['shard']:>6}: {e['from'] or '(none)'} -> {e['to'] or '(none)'}"
              for e in entries[:SHOWN]]
    if len(entries) > SHOWN:
        lines.append(f"  ... {len(entries) - SHOWN} more (--json lists them all)")
    return lines


def render(w: Mapping[str, Any]) -> str:
    """The text of `shardkeeper plan` and `drain --dry-run`."""
    r = w["replicas"]
    lines = [f"what if: {', '.join(w['changes']) or 'nothing changes'}"
             f"  (plan generation {w['generation']}; nothing is written)"]
    lines.append(f"moves: {len(w['moves'])} replica{'s' * (len(w['moves']) != 1)}, primary changes:"
                 f" {len(w['primary_changes'])}")
    lines.append(f"balance (max/mean replicas per unit of weight): {w['balance_before']:.3f}"
                 f" -> {w['balance_after']:.3f}")
    lines.append(f"shortfall: {w['shortfall_before']} -> {w['shortfall']}"
                 + (" (replicas no eligible agent can take)" if w["shortfall"] else ""))
    risk = w["shards_at_risk"]
    shown = ", ".join(map(str, risk[:SHOWN])) + (" ..." if len(risk) > SHOWN else "")
    lines.append(f"shards that would drop below R={r} in-sync replicas: "
                 + (f"{len(risk)} ({shown})" if risk else "none"))
    if w["unavailable"]:
        lines.append(f"shards left with no in-sync replica: {len(w['unavailable'])}")
    first = w["first_step"]
    if w["moves"]:
        lines.append(f"first step: {first['copies']} copies at once, {first['deferred']} wait"
                     f" for the throttle (max_moves_per_agent={w['throttle'][0]},"
                     f" max_moves_total={w['throttle'][1]})")
    lines += [f"note: {n}" for n in w["notes"]]
    header = ("MEMBER", "ZONE", "WEIGHT", "STATE", "REPLICAS", "AFTER", "PRIMARIES", "AFTER")
    table = [header] + [
        (m["id"], m["zone"] or "-", "-" if m["weight"] is None else f"{m['weight']:g}",
         m["state"], str(m["replicas_before"]), str(m["replicas_after"]),
         str(m["primaries_before"]), str(m["primaries_after"]))
        for m in w["members"]
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines += ["  ".join(c.ljust(n) for c, n in zip(row, widths, strict=True)).rstrip()
              for row in table]
    lines += _listing("moves", w["moves"])
    lines += _listing("primary changes", w["primary_changes"])
    return "\n".join(lines)
