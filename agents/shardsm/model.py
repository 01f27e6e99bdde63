"""The shard state machine's values: its inputs (targets, plans, events), its state
(records), and its outputs (actions, status reports, what is served). Frozen dataclasses,
no behaviour beyond trivial properties."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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
    """What the plan wants this agent to hold for one shard (agents as addresses)."""

    role: Role
    term: int = 0  # the primary's term (the plan generation that made it primary)
    source: str | None = None  # bootstrap source; None: a new, empty shard
    primary: str | None = None  # the shard's primary, for replicas to follow
    peers: tuple[str, ...] = ()  # a primary's in-sync replicas (they ack every write)
    bootstrapping: tuple[str, ...] = ()  # a primary's copying replicas (forwards best effort)


@dataclass(frozen=True)
class Plan:
    """This agent's slice of plan ``generation``, written under leader ``epoch``: shard ->
    target. Treat as read-only."""

    generation: int
    targets: Mapping[int, Target] = field(default_factory=dict)
    epoch: int = 0


@dataclass(frozen=True)
class Limits:
    max_bootstraps: int = 2
    max_copy_retries: int = 3


@dataclass(frozen=True)
class CopyDone:
    shard: int
    lsn: int
    work: int = 0


@dataclass(frozen=True)
class CopyFailed:
    shard: int
    reason: str
    work: int = 0


@dataclass(frozen=True)
class DropDone:
    shard: int
    work: int = 0


@dataclass(frozen=True)
class DropFailed:
    """Putting the shard's data aside failed (a full disk): the drop is retried."""

    shard: int
    reason: str
    work: int = 0


@dataclass(frozen=True)
class Synced:
    """The handler finished bringing a replica into line (repair or catch-up) at ``lsn``."""

    shard: int
    lsn: int
    work: int = 0


@dataclass(frozen=True)
class SyncFailed:
    shard: int
    reason: str
    work: int = 0


@dataclass(frozen=True)
class Promoted:
    """The handler made this replica the primary; ``lsn`` is its promotion point."""

    shard: int
    lsn: int
    work: int = 0


@dataclass(frozen=True)
class PromoteFailed:
    shard: int
    reason: str
    work: int = 0


@dataclass(frozen=True)
class PeerLost:
    """A peer agent vanished; copies from it cannot finish."""

    address: str


ShardEvent = (CopyDone | CopyFailed | DropDone | DropFailed | Synced | SyncFailed | Promoted
              | PromoteFailed)
Event = ShardEvent | PeerLost


# -- state -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRecord:
    """What the agent knows about one local shard replica."""

    state: ShardState = ShardState.OFFLINE
    # The shard's term as this replica knows it: a primary's own, else the term of the
    # primary it follows (or copies from).
    term: int = 0
    # Bootstrap source in use; for a replica, the source of its last copy or catch-up
    # (forgotten when the session is lost, so that a plan listing it as copying again
    # makes it catch up).
    source: str | None = None
    primary: str | None = None  # the primary this replica follows
    attempts: int = 0  # failed copies, syncs or promotions in a row
    failed_at: int = 0  # plan generation that saw the shard enter ERROR
    lsn: int = 0  # LSN at the last copy, sync or promotion, for status
    reason: str | None = None
    catching_up: bool = False  # REPLICA: repair or catch-up not finished (not in sync)
    served: ShardState | None = None  # what the data plane may serve for it now
    work: int = 0  # the latest action issued for the shard; older results are stale

    @property
    def unsettled(self) -> bool:
        """Reported catching up: a replica repairing or catching up, or a primary still
        promoting (pulling from its peers what it may lack). The leader drops none of
        a shard's replicas while its primary is unsettled."""
        return self.catching_up or (
            self.state == ShardState.PRIMARY and self.served != ShardState.PRIMARY)


