"""What the shell asks of the machine's state: what to serve, which work a new action
makes moot, and whether to act on a plan znode at all."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from agents.shardsm.model import (
    AgentState,
    CatchUp,
    Plan,
    Repair,
    Serve,
    ShardAction,
    ShardRecord,
    StartBootstrap,
    StartDrop,
    Target,
)
from shardkeeper.layout import Assignment
from shardkeeper.vocab import Role, ShardState


def distrust(offered: Plan, applied: Plan | None, *, epoch: int | None,
             committed: int | None) -> str | None:
    """Why the agent must not act on ``offered`` (it may drop data), or None to act on it.

    ``epoch`` is the epoch znode's version (the current leader's fencing number) and
    ``committed`` plan/meta's generation (the leader's commit point), None when they could
    not be read. A plan is trusted only if a leader that exists could have written it as
    part of a committed plan, and it is not older than the one applied: a forged or
    damaged znode with an absurd generation or epoch, or one written ahead of its commit,
    changes nothing.
    """
    if applied is not None and offered.generation < applied.generation:
        return (f"generation {offered.generation} is older than the applied"
                f" {applied.generation}")
    if applied is not None and offered.epoch < applied.epoch:
        return f"epoch {offered.epoch} is older than the applied plan's {applied.epoch}"
    if epoch is None or committed is None:
        return "the epoch or plan/meta cannot be read to check it"
    if offered.epoch > epoch:
        return f"epoch {offered.epoch} is past the current epoch {epoch}"
    if offered.generation > committed:
        return (f"generation {offered.generation} is past the committed generation"
                f" {committed} (plan/meta)")
    return None


def serving(agent: AgentState, me: str) -> dict[int, Serve]:
    """shard -> what the data plane serves for it, for the shards it serves at all.

    ``me`` is this agent's own address (a primary's route names itself)."""
    targets = agent.plan.targets if agent.plan else {}
    out: dict[int, Serve] = {}
    for shard, record in agent.shards.items():
        serve = serve_of(record, targets.get(shard), me)
        if serve is not None:
            out[shard] = serve
    return out


def serve_of(record: ShardRecord, target: Target | None, me: str) -> Serve | None:
    """What the data plane serves for one shard (None: nothing), from its record and its
    target alone: the shell rebuilds only the routes whose record or target changed."""
    if record.served is None:
        return None
    if record.served == ShardState.PRIMARY:
        if target is not None and target.role == Role.PRIMARY:
            in_sync, copying = target.peers, target.bootstrapping
        else:
            in_sync, copying = (), ()
        return Serve(ShardState.PRIMARY, record.term, me, in_sync, copying)
    if record.state == ShardState.PRIMARY:
        # Being promoted: it serves as a replica until Promoted, and names no primary,
        # so clients are told to retry (503) rather than sent back to the old primary,
        # which has been demoted and would send them here again.
        return Serve(record.served, record.term, None)
    return Serve(record.served, record.term, record.primary)


def cancels(new: ShardAction, running: ShardAction) -> bool:
    """Does issuing ``new`` for a shard stop the work ``running`` for it?

    A newer copy or a drop ends any copy; any newer action ends a repair, catch-up or
    promotion still retrying against a peer (perhaps a dead one, or one at an old address).
    A drop always finishes (its data is being put aside).
    """
    if isinstance(running, StartDrop):
        return False
    if isinstance(new, StartBootstrap | StartDrop):
        return True
    return not isinstance(running, StartBootstrap)


def replaces(new: ShardAction, queued: ShardAction) -> bool:
    """Does ``new`` make a queued, not yet started action for the same shard moot?"""
    if isinstance(new, StartBootstrap | StartDrop):
        return isinstance(queued, StartBootstrap | Repair | CatchUp)
    return isinstance(queued, Repair | CatchUp)


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


def target_of(assignment: Assignment, address_of: Callable[[str], str]) -> Target:
    """Pure: the state machine's target for one plan assignment (agent ids -> addresses)."""
    if assignment.role == Role.PRIMARY:
        return Target(
            Role.PRIMARY,
            term=assignment.term,
            peers=tuple(address_of(a) for a in assignment.peers),
            bootstrapping=tuple(address_of(a) for a in assignment.bootstrapping),
        )
    return Target(
        Role.REPLICA,
        term=assignment.term,
        source=address_of(assignment.source) if assignment.source else None,
        primary=address_of(assignment.primary) if assignment.primary else None,
    )


def referenced_agents(replicas: dict[int, Assignment]) -> set[str]:
    """Every agent id an AgentPlan names (whose address the shell needs)."""
    ids: set[str] = set()
    for a in replicas.values():
        ids.update(x for x in (a.primary, a.source) if x)
        ids.update(a.peers)
        ids.update(a.bootstrapping)
    return ids
