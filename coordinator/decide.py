"""One leader pass, pure: from what the leader read to the znode writes and audit events.

The leader shell (``coordinator.leader``) reads members, statuses, config and admin
requests, calls :func:`decide`, commits the writes it returns in fenced multis, and keeps
the returned :class:`Memory` only once the commit succeeded. Everything that is policy
lives here or in the modules it calls (placement, ``policy``, ``reconcile``, ``writes``):
the settle gate of a new cluster, departures and the rebalance delay, the mass-departure
guard, drains, manual moves, the make-before-break step, terms, and the wording and
de-duplication of audit events. No ZooKeeper, no clock: ``now`` comes in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace

from coordinator import policy
from coordinator.placement import place
from coordinator.reconcile import Step, Throttle, next_step, with_terms
from coordinator.writes import Write, plan_writes
from shardkeeper.config import ClusterConfig
from shardkeeper.layout import (
    AgentStatus,
    AuditEvent,
    Maintenance,
    MemberInfo,
    MoveRequest,
    Paths,
    encode_events,
)
from shardkeeper.plan import PlanState
from shardkeeper.vocab import Role

# How long `status` shows a departed member as down (longer while it still holds
# replicas, e.g. inside the rebalance delay).
DOWN_VISIBLE = 3600.0
# A new cluster's first plan waits until membership has been still this long, so that
# agents starting together are placed together instead of all shards landing on the
# first one and then moving (Kafka's group.initial.rebalance.delay plays the same role).
INITIAL_SETTLE = 1.0


@dataclass(frozen=True)
class Inputs:
    """What the leader read for one pass."""

    now: float
    config: ClusterConfig | None  # None: missing or unreadable (``config_error`` says why)
    members: Mapping[str, MemberInfo]
    statuses: Mapping[str, AgentStatus]
    maintenance: Maintenance | None = None
    draining: frozenset[str] = frozenset()
    moves: tuple[tuple[str, MoveRequest | None], ...] = ()  # (znode name, request)
    rebalance: bool = False  # `shardkeeper rebalance` since the last pass
    config_error: str = ""
    # Members whose process is known dead (its link closed, its port refuses) though
    # its session has not expired yet: planned as departed now.
    dead: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Memory:
    """What a leader remembers from pass to pass within one term."""

    plan: PlanState = field(default_factory=PlanState)
    known: Mapping[str, MemberInfo] = field(default_factory=dict)  # every member seen
    live_before: frozenset[str] = frozenset()  # members at the last pass
    departed_at: Mapping[str, float] = field(default_factory=dict)
    pins: tuple[MoveRequest, ...] = ()  # moves carried out this term, kept in place
    drained_reported: frozenset[str] = frozenset()
    unavailable_reported: tuple[int, ...] = ()
    seen: frozenset[str] = frozenset()  # membership, for the settle gate of a new cluster
    membership_changed: float = 0.0
    config: ClusterConfig | None = None  # the last config accepted
    config_refused: str = ""  # why the current config znode is not used (reported once)
    notes: tuple[str, ...] = ()  # repairs made while reading, for the next audit
    announce: str = ""  # "leader X leads with epoch N", audited on the term's first pass
    down: Mapping[str, float] = field(default_factory=dict)  # departed member -> since
    leaving: frozenset[str] = frozenset()  # leaving members already audited

    @classmethod
    def at_start(cls, plan: PlanState, notes: tuple[str, ...] = (), announce: str = ""
                 ) -> Memory:
        """A new term: members of the last plan that are gone now left during the
        failover, so their clocks (rebalance delay, mass-departure guard) start now; the
        down members the last plan recorded stay down since when they left."""
        live = frozenset(plan.meta.members) if plan.meta else frozenset()
        down = plan.meta.summary.get("down") if plan.meta else None
        kept = {a: float(t) for a, t in down.items()
                if isinstance(a, str) and isinstance(t, int | float)} if isinstance(
                    down, dict) else {}
        return cls(plan=plan, live_before=live, notes=notes, announce=announce, down=kept)


@dataclass(frozen=True)
class Outcome:
    memory: Memory  # adopt only once ``writes`` are committed
    writes: tuple[Write, ...] = ()  # in commit order: plan znodes, bookkeeping, meta last
    audit: tuple[AuditEvent, ...] = ()
    deadline: float | None = None  # when to run again even if nothing changes
    plan_written: bool = False
    balanced: bool = True  # False: placement ran out of time and balance is unfinished

    @property
    def generation(self) -> int:
        return self.memory.plan.generation


class _Audit:
    def __init__(self, now: float):
        self.now = now
        self.events: list[AuditEvent] = []

    def add(self, kind: str, message: str, generation: int) -> None:
        self.events.append(AuditEvent(self.now, kind, message, generation))


def decide(memory: Memory, inputs: Inputs, *, paths: Paths, leader: str, epoch: int,
           should_stop: Callable[[], bool] | None = None) -> Outcome:
    """The next plan step and everything a pass writes besides it.

    ``should_stop`` is placement's deadline (the shell's clock, asked between steps): past
    it, placement returns a valid plan with failover and re-replication done and balance
    left for the next pass (``Outcome.balanced`` False, and a pass is due at once)."""
    now = inputs.now
    config, refusal = accept_config(memory, inputs)
    if config is None:
        return Outcome(replace(memory, config_refused=refusal))
    members = live_members(inputs.members, inputs.statuses, memory.known, inputs.dead)
    live = frozenset(members)
    # Members shutting down gracefully (SIGTERM): their primaries are handed off first.
    leaving = frozenset(a for a, info in members.items() if info.leaving)
    if live != memory.seen:
        memory = replace(memory, seen=live, membership_changed=now)
    if memory.plan.meta is None and (
        not live or now - memory.membership_changed < INITIAL_SETTLE
    ):
        deadline = memory.membership_changed + INITIAL_SETTLE if live else None
        return Outcome(memory, deadline=deadline)
    gen = memory.plan.generation + 1
    audit = _Audit(now)
    writes: list[Write] = []
    known = {**memory.known, **inputs.members}
    if memory.announce:
        audit.add("leader-elected", memory.announce, gen)
    for note in memory.notes:
        audit.add("plan-repaired", note, gen)
    if refusal and refusal != memory.config_refused:
        audit.add("config-refused", refusal, gen)

    for agent in sorted(live - memory.live_before):
        audit.add("member-joined", f"{agent} joined", gen)
    for agent in sorted(memory.live_before - live):
        why = " (its process died)" if agent in inputs.dead else ""
        audit.add("member-left", f"{agent} left{why}", gen)
    departed_at = policy.track_departures(memory.departed_at, memory.live_before, live, now)
    if inputs.rebalance:
        departed_at = {}
        audit.add("rebalance", "rebalance requested: delay skipped", gen)

    maintenance = steer_maintenance(inputs, config, live, departed_at, paths, writes, audit,
                                    gen)
    draining = inputs.draining
    waiting = policy.delayed(departed_at, config.rebalance_delay, now)
    previous = memory.plan.targets if memory.plan.meta else None
    placement = place(
        previous,
        policy.placement_members(members, known, waiting, draining),
        config.shards,
        config.replicas,
        should_stop=should_stop,
    )
    target, pins = policy.hold_moves(placement.replicas, memory.pins, live, draining)
    target, outcomes = policy.apply_moves(target, inputs.moves, live, draining)
    target = policy.hand_off_targets(target, [p.replicas for p in memory.plan.shards], leaving)
    pins += [o.request for o in outcomes if o.accepted]
    for o in outcomes:
        writes.append(Write("delete", f"{paths.moves}/{o.name}"))
        if o.accepted:
            audit.add("move-accepted", f"move shard {o.request.shard} from {o.request.source}"
                      f" to {o.request.dest}", gen)
        else:
            audit.add("move-refused", f"{o.name} refused: {o.reason}", gen)

    failed = failed_copies(memory.plan, inputs.statuses)
    caught = caught_up(memory.plan, inputs.statuses)
    step = next_step(
        memory.plan.shards,
        target,
        live,
        caught,
        Throttle(config.max_moves_per_agent, config.max_moves_total,
                 paused=maintenance is not None),
        min_in_sync=config.replicas,
        failed=failed,
        leaving=leaving,
        fenced=fenced_successors(memory.plan, inputs.statuses),
        settled=caught,  # a primary is caught up once its promotion finished
    )
    for shard, agent, source, other in step.retried:
        why = failed.get((agent, shard)) or "no reason given"
        then = f"copying from {other} instead" if other else "issuing it afresh"
        audit.add("copy-failed", f"{agent}'s copy of shard {shard} from {source} failed"
                  f" ({why}): {then}", gen)
    down = track_down(memory.down, memory.live_before, live, now,
                      holds=lambda a: any(a in p.holders for p in memory.plan.shards))
    # The acknowledgement a leaving agent waits for: the primaries it must keep (no other
    # in-sync replica to take them), so that it leaves as soon as nothing more can move.
    kept = {a: sum(1 for p in step.plan if p.primary == a) for a in sorted(leaving)}
    summary = {
        "down": {a: round(t, 3) for a, t in sorted(down.items())},
        "in_flight": step.in_flight,
        "deferred": step.deferred,
        "unavailable": len(step.unavailable),
        "maintenance": maintenance.reason if maintenance else None,
        "draining": sorted(draining),
        "waiting": sorted(waiting),
    }
    if kept:
        summary["leaving"] = kept
    acked = memory.plan.meta.leaving() if memory.plan.meta else {}
    plan_changes, state = plan_writes(
        paths, memory.plan, with_terms(memory.plan.shards, step.plan, gen),
        tuple(target), live,
        epoch=epoch, leader=leader, replicas=config.replicas,
        shortfall=placement.shortfall, now=now, summary=summary,
        force=kept != acked,  # a leaving agent waits for this answer even if nothing moves
    )
    unavailable_reported = memory.unavailable_reported
    if plan_changes:
        describe_step(step, state.generation, audit)
        if step.unavailable and step.unavailable != unavailable_reported:
            audit.add("shards-unavailable",
                      f"{len(step.unavailable)} shards have no live in-sync replica",
                      state.generation)
            unavailable_reported = step.unavailable
    for agent in sorted(leaving - memory.leaving):
        audit.add("member-leaving", f"{agent} is leaving: its primaries go to in-sync"
                  f" replicas ({kept[agent]} kept, with no other in-sync replica)", gen)
    drained = drains_done(state, draining, memory.drained_reported)
    for agent in sorted(drained - memory.drained_reported):
        audit.add("drain-done", f"{agent} is drained", gen)
    if audit.events:
        writes.append(Write("append", paths.event_prefix, encode_events(audit.events)))
    new_memory = Memory(
        plan=state, known=known, live_before=live, departed_at=departed_at, pins=tuple(pins),
        drained_reported=drained, unavailable_reported=unavailable_reported,
        seen=memory.seen, membership_changed=memory.membership_changed,
        config=config, config_refused=refusal, down=down, leaving=leaving,
    )
    deadline = policy.next_deadline(departed_at, config.rebalance_delay, now)
    if not placement.complete:
        deadline = now  # balance is unfinished: the next pass continues it
    if not plan_changes and not writes:
        return Outcome(new_memory, deadline=deadline, balanced=placement.complete)
    # Plan znodes first and plan/meta last (the commit point), then the audit trail.
    ordered = plan_changes[:-1] + writes + plan_changes[-1:]
    return Outcome(new_memory, tuple(ordered), tuple(audit.events), deadline,
                   plan_written=bool(plan_changes), balanced=placement.complete)


def track_down(down: Mapping[str, float], before: frozenset[str], live: frozenset[str],
               now: float, holds: Callable[[str], bool]) -> dict[str, float]:
    """Departed members -> since when, for `status`: kept for DOWN_VISIBLE after they
    left, or as long as they still hold replicas (``holds``, asked only past that); a
    returning member is up again."""
    out = {a: t for a, t in down.items()
           if a not in live and (now - t < DOWN_VISIBLE or holds(a))}
    for agent in before - live:
        out.setdefault(agent, now)
    return out


def accept_config(memory: Memory, inputs: Inputs) -> tuple[ClusterConfig | None, str]:
    """(the config to plan with, why the config znode was refused: "" if it was not).

    The shard count never changes under a placed cluster: every key would map to another
    shard, and the shards past the new count would be dropped with their data. Such a
    config, or one that cannot be read, is refused and the last accepted one kept (or,
    in a new term, the stored plan's shard and replica counts)."""
    meta = memory.plan.meta
    new = inputs.config
    if new is not None and (meta is None or new.shards == meta.shards):
        return new, ""
    if new is None:
        reason = f"config unusable ({inputs.config_error or 'missing'}): planning with the"
    else:
        reason = (f"config asks for {new.shards} shards but the cluster holds"
                  f" {meta.shards}: the shard count cannot change under live data; planning"
                  " with")
    if memory.config is not None:
        return memory.config, f"{reason} the last config accepted"
    if meta is None:
        return None, reason.split(":")[0]
    base = new or ClusterConfig(shards=meta.shards, replicas=meta.replicas)
    return (replace(base, shards=meta.shards, replicas=base.replicas if new else meta.replicas),
            f"{reason} the stored plan's {meta.shards} shards")


def still_dead(dead: set[tuple[str, float]], members: Mapping[str, MemberInfo],
               statuses: Mapping[str, AgentStatus]) -> tuple[set[tuple[str, float]],
                                                              frozenset[str]]:
    """The (agent, started) incarnations known dead whose session still shows, and those
    agents: for ``Inputs.dead``.

    A dead incarnation is forgotten once its session expired, when both its ephemeral
    znodes are gone, or once a new incarnation registered. ZooKeeper deletes an expired
    session's znodes one by one: between its member and its status znode going, the
    agent must stay dead, else ``live_members`` (a status without a member znode is a
    live agent re-registering) brought it back for a pass, and the placement moved a
    second round of replicas to it and away again (one kill in a few moved ~9 % of the
    replicas instead of 5 %, doubling re-replication)."""
    kept = {(a, t) for a, t in dead
            if (members[a].started == t if a in members else a in statuses)}
    return kept, frozenset(a for a, _ in kept)


def live_members(members: Mapping[str, MemberInfo], statuses: Mapping[str, AgentStatus],
                 known: Mapping[str, MemberInfo], dead: frozenset[str] = frozenset()
                 ) -> dict[str, MemberInfo]:
    """Members by their member znode, plus agents whose member znode is gone (deleted or
    damaged) while their status znode, ephemeral to the same session, is still there: the
    session is alive, so the agent is, and it will register again by itself."""
    out = dict(members)
    for agent in statuses:
        if agent not in out and agent in known:
            out[agent] = known[agent]
    for agent in dead:
        out.pop(agent, None)
    return out


def steer_maintenance(
    inputs: Inputs, config: ClusterConfig, live: frozenset[str],
    departed_at: Mapping[str, float], paths: Paths, writes: list[Write], audit: _Audit,
    gen: int,
) -> Maintenance | None:
    """Enter or leave automatic maintenance as the mass-departure guard says."""
    current = inputs.maintenance
    wanted = policy.guard(current, live, departed_at, config, inputs.now)
    if wanted == current:
        return current
    if wanted is None:
        writes.append(Write("delete", paths.maintenance))
        audit.add("maintenance-left", "members returned: moves resume", gen)
    else:
        writes.append(Write("create", paths.maintenance, wanted.encode()))
        audit.add("maintenance-entered", wanted.note, gen)
    return wanted


class CaughtUp:
    """(agent, shard) pairs reported in sync by an agent that applied a plan at least as
    new as its assignment for that shard (``PlanState.assigned_at``): a later change to
    its other shards does not make the report stale. Requiring its latest plan instead
    held joins back while re-replication rewrote every agent's plan at each step.

    A view, answered one pair at a time from the reports: a pass asks only about the
    copies in flight, and building the set of every replica in the cluster was a fifth
    of a leader pass while copies ran (4,096 shards at R=3). Iterating it lists them all.
    """

    __slots__ = ("plan", "statuses")

    def __init__(self, plan: PlanState, statuses: Mapping[str, AgentStatus]):
        self.plan, self.statuses = plan, statuses

    def __contains__(self, pair: object) -> bool:
        agent, shard = pair  # type: ignore[misc]
        mine = self.plan.agents.get(agent)
        status = self.statuses.get(agent)
        if mine is None or status is None or shard not in mine.replicas:
            return False
        reported = status.shards.get(shard)
        if reported is None or not reported.in_sync:
            return False
        # No assignment is newer than the agent's plan znode; else its own age counts.
        return (status.generation >= mine.generation
                or status.generation >= self.plan.assigned.get((agent, shard),
                                                               mine.generation))

    def __iter__(self) -> Iterator[tuple[str, int]]:
        for agent, status in self.statuses.items():
            for shard in status.shards:
                if (agent, shard) in self:
                    yield agent, shard


def caught_up(plan: PlanState, statuses: Mapping[str, AgentStatus]) -> CaughtUp:
    return CaughtUp(plan, statuses)


def failed_copies(plan: PlanState, statuses: Mapping[str, AgentStatus]
                  ) -> dict[tuple[str, int], str]:
    """(agent, shard) -> reason, for the copies agents report failed (ERROR) under their
    current assignment (an older report is answered already: answering changes it)."""
    out = {}
    for agent, status in statuses.items():
        mine = plan.agents.get(agent)
        if mine is None:
            continue
        for shard, reason in status.errors().items():
            if shard in mine.replicas and status.generation >= plan.assigned_at(agent, shard):
                out[(agent, shard)] = reason
    return out


class Fenced:
    """(agent, shard): the replicas each shard's primary knows in sync, per the latest plan
    znode it was written and has applied (its status says so). The primary forwards to
    them with must-ack; once one takes a new term it refuses those forwards, so a handover
    to it leaves the old primary nothing it could still acknowledge. A replica that joined
    in a plan the primary has not applied yet gets its writes only best effort: promoted
    then, it could miss writes the old primary acknowledged after its catch-up (found by
    bench.chaos; issue 13).

    A view like :class:`CaughtUp`: the shard's primary is the one its shard plan names.
    """

    __slots__ = ("plan", "statuses")

    def __init__(self, plan: PlanState, statuses: Mapping[str, AgentStatus]):
        self.plan, self.statuses = plan, statuses

    def __contains__(self, pair: object) -> bool:
        agent, shard = pair  # type: ignore[misc]
        shards = self.plan.shards
        if not isinstance(shard, int) or not 0 <= shard < len(shards):
            return False
        primary = shards[shard].primary
        mine = self.plan.agents.get(primary) if primary is not None else None
        status = self.statuses.get(primary) if primary is not None else None
        if mine is None or status is None or status.generation < mine.generation:
            return False
        assignment = mine.replicas.get(shard)
        return (assignment is not None and assignment.role == Role.PRIMARY
                and agent in assignment.peers)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        for shard, shard_plan in enumerate(self.plan.shards):
            for agent in shard_plan.replicas[1:]:
                if (agent, shard) in self:
                    yield agent, shard


def fenced_successors(plan: PlanState, statuses: Mapping[str, AgentStatus]) -> Fenced:
    return Fenced(plan, statuses)


def describe_step(step: Step, generation: int, audit: _Audit) -> None:
    """One "plan" event per generation that moved something (and the very first plan)."""
    moves = (step.started + step.dropped + step.failovers + step.promotions + step.joined
             + step.handoffs)
    if moves or generation == 1:
        handoffs = f", {step.handoffs} handed off" if step.handoffs else ""
        audit.add(
            "plan",
            f"generation {generation}: {step.started} copies started, {step.joined} joined,"
            f" {step.dropped} dropped, {step.failovers} failovers, {step.promotions} primary"
            f" moves{handoffs}, {step.in_flight} in flight, {step.deferred} deferred",
            generation,
        )


def drains_done(state: PlanState, draining: frozenset[str],
                reported: frozenset[str]) -> frozenset[str]:
    """Draining agents that hold nothing any more (each reported once per drain)."""
    done = {a for a in draining - reported
            if state.meta and not any(a in p.holders for p in state.shards)}
    return frozenset((reported & draining) | done)
