"""The machine itself: ``reconcile`` and the named steps it takes (see the package's
docstring for the rules)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from agents.shardsm.model import (
    Action,
    AgentState,
    BecomeReplica,
    CatchUp,
    CopyDone,
    CopyFailed,
    Decision,
    Demote,
    DropDone,
    DropFailed,
    Event,
    Limits,
    PeerLost,
    Plan,
    Promote,
    Promoted,
    PromoteFailed,
    Repair,
    ReportStatus,
    Session,
    SetServing,
    SetWritable,
    ShardAction,
    ShardRecord,
    ShardReport,
    StartBootstrap,
    StartDrop,
    Synced,
    SyncFailed,
    Target,
    Transition,
)
from shardkeeper.vocab import Role, ShardState

# The record of a shard the agent holds nothing of (frozen: one instance serves all).
_ABSENT = ShardRecord()


class _Step:
    """Accumulates one reconcile's records, actions and transitions."""

    def __init__(self, agent: AgentState):
        self.shards = dict(agent.shards)
        self.work = agent.work
        self.actions: list[Action] = []
        self.transitions: list[Transition] = []
        self.synced = False  # a replica finished syncing: report it, though no state changed
        # Shards given new work in this decision: an event for one of them in the same batch
        # answers earlier work (the shell starts this decision's only after it returns).
        self.issued: set[int] = set()

    def record(self, shard: int) -> ShardRecord:
        return self.shards.get(shard, _ABSENT)

    def move(self, shard: int, record: ShardRecord, *actions: ShardAction) -> None:
        """Set the shard's record and issue ``actions`` for it, numbering their work."""
        before = self.record(shard).state
        if record.state != before:
            self.transitions.append(Transition(shard, before, record.state))
        for action in actions:
            self.work += 1
            self.actions.append(replace(action, work=self.work))
            record = replace(record, work=self.work)
            self.issued.add(shard)
        self.shards[shard] = record

    def bootstrapping(self) -> int:
        return sum(1 for r in self.shards.values() if r.state == ShardState.BOOTSTRAPPING)


def reconcile(
    agent: AgentState,
    *,
    plan: Plan | None = None,
    events: Sequence[Event] = (),
    session: Session = Session.CONNECTED,
    limits: Limits = Limits(),  # noqa: B008 - frozen, safe as a default
) -> Decision:
    """Decide the next step for every local shard. Pure and deterministic."""
    applied = choose_plan(agent.plan, plan, session)
    generation = applied.generation if applied else 0
    targets: Mapping[int, Target] = applied.targets if applied else {}
    step = _Step(agent)
    fence_actions, unfence_actions = session_actions(agent.session, session)
    step.actions.extend(fence_actions)

    if session == Session.LOST and agent.session != Session.LOST:
        forget_sources(step)
    for event in events:
        apply_event(step, event, targets, generation, limits)
    followed: dict[int, tuple[ShardRecord, Target]] = {}
    if session != Session.LOST:
        follow_targets(step, targets, generation, agent.followed, followed)
        start_waiting_bootstraps(step, targets, limits)

    forget_idle(step, targets)
    prune_superseded_copies(step)
    step.actions.extend(unfence_actions)
    if worth_reporting(step) or step.synced or generation != agent.applied_generation:
        urgent = step.synced or leader_acts_on(step)
        step.actions.append(status_report(step.shards, generation, urgent))
    new_agent = AgentState(shards=step.shards, plan=applied, session=session, work=step.work,
                           followed=followed)
    return Decision(new_agent, tuple(step.actions), tuple(step.transitions))


def choose_plan(applied: Plan | None, offered: Plan | None, session: Session) -> Plan | None:
    """The plan to act on: the offered one unless it is older than the applied one."""
    if offered is None or session == Session.LOST:
        return applied
    if applied is not None and offered.generation < applied.generation:
        return applied
    return offered


def session_actions(
    before: Session, after: Session
) -> tuple[list[SetWritable | SetServing], list[SetWritable | SetServing]]:
    """(fencing actions to run first, unfencing actions to run last) for a session change."""
    fence: list[SetWritable | SetServing] = []
    unfence: list[SetWritable | SetServing] = []
    was_writable, now_writable = before == Session.CONNECTED, after == Session.CONNECTED
    was_serving, now_serving = before != Session.LOST, after != Session.LOST
    if was_writable and not now_writable:
        fence.append(SetWritable(False))
    if was_serving and not now_serving:
        fence.append(SetServing(False))
    # Serve again only after the shard actions, so the table is current before requests.
    if now_serving and not was_serving:
        unfence.append(SetServing(True))
    if now_writable and not was_writable:
        unfence.append(SetWritable(True))
    return fence, unfence


