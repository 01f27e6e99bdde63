"""The agent's shard state machine: pure decisions, no I/O, no clock, no threads.

Each shard replica on an agent moves through::

    OFFLINE -> BOOTSTRAPPING -> REPLICA <-> PRIMARY -> DROPPING -> OFFLINE
    (OFFLINE -> REPLICA / PRIMARY directly for a new, empty shard; ERROR after failed copies)

``reconcile`` takes the agent's current records, the latest plan it has read (its own
targets), local events and the ZooKeeper session state, and returns the new records plus the
actions the I/O shell must carry out, in order. Given the same input it returns the same
output. The shell never decides policy: it performs actions and feeds back events.

Rules it enforces:

- a plan older than the applied one is ignored (a late watch or a deposed leader's write);
- at most ``Limits.max_bootstraps`` shards copy at once on this agent; the rest wait in
  OFFLINE, in shard order, and start as slots free up;
- a failed copy is retried (resuming from its cursor) up to ``Limits.max_copy_retries`` times,
  then the shard goes to ERROR until the plan re-issues it at a newer generation;
- SUSPENDED fences the agent (primaries stop acknowledging writes) and LOST stops all
  serving; the plan is not acted on while LOST, because it cannot be trusted then;
- a replica whose data the handler must still bring into line (a repair against a new
  primary, a demotion, a catch-up) is ``syncing`` and reported as catching up, which the
  leader does not count as in sync, until the shell reports ``Synced``. A replica kept
  through a lost session that the plan lists as copying again catches up from its
  source instead of counting as in sync at once: it missed the writes of its absence.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from shardkeeper.vocab import Role, ShardState


class Session(StrEnum):
    CONNECTED = "CONNECTED"
    SUSPENDED = "SUSPENDED"
    LOST = "LOST"


# Every single-step transition the machine may take; tests hold it to this table.
LEGAL_TRANSITIONS: Mapping[ShardState, frozenset[ShardState]] = {
    ShardState.OFFLINE: frozenset(
        {ShardState.BOOTSTRAPPING, ShardState.REPLICA, ShardState.PRIMARY}
    ),
    ShardState.BOOTSTRAPPING: frozenset(
        {ShardState.REPLICA, ShardState.PRIMARY, ShardState.DROPPING, ShardState.ERROR}
    ),
    ShardState.REPLICA: frozenset({ShardState.PRIMARY, ShardState.DROPPING}),
    ShardState.PRIMARY: frozenset({ShardState.REPLICA, ShardState.DROPPING}),
    ShardState.DROPPING: frozenset({ShardState.OFFLINE}),
    ShardState.ERROR: frozenset({ShardState.OFFLINE, ShardState.DROPPING}),
}


# -- inputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What the plan wants this agent to hold for one shard."""

    role: Role
    source: str | None = None  # bootstrap source address; None: a new, empty shard
    primary: str | None = None  # the shard's primary address, for replicas to follow
    # The primary's term (the plan generation that made it primary): the LSN generation
    # and fence every agent uses for the shard. 0 (older plans): the plan's generation.
    since: int = 0

    def term(self, generation: int) -> int:
        return self.since or generation


@dataclass(frozen=True)
class Plan:
    """This agent's slice of plan ``generation``: shard -> target. Treat as read-only."""

    generation: int
    targets: Mapping[int, Target] = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    max_bootstraps: int = 2
    max_copy_retries: int = 3


@dataclass(frozen=True)
class CopyDone:
    shard: int
    lsn: int


@dataclass(frozen=True)
class CopyFailed:
    shard: int
    reason: str


@dataclass(frozen=True)
class DropDone:
    shard: int


@dataclass(frozen=True)
class Synced:
    """The handler finished bringing a replica into line (repair or catch-up) at ``lsn``."""

    shard: int
    lsn: int


@dataclass(frozen=True)
class SyncFailed:
    shard: int
    reason: str


@dataclass(frozen=True)
class PeerLost:
    """A peer agent vanished; copies from it cannot finish."""

    address: str


Event = CopyDone | CopyFailed | DropDone | PeerLost | Synced | SyncFailed