@dataclass(frozen=True)
class AgentState:
    """All local shard records plus the applied plan and the last session state.

    A fresh agent starts as LOST: it serves nothing until its first connected reconcile.
    """

    shards: Mapping[int, ShardRecord] = field(default_factory=dict)
    plan: Plan | None = None
    session: Session = Session.LOST
    work: int = 0  # the last work number issued
    # shard -> (record, target) as the last reconcile left them after following the
    # target: following the very same pair again changes nothing (unless in ERROR, which a
    # newer generation resets), so the next reconcile skips it. Not part of the state.
    followed: Mapping[int, tuple[ShardRecord, Target]] = field(
        default_factory=dict, compare=False, repr=False)

    @property
    def applied_generation(self) -> int:
        return self.plan.generation if self.plan else 0


# -- outputs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StartBootstrap:
    """Copy the shard from ``source`` (resuming from the stored cursor); report CopyDone or
    CopyFailed. ``attempt`` > 0 is a retry: the shell backs off before it."""

    shard: int
    source: str
    attempt: int = 0
    work: int = 0


@dataclass(frozen=True)
class BecomeReplica:
    """Serve the shard as a replica of ``primary`` at ``term`` (open an empty store if there
    is none); report Synced."""

    shard: int
    term: int
    primary: str | None
    work: int = 0


@dataclass(frozen=True)
class Promote:
    """Become the shard's primary at ``term``: first take from the in-sync ``peers`` what
    they hold that this replica may have missed, then record the promotion point; report
    Promoted."""

    shard: int
    term: int
    peers: tuple[str, ...] = ()
    attempt: int = 0
    work: int = 0


@dataclass(frozen=True)
class Demote:
    """Stop taking writes; serve as a replica of ``primary`` at ``term`` after repairing
    against it; report Synced."""

    shard: int
    term: int
    primary: str | None
    work: int = 0


@dataclass(frozen=True)
class Repair:
    """The shard has a new primary, of ``term``: repair rows after its promotion point,
    then catch up; report Synced."""

    shard: int
    primary: str
    term: int
    work: int = 0


@dataclass(frozen=True)
class CatchUp:
    """A replica that already holds the shard must catch up before it counts as in sync:
    the plan lists it as copying from ``source`` again (it was away), or an earlier repair
    failed. Repair against ``primary`` where there is one, then stream what is missing.
    ``attempt`` > 0 is a retry: the shell backs off before it."""

    shard: int
    source: str | None
    primary: str | None
    attempt: int = 0
    work: int = 0


@dataclass(frozen=True)
class StartDrop:
    """Stop serving the shard, cancel any copy, put its data aside; report DropDone, or
    DropFailed. ``attempt`` > 0 is a retry: the shell backs off before it."""

    shard: int
    attempt: int = 0
    work: int = 0


@dataclass(frozen=True)
class SetWritable:
    """Global fence: False while the session is not CONNECTED (primaries refuse writes)."""

    writable: bool


@dataclass(frozen=True)
class SetServing:
    """Global switch: False after LOST (the data plane answers nothing)."""

    serving: bool


@dataclass(frozen=True)
class ShardReport:
    shard: int
    state: ShardState
    lsn: int
    catching_up: bool = False  # a REPLICA repairing or catching up, a PRIMARY promoting
    reason: str = ""  # why it is in ERROR


@dataclass(frozen=True)
class ReportStatus:
    """Write ``status/<agent>``: the applied generation and every shard's state.

    ``urgent`` is False when nothing the leader acts on changed (only the applied
    generation, or a copy started): the shell may then wait a moment
    (``agents.runtime.ACK_DELAY``) for a report that carries it anyway. While shards are
    re-replicated nearly every plan step rewrites every agent's plan, and each such
    acknowledgement rewrote the agent's whole status."""

    generation: int
    shards: tuple[ShardReport, ...]
    urgent: bool = True


# Actions after which a replica is in sync only once the handler reports Synced.
SYNC_ACTIONS = (BecomeReplica, Demote, Repair, CatchUp)
ShardAction = StartBootstrap | BecomeReplica | Promote | Demote | Repair | CatchUp | StartDrop
Action = ShardAction | SetWritable | SetServing | ReportStatus


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


@dataclass(frozen=True)
class Serve:
    """What the data plane serves for one shard (field for field the data plane's route)."""

    state: ShardState
    term: int
    primary: str | None
    in_sync: tuple[str, ...] = ()
    bootstrapping: tuple[str, ...] = ()