def apply_event(
    step: _Step, event: Event, targets: Mapping[int, Target], generation: int, limits: Limits
) -> None:
    """Fold one local event in. An event for earlier work than the shard's latest, or for
    a shard in another state, is stale and ignored."""
    if isinstance(event, PeerLost):
        for shard in sorted(step.shards):
            record = step.shards[shard]
            if record.state == ShardState.BOOTSTRAPPING and record.source == event.address:
                copy_failed(step, shard, f"source {event.address} lost", generation, limits)
        return
    record = step.shards.get(event.shard)
    if record is None or event.shard in step.issued or event.work != record.work:
        return
    state = record.state
    if isinstance(event, CopyDone) and state == ShardState.BOOTSTRAPPING:
        copy_done(step, event, targets.get(event.shard))
    elif isinstance(event, CopyFailed) and state == ShardState.BOOTSTRAPPING:
        copy_failed(step, event.shard, event.reason, generation, limits)
    elif isinstance(event, DropDone) and state == ShardState.DROPPING:
        step.move(event.shard, ShardRecord())
    elif isinstance(event, DropFailed) and state == ShardState.DROPPING:
        # Local work (the data is moved aside): a full disk is the likely cause, so it is
        # retried, with the shell's backoff, until it succeeds. Left undone, the shard
        # would stay DROPPING for good and its agent never match its plan.
        retry = replace(record, attempts=record.attempts + 1, reason=event.reason)
        step.move(event.shard, retry, StartDrop(event.shard, attempt=record.attempts + 1))
    elif isinstance(event, Synced) and state == ShardState.REPLICA and record.catching_up:
        synced = replace(record, catching_up=False, lsn=event.lsn or record.lsn, attempts=0,
                         reason=None, served=ShardState.REPLICA)
        step.move(event.shard, synced)
        step.synced = True
    elif isinstance(event, SyncFailed) and state == ShardState.REPLICA and record.catching_up:
        sync_failed(step, event.shard, event.reason, targets.get(event.shard), limits)
    elif isinstance(event, Promoted) and state == ShardState.PRIMARY:
        promoted = replace(record, lsn=event.lsn or record.lsn, attempts=0, reason=None,
                           served=ShardState.PRIMARY)
        step.move(event.shard, promoted)
        step.synced = True  # the leader waits for this to drop the shard's other replicas
    elif isinstance(event, PromoteFailed) and state == ShardState.PRIMARY:
        # Promotion is local work (a marker in the store): a full disk is the likely
        # cause, so it is retried, with the shell's backoff, until it succeeds or the
        # plan moves the primary elsewhere.
        retry = replace(record, attempts=record.attempts + 1, reason=event.reason)
        step.move(event.shard, retry, Promote(event.shard, record.term,
                                              peers_of(targets.get(event.shard)),
                                              attempt=record.attempts + 1))


def peers_of(target: Target | None) -> tuple[str, ...]:
    return target.peers if target is not None and target.role == Role.PRIMARY else ()


def sync_failed(step: _Step, shard: int, reason: str, target: Target | None,
                limits: Limits) -> None:
    """Retry a failed repair or catch-up (bounded); then, if the plan does not count this
    replica in sync (it lists it as copying), drop its data and copy the shard afresh.
    A replica the plan counts in sync keeps its data: it holds every acknowledged write."""
    record = step.record(shard)
    attempts = record.attempts + 1
    if attempts <= limits.max_copy_retries:
        retry = replace(record, attempts=attempts, reason=reason)
        step.move(shard, retry, CatchUp(shard, record.source, record.primary, attempts))
    elif target is not None and target.source is not None:
        drop(step, shard)
    else:
        step.move(shard, replace(record, attempts=attempts, reason=reason))


def drop(step: _Step, shard: int) -> None:
    step.move(shard, ShardRecord(state=ShardState.DROPPING), StartDrop(shard))


def forget_sources(step: _Step) -> None:
    """The session is lost: writes made meanwhile reach this agent's replicas no more, so a
    plan that lists one as copying again, even from the same source, must make it catch up."""
    for shard, record in step.shards.items():
        if record.state == ShardState.REPLICA and record.source is not None:
            step.shards[shard] = replace(record, source=None)


def copy_done(step: _Step, event: CopyDone, target: Target | None) -> None:
    if target is None:
        return  # the plan dropped the shard meanwhile; follow_target drops it
    record = replace(step.record(event.shard), lsn=event.lsn, attempts=0, reason=None)
    if target.role == Role.PRIMARY:
        promoted = replace(record, state=ShardState.PRIMARY, term=target.term)
        step.move(event.shard, promoted, Promote(event.shard, target.term, target.peers))
        return
    online = replace(record, state=ShardState.REPLICA, primary=target.primary,
                     catching_up=True, term=target.term)
    step.move(event.shard, online, BecomeReplica(event.shard, target.term, target.primary))