# -- state -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRecord:
    """What the agent knows about one local shard replica."""

    state: ShardState = ShardState.OFFLINE
    generation: int = 0  # plan generation of the last role change (fences LSNs and forwards)
    # Bootstrap source in use; for a replica, the source of its last copy or catch-up
    # (forgotten when the session is lost, so that a plan listing it as copying again
    # makes it catch up).
    source: str | None = None
    primary: str | None = None  # primary this replica follows
    attempts: int = 0  # failed copies in a row
    failed_at: int = 0  # plan generation that saw the shard enter ERROR
    lsn: int = 0  # LSN at the last copy completion, for status
    reason: str | None = None
    syncing: bool = False  # REPLICA only: repair or catch-up not finished (not in sync)
    term: int = 0  # REPLICA only: the term of the primary it follows


@dataclass(frozen=True)
class AgentState:
    """All local shard records plus the applied plan and the last session state.

    A fresh agent starts as LOST: it serves nothing until its first connected reconcile.
    """

    shards: Mapping[int, ShardRecord] = field(default_factory=dict)
    plan: Plan | None = None
    session: Session = Session.LOST

    @property
    def applied_generation(self) -> int:
        return self.plan.generation if self.plan else 0


# -- outputs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StartBootstrap:
    """Copy the shard from ``source`` (resuming from the stored cursor); report CopyDone/Failed.

    ``attempt`` > 0 is a retry: the shell backs off before it.
    """

    shard: int
    source: str
    generation: int
    attempt: int = 0


@dataclass(frozen=True)
class BecomeReplica:
    """Serve the shard as a replica of ``primary`` (open an empty store if there is none)."""

    shard: int
    generation: int
    primary: str | None


@dataclass(frozen=True)
class Promote:
    """Become the shard's primary at ``generation``: record the promotion point, take writes."""

    shard: int
    generation: int


@dataclass(frozen=True)
class Demote:
    """Stop taking writes; serve as a replica of ``primary`` after repairing against it."""

    shard: int
    generation: int
    primary: str | None


@dataclass(frozen=True)
class Repair:
    """The shard has a new primary, promoted at ``generation``: fence older primaries,
    repair rows after its promotion point, then catch up."""

    shard: int
    primary: str
    generation: int


@dataclass(frozen=True)
class CatchUp:
    """A replica that already holds the shard must catch up before it counts as in sync:
    the plan lists it as copying from ``source`` again (it was away), or an earlier repair
    failed. Repair against ``primary`` where there is one, then stream what is missing.

    ``attempt`` > 0 is a retry: the shell backs off before it.
    """

    shard: int
    source: str | None
    primary: str | None
    generation: int
    attempt: int = 0


@dataclass(frozen=True)
class StartDrop:
    """Stop serving the shard, cancel any copy, delete its data; report DropDone."""

    shard: int


@dataclass(frozen=True)
class SetWritable:
    """Global fence: False while the session is not CONNECTED (primaries refuse writes)."""

    writable: bool


@dataclass(frozen=True)
class SetServing:
    """Global switch: False after LOST (the data plane answers nothing)."""

    serving: bool


@dataclass(frozen=True)
class ShardStatus:
    shard: int
    state: ShardState
    lsn: int
    catching_up: bool = False  # a REPLICA still repairing or catching up: not in sync


@dataclass(frozen=True)
class ReportStatus:
    """Write ``status/<agent>``: the applied generation and every shard's state."""

    generation: int
    shards: tuple[ShardStatus, ...]


# Actions after which a replica is in sync only once the handler reports Synced.
SYNC_ACTIONS = (BecomeReplica, Demote, Repair, CatchUp)

Action = (
    StartBootstrap
    | BecomeReplica
    | Promote
    | Demote
    | Repair
    | CatchUp
    | StartDrop
    | SetWritable
    | SetServing
    | ReportStatus
)


@dataclass(frozen=True)
class Transition:
    shard: int
    before: ShardState
    after: ShardState


@dataclass(frozen=True)
class Decision:
    agent: AgentState
    actions: tuple[Action, ...]
    transitions: tuple[Transition, ...]


# -- the machine -------------------------------------------------------------------------


