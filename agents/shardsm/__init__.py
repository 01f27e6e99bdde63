"""The agent's shard state machine: pure decisions, no I/O, no clock, no threads.

Each shard replica on an agent moves through::

    OFFLINE -> BOOTSTRAPPING -> REPLICA <-> PRIMARY -> DROPPING -> OFFLINE
    (OFFLINE -> REPLICA / PRIMARY directly for a new, empty shard; ERROR after failed copies)

``reconcile`` takes the agent's current records, the latest plan it has read (its own
targets), local events and the ZooKeeper session state, and returns the new records plus
the actions the I/O shell must carry out, in order. Given the same input it returns the
same output. The shell decides nothing: it performs actions, feeds back their events,
serves what :func:`serving` says and writes the status that ``ReportStatus`` carries.

Rules it enforces:

- a plan older than the applied one is ignored (a late watch or a deposed leader's write);
- at most ``Limits.max_bootstraps`` shards copy at once on this agent; the rest wait in
  OFFLINE, in shard order, and start as slots free up;
- a failed copy is retried (resuming from its cursor) up to ``Limits.max_copy_retries``
  times, then the shard goes to ERROR until the plan re-issues it at a newer generation;
- SUSPENDED fences the agent (primaries stop acknowledging writes) and LOST stops all
  serving; the plan is not acted on while LOST, because it cannot be trusted then;
- a replica whose data the handler must still bring into line (a repair against a new
  primary, a demotion, a catch-up) is **catching up** and reported so, which the leader
  does not count as in sync, until the shell reports ``Synced``. A replica kept through a
  lost session that the plan lists as copying again catches up from its source instead
  of counting as in sync at once: it missed the writes of its absence.

What the data plane serves is decided here too (``ShardRecord.served``): a copy takes
forwards as soon as it starts; a demoted primary refuses writes the moment the demotion
is decided; a replica serves reads, and a primary takes writes, only once the handler
finished the work (``Synced``, ``Promoted``). Every route carries the shard's **term**:
a primary's own (the high bits of its LSNs), or for a replica the term its plan gives
the primary it follows, the only term whose forwards it accepts.

Every shard action carries a ``work`` number, unique for the agent's life; its event
comes back with it, and an event whose work is not the shard's latest is stale and
ignored (a copy cancelled by a drop, a repair overtaken by a newer one). Which running
or queued work a new action makes moot is :func:`cancels` and :func:`replaces`.
"""

from agents.shardsm.machine import choose_plan, reconcile, session_actions
from agents.shardsm.model import (
    LEGAL_TRANSITIONS,
    SYNC_ACTIONS,
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
    Serve,
    Session,
    SetServing,
    SetWritable,
    ShardAction,
    ShardEvent,
    ShardRecord,
    ShardReport,
    StartBootstrap,
    StartDrop,
    Synced,
    SyncFailed,
    Target,
    Transition,
)
from agents.shardsm.views import (
    cancels,
    distrust,
    plan_from,
    replaces,
    serve_of,
    serving,
    states,
    waiting_shards,
)
from shardkeeper.vocab import Role, ShardState

__all__ = [
    "LEGAL_TRANSITIONS",
    "Action",
    "AgentState",
    "BecomeReplica",
    "CatchUp",
    "CopyDone",
    "CopyFailed",
    "Decision",
    "Demote",
    "DropDone",
    "DropFailed",
    "Event",
    "Limits",
    "PeerLost",
    "Plan",
    "Promote",
    "PromoteFailed",
    "Promoted",
    "Repair",
    "ReportStatus",
    "Role",
    "SYNC_ACTIONS",
    "Serve",
    "Session",
    "SetServing",
    "SetWritable",
    "ShardAction",
    "ShardEvent",
    "ShardRecord",
    "ShardReport",
    "ShardState",
    "StartBootstrap",
    "StartDrop",
    "SyncFailed",
    "Synced",
    "Target",
    "Transition",
    "cancels",
    "choose_plan",
    "distrust",
    "plan_from",
    "reconcile",
    "replaces",
    "serve_of",
    "serving",
    "session_actions",
    "states",
    "waiting_shards",
]