def copy_failed(step: _Step, shard: int, reason: str, generation: int, limits: Limits) -> None:
    record = step.record(shard)
    attempts = record.attempts + 1
    if attempts > limits.max_copy_retries:
        failed = replace(record, state=ShardState.ERROR, attempts=attempts,
                         failed_at=generation, reason=reason, served=None)
        step.move(shard, failed)
        return
    retry = replace(record, attempts=attempts, reason=reason)
    assert record.source is not None  # a BOOTSTRAPPING record always has its source
    step.move(shard, retry, StartBootstrap(shard, record.source, attempts))


def follow_targets(step: _Step, targets: Mapping[int, Target], generation: int,
                   before: Mapping[int, tuple[ShardRecord, Target]],
                   followed: dict[int, tuple[ShardRecord, Target]]) -> None:
    """``follow_target`` for every shard held or targeted, in shard order, except those
    whose record and target are the very objects a previous reconcile followed to (same
    decision: following is idempotent, tests/test_shardsm.py checks the two agree). A
    plan step changes a few of an agent's hundreds of targets, so this is most of a
    turn saved. ``followed`` receives the pairs as this reconcile leaves them."""
    record_of = step.record
    todo = [shard for shard in step.shards if shard not in targets]
    for shard, target in targets.items():
        record = record_of(shard)
        last = before.get(shard)
        if (last is not None and last[0] is record and last[1] is target
                and record.state != ShardState.ERROR):
            followed[shard] = last
        else:
            todo.append(shard)
    for shard in sorted(todo):
        target = targets.get(shard)
        follow_target(step, shard, target, generation)
        if target is not None:
            followed[shard] = (record_of(shard), target)


def follow_target(step: _Step, shard: int, target: Target | None, generation: int) -> None:
    """Move one shard toward its target, except starting copies (that is rationed later)."""
    record = step.record(shard)
    state = record.state
    if target is None:
        if state not in (ShardState.OFFLINE, ShardState.DROPPING):
            drop(step, shard)
        return
    if state == ShardState.ERROR and generation > record.failed_at:
        step.move(shard, ShardRecord())  # re-issued by a newer plan: try afresh
        state = ShardState.OFFLINE
    if state == ShardState.OFFLINE and target.source is None:
        open_empty(step, shard, target)
    elif state == ShardState.BOOTSTRAPPING:
        follow_new_source(step, shard, record, target)
    elif state == ShardState.REPLICA:
        follow_as_replica(step, shard, record, target)
    elif state == ShardState.PRIMARY and target.role == Role.REPLICA:
        demoted = replace(
            record, state=ShardState.REPLICA, term=target.term, primary=target.primary,
            source=target.source, catching_up=True, attempts=0, served=ShardState.REPLICA,
        )
        step.move(shard, demoted, Demote(shard, target.term, target.primary))
    elif state == ShardState.PRIMARY and target.term != record.term:
        # Still primary, in a new term (a re-election): number LSNs from it, so that
        # replicas fenced at it accept ours.
        step.move(shard, replace(record, term=target.term),
                  Promote(shard, target.term, target.peers))


def open_empty(step: _Step, shard: int, target: Target) -> None:
    """A shard with no source is new: it starts empty, no copy needed."""
    if target.role == Role.PRIMARY:
        record = ShardRecord(state=ShardState.PRIMARY, term=target.term)
        step.move(shard, record, Promote(shard, target.term, target.peers))
        return
    record = ShardRecord(state=ShardState.REPLICA, term=target.term, primary=target.primary,
                         catching_up=True)
    step.move(shard, record, BecomeReplica(shard, target.term, target.primary))


def follow_new_source(step: _Step, shard: int, record: ShardRecord, target: Target) -> None:
    """Restart the copy from a new source; start over if the shard's primary changed.

    Forwards from a primary that then failed may be writes nobody acknowledged; a copy
    cannot tell them apart, so it drops what it has and copies afresh from the new primary.
    """
    if record.primary is not None and target.primary not in (None, record.primary):
        drop(step, shard)
        return
    if target.term != record.term:
        # The same primary in a new term: take its forwards at the new term.
        record = replace(record, term=target.term)
        step.move(shard, record)
    if target.source is None or target.source == record.source:
        return
    restarted = replace(record, source=target.source, attempts=0, reason=None)
    step.move(shard, restarted, StartBootstrap(shard, target.source))