class _Step:
    """Accumulates one reconcile's records, actions and transitions."""

    def __init__(self, shards: Mapping[int, ShardRecord]):
        self.shards = dict(shards)
        self.actions: list[Action] = []
        self.transitions: list[Transition] = []
        self.synced = False  # a replica finished syncing: report it, though no state changed
        # Shards given new work in this decision: an event for one of them in the same batch
        # answers earlier work (the shell starts this decision's only after it returns).
        self.issued: set[int] = set()

    def record(self, shard: int) -> ShardRecord:
        return self.shards.get(shard, ShardRecord())

    def move(self, shard: int, record: ShardRecord, *actions: Action) -> None:
        before = self.record(shard).state
        if record.state != before:
            self.transitions.append(Transition(shard, before, record.state))
        self.shards[shard] = record
        self.actions.extend(actions)
        if actions:
            self.issued.add(shard)

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
    step = _Step(agent.shards)
    fence_actions, unfence_actions = session_actions(agent.session, session)
    step.actions.extend(fence_actions)

    if session == Session.LOST and agent.session != Session.LOST:
        forget_sources(step)
    for event in events:
        apply_event(step, event, targets, generation, limits)
    if session != Session.LOST:
        for shard in sorted(set(step.shards) | set(targets)):
            follow_target(step, shard, targets.get(shard), generation)
        start_waiting_bootstraps(step, targets, generation, limits)

    forget_idle(step, targets)
    prune_superseded_copies(step)
    step.actions.extend(unfence_actions)
    if worth_reporting(step) or step.synced or generation != agent.applied_generation:
        step.actions.append(status_report(step.shards, generation))
    new_agent = AgentState(shards=step.shards, plan=applied, session=session)
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
    """Fold one local event in; events for a shard in another state are stale and ignored."""
    if isinstance(event, PeerLost):
        for shard in sorted(step.shards):
            record = step.shards[shard]
            if record.state == ShardState.BOOTSTRAPPING and record.source == event.address:
                copy_failed(step, shard, f"source {event.address} lost", generation, limits)
        return
    record = step.shards.get(event.shard)
    if record is None or event.shard in step.issued:
        return
    if isinstance(event, CopyDone) and record.state == ShardState.BOOTSTRAPPING:
        copy_done(step, event, targets.get(event.shard), generation)
    elif isinstance(event, CopyFailed) and record.state == ShardState.BOOTSTRAPPING:
        copy_failed(step, event.shard, event.reason, generation, limits)
    elif isinstance(event, DropDone) and record.state == ShardState.DROPPING:
        step.move(event.shard, ShardRecord())
    elif isinstance(event, Synced) and syncs(step, event.shard):
        synced = replace(record, syncing=False, lsn=event.lsn or record.lsn, attempts=0,
                         reason=None)
        step.move(event.shard, synced)
        step.synced = True
    elif isinstance(event, SyncFailed) and syncs(step, event.shard):
        sync_failed(step, event.shard, event.reason, targets.get(event.shard), generation, limits)


def syncs(step: _Step, shard: int) -> bool:
    """True for a replica whose repair or catch-up runs."""
    record = step.record(shard)
    return record.state == ShardState.REPLICA and record.syncing


def sync_failed(
    step: _Step, shard: int, reason: str, target: Target | None, generation: int, limits: Limits
) -> None:
    """Retry a failed repair or catch-up (bounded); then, if the plan does not count this
    replica in sync (it lists it as copying), drop its data and copy the shard afresh.
    A replica the plan counts in sync keeps its data: it holds every acknowledged write."""
    record = step.record(shard)
    attempts = record.attempts + 1
    if attempts <= limits.max_copy_retries:
        retry = replace(record, attempts=attempts, reason=reason)
        step.move(shard, retry, CatchUp(shard, record.source, record.primary, generation,
                                        attempts))
    elif target is not None and target.source is not None:
        step.move(shard, ShardRecord(state=ShardState.DROPPING), StartDrop(shard))
    else:
        step.move(shard, replace(record, attempts=attempts, reason=reason))


def forget_sources(step: _Step) -> None:
    """The session is lost: writes made meanwhile reach this agent's replicas no more, so a
    plan that lists one as copying again, even from the same source, must make it catch up."""
    for shard, record in step.shards.items():
        if record.state == ShardState.REPLICA and record.source is not None:
            step.shards[shard] = replace(record, source=None)


def copy_done(step: _Step, event: CopyDone, target: Target | None, generation: int) -> None:
    if target is None:
        return  # the plan dropped the shard meanwhile; follow_target drops it
    record = replace(step.record(event.shard), lsn=event.lsn, attempts=0, reason=None)
    term = target.term(generation)
    if target.role == Role.PRIMARY:
        promoted = replace(record, state=ShardState.PRIMARY, generation=term)
        step.move(event.shard, promoted, Promote(event.shard, term))
        return
    online = replace(record, state=ShardState.REPLICA, primary=target.primary, syncing=True,
                     term=term)
    step.move(event.shard, online, BecomeReplica(event.shard, generation, target.primary))


def copy_failed(step: _Step, shard: int, reason: str, generation: int, limits: Limits) -> None:
    record = step.record(shard)
    attempts = record.attempts + 1
    if attempts > limits.max_copy_retries:
        failed = replace(
            record, state=ShardState.ERROR, attempts=attempts, failed_at=generation, reason=reason
        )
        step.move(shard, failed)
        return
    retry = replace(record, attempts=attempts, reason=reason)
    assert record.source is not None  # a BOOTSTRAPPING record always has its source
    step.move(shard, retry, StartBootstrap(shard, record.source, generation, attempts))


def follow_target(step: _Step, shard: int, target: Target | None, generation: int) -> None:
    """Move one shard toward its target, except starting copies (that is rationed later)."""
    record = step.record(shard)
    state = record.state
    if target is None:
        if state not in (ShardState.OFFLINE, ShardState.DROPPING):
            step.move(shard, ShardRecord(state=ShardState.DROPPING), StartDrop(shard))
        return
    if state == ShardState.ERROR and generation > record.failed_at:
        step.move(shard, ShardRecord())  # re-issued by a newer plan: try afresh
        state = ShardState.OFFLINE
    if state == ShardState.OFFLINE and target.source is None:
        open_empty(step, shard, target, generation)
    elif state == ShardState.BOOTSTRAPPING:
        follow_new_source(step, shard, record, target, generation)
    elif state == ShardState.REPLICA:
        follow_as_replica(step, shard, record, target, generation)
    elif state == ShardState.PRIMARY and target.role == Role.REPLICA:
        term = target.term(generation)
        demoted = replace(
            record, state=ShardState.REPLICA, generation=term, primary=target.primary,
            source=target.source, syncing=True, attempts=0, term=term,
        )
        step.move(shard, demoted, Demote(shard, term, target.primary))
    elif state == ShardState.PRIMARY and target.since and target.since != record.generation:
        # Still primary, in a new term (a plan from before terms were stamped, or a
        # re-election): number LSNs from it, so that replicas fenced at it accept ours.
        promoted = replace(record, generation=target.since)
        step.move(shard, promoted, Promote(shard, target.since))


def open_empty(step: _Step, shard: int, target: Target, generation: int) -> None:
    """A shard with no source is new: it starts empty, no copy needed."""
    term = target.term(generation)
    if target.role == Role.PRIMARY:
        record = ShardRecord(state=ShardState.PRIMARY, generation=term)
        step.move(shard, record, Promote(shard, term))
        return
    record = ShardRecord(
        state=ShardState.REPLICA, generation=generation, primary=target.primary, syncing=True,
        term=term,
    )
    step.move(shard, record, BecomeReplica(shard, generation, target.primary))


def follow_new_source(
    step: _Step, shard: int, record: ShardRecord, target: Target, generation: int
) -> None:
    """Restart the copy from a new source; start over if the shard's primary changed.

    Forwards from a primary that then failed may be writes nobody acknowledged; a copy
    cannot tell them apart, so it drops what it has and copies afresh from the new primary.
    """
    if record.primary is not None and target.primary not in (None, record.primary):
        step.move(shard, ShardRecord(state=ShardState.DROPPING), StartDrop(shard))
        return
    if target.source is None or target.source == record.source:
        return
    restarted = replace(record, source=target.source, attempts=0, reason=None)
    step.move(shard, restarted, StartBootstrap(shard, target.source, generation))