def follow_as_replica(step: _Step, shard: int, record: ShardRecord, target: Target) -> None:
    if target.role == Role.PRIMARY:
        promoted = replace(record, state=ShardState.PRIMARY, term=target.term,
                           catching_up=False, attempts=0)
        step.move(shard, promoted, Promote(shard, target.term, target.peers))
    elif target.primary is not None and (
        target.primary != record.primary or target.term != record.term
    ):
        # A new primary, or a new term of the same one: fence at its term, then repair.
        followed = replace(record, primary=target.primary, source=target.source,
                           catching_up=True, attempts=0, term=target.term)
        step.move(shard, followed, Repair(shard, target.primary, target.term))
    elif target.source is not None and target.source != record.source:
        # Listed as copying, though it holds the shard: it was away (or its source moved).
        rejoin = replace(record, source=target.source, catching_up=True, attempts=0)
        step.move(shard, rejoin, CatchUp(shard, target.source, target.primary))


def start_waiting_bootstraps(step: _Step, targets: Mapping[int, Target], limits: Limits) -> None:
    """Start copies for OFFLINE shards with a source, in shard order, while slots remain."""
    free = limits.max_bootstraps - step.bootstrapping()
    if free <= 0:
        return
    for shard in sorted(s for s, t in targets.items() if t.source is not None):
        if free <= 0:
            return
        target = targets[shard]
        if step.record(shard).state != ShardState.OFFLINE:
            continue
        record = ShardRecord(
            state=ShardState.BOOTSTRAPPING,
            term=target.term,
            source=target.source,
            primary=target.primary,
            served=ShardState.BOOTSTRAPPING,  # takes forwards while it copies
        )
        step.move(shard, record, StartBootstrap(shard, target.source))
        free -= 1


def prune_superseded_copies(step: _Step) -> None:
    """Keep only the last StartBootstrap of a shard, and only if it is still copying; keep a
    Promote or a CatchUp only if no later action for its shard follows (and, for a CatchUp,
    the replica still catches up); keep nothing for a shard the same decision drops.

    Several events in one batch (a retry, then a drop) must not leave the shell a copy to
    start that the same decision already made pointless.
    """
    last_copy: dict[int, int] = {}
    last_any: dict[int, int] = {}
    last_drop: dict[int, int] = {}
    for index, action in enumerate(step.actions):
        shard = getattr(action, "shard", None)
        if shard is not None:
            last_any[shard] = index
        if isinstance(action, StartBootstrap):
            last_copy[action.shard] = index
        if isinstance(action, StartDrop):
            last_drop[action.shard] = index

    def wanted(index: int, action: Action) -> bool:
        shard = getattr(action, "shard", None)
        if shard is not None and last_drop.get(shard, -1) > index:
            return False  # the same decision drops the shard afterwards
        if isinstance(action, StartBootstrap):
            return (
                last_copy[action.shard] == index
                and step.record(action.shard).state == ShardState.BOOTSTRAPPING
            )
        if isinstance(action, Promote):  # a retry overtaken by a newer decision
            return last_any[action.shard] == index
        if isinstance(action, CatchUp):
            return last_any[action.shard] == index and step.record(action.shard).catching_up
        return True

    step.actions = [a for i, a in enumerate(step.actions) if wanted(i, a)]


def forget_idle(step: _Step, targets: Mapping[int, Target]) -> None:
    """OFFLINE shards the plan does not want hold nothing: drop their records."""
    for shard in [s for s, r in step.shards.items() if r.state == ShardState.OFFLINE]:
        if shard not in targets:
            del step.shards[shard]


def worth_reporting(step: _Step) -> bool:
    """A state change worth a status write. A shard that became a replica still catching
    up is not one (the leader does not count it yet): its report waits for Synced, which
    halves the status writes while shards copy, each of them a whole status znode."""
    return any(
        not (t.after == ShardState.REPLICA and step.record(t.shard).catching_up)
        for t in step.transitions
    )


def leader_acts_on(step: _Step) -> bool:
    """A state change the leader acts on, to report at once: not a copy starting
    (BOOTSTRAPPING), which it learns all it needs of when the copy ends (in sync, or
    ERROR); that report may wait a moment for one that carries it anyway."""
    return any(
        t.after != ShardState.BOOTSTRAPPING
        and not (t.after == ShardState.REPLICA and step.record(t.shard).catching_up)
        for t in step.transitions
    )


def status_report(shards: Mapping[int, ShardRecord], generation: int,
                  urgent: bool = True) -> ReportStatus:
    return ReportStatus(generation, tuple(report_of(shard, record)
                                          for shard, record in sorted(shards.items())),
                        urgent)


def report_of(shard: int, record: ShardRecord) -> ShardReport:
    """The status entry of one shard, made once per record (records are frozen, and a
    report repeats hundreds of unchanged ones): the same object while the record is."""
    made = record.__dict__.get("_report")
    if made is None or made.shard != shard:
        made = ShardReport(shard, record.state, record.lsn, record.unsettled,
                           (record.reason or "") if record.state == ShardState.ERROR else "")
        object.__setattr__(record, "_report", made)
    return made