def follow_as_replica(
    step: _Step, shard: int, record: ShardRecord, target: Target, generation: int
) -> None:
    term = target.term(generation)
    if target.role == Role.PRIMARY:
        promoted = replace(record, state=ShardState.PRIMARY, generation=term,
                           syncing=False, attempts=0)
        step.move(shard, promoted, Promote(shard, term))
    elif target.primary is not None and (
        target.primary != record.primary or (target.since and target.since != record.term)
    ):
        # A new primary, or a new term of the same one: fence at its term, then repair.
        followed = replace(record, primary=target.primary, source=target.source,
                           syncing=True, attempts=0, term=term)
        step.move(shard, followed, Repair(shard, target.primary, term))
    elif target.source is not None and target.source != record.source:
        # Listed as copying, though it holds the shard: it was away (or its source moved).
        rejoin = replace(record, source=target.source, syncing=True, attempts=0)
        step.move(shard, rejoin, CatchUp(shard, target.source, target.primary, generation))


def start_waiting_bootstraps(
    step: _Step, targets: Mapping[int, Target], generation: int, limits: Limits
) -> None:
    """Start copies for OFFLINE shards with a source, in shard order, while slots remain."""
    free = limits.max_bootstraps - step.bootstrapping()
    for shard in sorted(targets):
        if free <= 0:
            return
        target = targets[shard]
        if step.record(shard).state != ShardState.OFFLINE or target.source is None:
            continue
        record = ShardRecord(
            state=ShardState.BOOTSTRAPPING,
            generation=generation,
            source=target.source,
            primary=target.primary,
        )
        step.move(shard, record, StartBootstrap(shard, target.source, generation))
        free -= 1


def prune_superseded_copies(step: _Step) -> None:
    """Keep only the last StartBootstrap of a shard, and only if it is still copying; keep a
    CatchUp only if no later action for its shard follows and the replica still syncs.

    Several events in one batch (a retry, then a drop) must not leave the shell a copy to
    start that the same decision already made pointless.
    """
    last_copy: dict[int, int] = {}
    last_any: dict[int, int] = {}
    for index, action in enumerate(step.actions):
        shard = getattr(action, "shard", None)
        if shard is not None:
            last_any[shard] = index
        if isinstance(action, StartBootstrap):
            last_copy[action.shard] = index

    def wanted(index: int, action: Action) -> bool:
        if isinstance(action, StartBootstrap):
            return (
                last_copy[action.shard] == index
                and step.record(action.shard).state == ShardState.BOOTSTRAPPING
            )
        if isinstance(action, CatchUp):
            record = step.record(action.shard)
            return last_any[action.shard] == index and record.syncing
        return True

    step.actions = [a for i, a in enumerate(step.actions) if wanted(i, a)]


def forget_idle(step: _Step, targets: Mapping[int, Target]) -> None:
    """OFFLINE shards the plan does not want hold nothing: drop their records."""
    for shard in [s for s, r in step.shards.items() if r.state == ShardState.OFFLINE]:
        if shard not in targets:
            del step.shards[shard]


def worth_reporting(step: _Step) -> bool:
    """A state change the leader can act on. A shard that became a replica still syncing is
    not one (the leader does not count it yet): its report waits for Synced, which halves
    the status writes while shards copy, each of them a whole status znode."""
    return any(
        not (t.after == ShardState.REPLICA and step.record(t.shard).syncing)
        for t in step.transitions
    )


def status_report(shards: Mapping[int, ShardRecord], generation: int) -> ReportStatus:
    entries = tuple(
        ShardStatus(shard, record.state, record.lsn, record.syncing)
        for shard, record in sorted(shards.items())
    )
    return ReportStatus(generation, entries)


def waiting_shards(agent: AgentState) -> list[int]:
    """Shards the plan wants copied here that wait for a bootstrap slot."""
    targets: Mapping[int, Target] = agent.plan.targets if agent.plan else {}
    return [
        shard
        for shard, target in sorted(targets.items())
        if target.source is not None
        and agent.shards.get(shard, ShardRecord()).state == ShardState.OFFLINE
    ]


def states(agent: AgentState) -> dict[int, ShardState]:
    """shard -> state, for status and logs."""
    return {shard: record.state for shard, record in agent.shards.items()}


def plan_from(generation: int, targets: Iterable[tuple[int, Target]]) -> Plan:
    """Build a Plan from (shard, target) pairs (convenience for the shell and tests)."""
    return Plan(generation, dict(targets))
