"""Steering commands: drain, undrain, move, rebalance, and `plan` (the what-if).

Each request is checked before anything is written: an agent the cluster has never seen
(not a member, not in the plan, not down within the hour) is refused with exit 2, so a
typo cannot drain nothing and report it drained. With ``--wait`` a command blocks until
the cluster has done what was asked, with a progress bar on stderr, and exits 1 on
timeout saying what is still pending and why; ``drain --dry-run`` and ``plan`` show what
would happen without writing anything.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from typing import Any

import click
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from shardkeeper import admin
from shardkeeper import cluster as clusterstate
from shardkeeper.cli.follow import Follower, Snapshot
from shardkeeper.cli.options import (
    FiniteFloatRange,
    InputError,
    emit_json,
    operator_errors,
    zk_options,
    zk_session,
)
from shardkeeper.cli.term import Progress, exit_interrupted, interruptible
from shardkeeper.config import ClusterConfig
from shardkeeper.layout import ROUTING_CHUNK, MemberInfo, MoveRequest, Paths, RoutingChunk
from shardkeeper.layout import validate_name as _validate_name
from shardkeeper.plan import PlanState
from shardkeeper.summary import (
    down_since,
    drain_pending,
    live_members,
    move_pending,
    rebalance_pending,
    undrain_pending,
)
from shardkeeper.vocab import CorruptZnode, ShardkeeperError
from shardkeeper.zk import ZkTarget

DEFAULT_WAIT = 600.0


def check_agent_name(agent_id: str, hint: str = "AGENT") -> str:
    try:
        return _validate_name("agent id", agent_id)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=hint) from None


def wait_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--timeout", type=FiniteFloatRange(min=0), default=DEFAULT_WAIT, show_default=True,
        help="With --wait: give up after this many seconds, exit 1 and say what is still"
        " pending (0: wait as long as it takes).")(f)
    return click.option(
        "--wait", is_flag=True,
        help="Block until the cluster has done it, with a progress bar on stderr; exit 0"
        " when done, 1 on timeout.")(f)


# -- what the cluster knows ------------------------------------------------------------

def known_agents(client: KazooClient, paths: Paths) -> set[str]:
    """Every agent the cluster has seen lately: members, status reporters, agents in the
    plan (as members, holders or plan znodes), and agents down within the hour. Reads
    damaged plan znodes tolerantly: a damaged plan must not stop an operator's drain."""
    stored = clusterstate.read_stored_plan(client, paths)
    known = set(clusterstate.read_members(client, paths, skip_corrupt=True))
    known |= set(clusterstate.read_statuses(client, paths))
    known |= set(stored.agents)
    for chunk in stored.chunks.values():
        known |= {a for row in chunk.replicas for a in row}
        known |= {a for pairs in chunk.bootstrapping.values() for a, _ in pairs}
    if stored.meta is not None:
        known |= set(stored.meta.members)
        known |= set(down_since(PlanState(meta=stored.meta)))
    return known


def require_known(agent: str, known: Collection[str], paths: Paths) -> None:
    if agent in known:
        return
    listed = ", ".join(sorted(known)[:10]) + (" ..." if len(known) > 10 else "")
    raise InputError(
        f"no agent {agent!r} in cluster {paths.cluster!r}: it is not a member, the plan does"
        f" not name it and it has not been down within the hour (known: {listed or 'none'});"
        " nothing was written")


# -- waiting -----------------------------------------------------------------------------

Check = Callable[[Snapshot], tuple[list[str], int, int]]


def wait_until(client: KazooClient, paths: Paths, check: Check, *, label: str,
               timeout: float, what: str, after_event: str | None = None) -> float:
    """Follow the cluster until ``check`` finds nothing pending; returns the seconds it
    took. ``check`` returns (what is pending and why, done, total) for the progress bar.
    Timeout: ShardkeeperError (exit 1) naming what is pending. Ctrl-C: exit 130.
    ``after_event``: audit events after this znode name count as new."""
    t0 = time.monotonic()
    deadline = t0 + timeout if timeout else None
    wake = threading.Event()
    reasons = ["nothing read from the cluster yet"]
    with interruptible(wake) as stop:
        follower = Follower(client, paths, wake)
        if after_event is not None:
            follower.last_event = after_event
        progress = Progress(label)
        try:
            for snap, fresh in follower.updates(stop, deadline):
                if not fresh:
                    continue
                if snap.summary is None:
                    reasons = [snap.error]
                    continue
                reasons, done, total = check(snap)
                progress.update(done, total, reasons[0] if reasons else "done",
                                final=not reasons)
                if not reasons:
                    return time.monotonic() - t0
        finally:
            follower.close()
            progress.close()
    if stop.is_set():
        exit_interrupted(f"stopped waiting: {what} goes on (`shardkeeper watch` follows it)")
    raise ShardkeeperError(f"timed out after {timeout:g}s: {brief(reasons)}")


def brief(reasons: list[str], most: int = 3) -> str:
    """The first reasons, for a one-line error (`watch` shows them all)."""
    more = len(reasons) - most
    return "; ".join(reasons[:most]) + (f"; and {more} more (`shardkeeper watch` shows"
                                        " them)" if more > 0 else "")


def _row(summary: dict[str, Any], agent: str) -> dict[str, Any] | None:
    return next((m for m in summary["members"] if m["id"] == agent), None)


def last_event_name(client: KazooClient, paths: Paths) -> str:
    try:
        return max(client.get_children(paths.events), default="")
    except NoNodeError:
        return ""


# -- the what-if -------------------------------------------------------------------------

def parse_add(text: str) -> MemberInfo:
    """ID[:ZONE[:WEIGHT]] of `plan --add`."""
    agent, _, rest = text.partition(":")
    zone, _, weight_text = rest.partition(":")
    check_agent_name(agent, "--add")
    if len(zone) > 64:
        raise click.BadParameter(f"zone {zone[:20]!r}... is longer than 64", param_hint="--add")
    weight = parse_weight(weight_text, "--add") if weight_text else 1.0
    return MemberInfo(agent, "", zone, weight)


def parse_weight(text: str, hint: str) -> float:
    try:
        return FiniteFloatRange(min=0, min_open=True, max=1e6).convert(text, None, None)
    except click.BadParameter as e:
        raise click.BadParameter(f"weight {e.message}", param_hint=hint) from None


def read_what_if(client: KazooClient, paths: Paths, config: ClusterConfig,
                 drain: tuple[str, ...] = (), remove: tuple[str, ...] = (),
                 add: tuple[MemberInfo, ...] = (),
                 weight: tuple[tuple[str, float], ...] = ()) -> dict[str, Any]:
    """Read the live cluster and compute the what-if (refusing unknown agents: exit 2)."""
    from shardkeeper.cli.whatif import Change, what_if

    plan = clusterstate.read_plan(client, paths)
    if plan.meta is None:
        raise ShardkeeperError("no plan yet: start a coordinator and agents first")
    members = live_members(plan, clusterstate.read_members(client, paths, skip_corrupt=True))
    known = known_agents(client, paths)
    for agent in drain + remove:
        require_known(agent, known, paths)
    for m in add:
        if m.id in members:
            raise InputError(f"--add {m.id}: already a member of cluster {paths.cluster!r}")
        if m.id in remove:
            raise InputError(f"--add {m.id} and --remove {m.id} contradict each other")
    added = {m.id for m in add}
    for agent, _ in weight:
        if agent not in members and agent not in added:
            raise InputError(f"--weight {agent}: not a member of cluster {paths.cluster!r}"
                             " (nor added with --add)")
    change = Change(drain, remove, add, weight)
    return what_if(config, plan, members, clusterstate.read_statuses(client, paths),
                   admin.draining(client, paths), admin.maintenance(client, paths), change)


def show_what_if(doc: dict[str, Any], as_json: bool) -> None:
    from shardkeeper.cli.whatif import render

    if as_json:
        emit_json(doc)
    else:
        click.echo(render(doc))


@click.command("plan")
@zk_options
@click.option("--drain", "drains", multiple=True, metavar="AGENT",
              help="What if AGENT were drained (repeatable).")
@click.option("--remove", "removes", multiple=True, metavar="AGENT",
              help="What if AGENT left for good, e.g. a dead host (repeatable).")
@click.option("--add", "adds", multiple=True, metavar="ID[:ZONE[:WEIGHT]]",
              help="What if a new agent joined (repeatable).")
@click.option("--weight", "weights", multiple=True, metavar="AGENT=WEIGHT",
              help="What if AGENT's weight changed (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@operator_errors
def plan(target: ZkTarget, paths: Paths, drains: tuple[str, ...], removes: tuple[str, ...],
         adds: tuple[str, ...], weights: tuple[str, ...], as_json: bool) -> None:
    """What-if: the moves, primary changes, balance, shortfall and shards at risk that
    draining, removing, adding agents or changing weights would cause, computed by the
    leader's placement and reconcile code on the live cluster. Writes nothing."""
    for agent in drains + removes:
        check_agent_name(agent, "--drain/--remove")
    added = tuple(parse_add(text) for text in adds)
    changed = []
    for item in weights:
        agent, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"expected AGENT=WEIGHT, got {item!r}",
                                     param_hint="--weight")
        changed.append((check_agent_name(agent, "--weight"), parse_weight(value, "--weight")))
    with zk_session(target, paths) as client:
        config = clusterstate.read_config(client, paths)
        doc = read_what_if(client, paths, config, drains, removes, added, tuple(changed))
    show_what_if(doc, as_json)


# -- drain, undrain ------------------------------------------------------------------------

@click.command()
@zk_options
@click.argument("agent_id", metavar="AGENT")
@click.option("--dry-run", is_flag=True,
              help="Show what the drain would do (as `shardkeeper plan --drain AGENT`) and"
              " write nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print JSON.")
@wait_options
@operator_errors
def drain(target: ZkTarget, paths: Paths, agent_id: str, dry_run: bool, as_json: bool,
          wait: bool, timeout: float) -> None:
    """Move every replica off AGENT, make-before-break, then report it drained."""
    check_agent_name(agent_id)
    with zk_session(target, paths) as client:
        config = clusterstate.read_config(client, paths)
        if dry_run:
            show_what_if(read_what_if(client, paths, config, drain=(agent_id,)), as_json)
            return
        require_known(agent_id, known_agents(client, paths), paths)
        members = clusterstate.read_members(client, paths, skip_corrupt=True)
        new = admin.drain(client, paths, agent_id)
        note = "" if agent_id in members else f" (note: {agent_id} is not a member now)"
        click.echo(f"{agent_id} {'is now' if new else 'was already'} draining{note}")
        if not wait:
            click.echo("`shardkeeper drain --wait` or `shardkeeper watch` follows its replicas"
                       " leaving; `shardkeeper events` says when it is done")
            return
        start: dict[str, int] = {}

        def check(snap: Snapshot) -> tuple[list[str], int, int]:
            row = _row(snap.summary, agent_id) or {"replicas": 0}
            total = start.setdefault("total", max(row["replicas"], 1))
            return (drain_pending(snap.summary, agent_id),
                    total - min(total, row["replicas"]), total)

        took = wait_until(client, paths, check, label=f"draining {agent_id}",
                          timeout=timeout, what="the drain")
    click.echo(f"{agent_id} is drained ({start.get('total', 0)} replicas moved in"
               f" {took:.1f}s): it can be stopped")


@click.command()
@zk_options
@click.argument("agent_id", metavar="AGENT")
@wait_options
@operator_errors
def undrain(target: ZkTarget, paths: Paths, agent_id: str, wait: bool, timeout: float) -> None:
    """Let AGENT receive replicas again."""
    check_agent_name(agent_id)
    with zk_session(target, paths) as client:
        clusterstate.read_config(client, paths)
        if agent_id not in admin.draining(client, paths):
            require_known(agent_id, known_agents(client, paths), paths)
        removed = admin.undrain(client, paths, agent_id)
        click.echo(f"{agent_id} {'is no longer' if removed else 'was not'} draining")
        if not (wait and removed):
            return

        def check(snap: Snapshot) -> tuple[list[str], int, int]:
            progress = snap.summary["progress"]
            reasons = undrain_pending(snap.summary, agent_id)
            # Until the leader takes the undrain up, the target is the old one.
            taken = agent_id not in snap.summary["leader_view"]["draining"]
            return reasons, progress["in_place"] if taken else 0, progress["target"]

        took = wait_until(client, paths, check, label=f"undraining {agent_id}",
                          timeout=timeout, what="the rebalance")
    click.echo(f"{agent_id} takes replicas again: the cluster is rebalanced ({took:.1f}s)")


# -- rebalance, move ---------------------------------------------------------------------

@click.command()
@zk_options
@wait_options
@operator_errors
def rebalance(target: ZkTarget, paths: Paths, wait: bool, timeout: float) -> None:
    """Re-plan now: re-replicate departed agents' replicas without waiting out the delay."""
    with zk_session(target, paths) as client:
        clusterstate.read_config(client, paths)
        before = last_event_name(client, paths)
        admin.request_rebalance(client, paths)
        click.echo("rebalance requested")
        if not wait:
            return
        seen: list[bool] = []

        def check(snap: Snapshot) -> tuple[list[str], int, int]:
            seen.extend(True for e in snap.events if e.kind == "rebalance")
            progress = snap.summary["progress"]
            if not seen:
                return ["the leader has not taken up the request yet"
                        + ("" if snap.summary["leader"] else ": no coordinator is running")
                        ], 0, progress["target"]
            return rebalance_pending(snap.summary), progress["in_place"], progress["target"]

        took = wait_until(client, paths, check, label="rebalancing", timeout=timeout,
                          what="the rebalance", after_event=before)
    click.echo(f"rebalanced: fully replicated, nothing in flight ({took:.1f}s)")


def shard_row(client: KazooClient, paths: Paths, shard: int
              ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(in-sync replicas, agents copying) of one shard, from its routing chunk."""
    path = paths.routing_chunk(shard // ROUTING_CHUNK)
    try:
        data, _ = client.get(path)
        chunk = RoutingChunk.decode(path, data)
        index = shard - chunk.first
        return (chunk.replicas[index] if 0 <= index < len(chunk.replicas) else (),
                tuple(a for a, _ in chunk.bootstrapping.get(shard, ())))
    except (NoNodeError, CorruptZnode):
        return (), ()  # being rewritten or repaired: the next read tells


@click.command()
@zk_options
@click.argument("shard", type=click.IntRange(min=0))
@click.option("--from", "source", required=True, help="Agent that holds the replica now.")
@click.option("--to", "dest", required=True, help="Agent that should hold it.")
@wait_options
@operator_errors
def move(target: ZkTarget, paths: Paths, shard: int, source: str, dest: str, wait: bool,
         timeout: float) -> None:
    """Move one replica of SHARD from one agent to another (make-before-break)."""
    from coordinator.policy import apply_moves

    check_agent_name(source, "--from")
    check_agent_name(dest, "--to")
    if source == dest:
        raise click.BadParameter("--from and --to name the same agent", param_hint="--to")
    request = MoveRequest(shard, source, dest)
    with zk_session(target, paths) as client:
        config = clusterstate.read_config(client, paths)
        if not 0 <= shard < config.shards:
            raise InputError(f"no shard {shard}: shards are 0..{config.shards - 1}")
        known = known_agents(client, paths)
        for agent in (source, dest):
            require_known(agent, known, paths)
        plan = clusterstate.read_plan(client, paths)
        if plan.meta is None:
            raise ShardkeeperError("no plan yet: start a coordinator and agents first")
        live = clusterstate.read_members(client, paths, skip_corrupt=True)
        # The leader's own acceptance test, on the stored target: refused here, nothing
        # is written (the leader checks again when it takes the request up).
        _, (outcome,) = apply_moves(plan.targets, [("request", request)], live,
                                    admin.draining(client, paths))
        if not outcome.accepted:
            raise InputError(f"cannot move shard {shard} from {source} to {dest}:"
                             f" {outcome.reason}; nothing was written")
        before = last_event_name(client, paths)
        name = admin.request_move(client, paths, request).rsplit("/", 1)[-1]
        click.echo(f"requested {name}: move shard {shard} from {source} to {dest}")
        if not wait:
            click.echo("`shardkeeper move --wait` waits for it; the leader logs the outcome"
                       " in `shardkeeper events`")
            return
        refused: list[str] = []

        def check(snap: Snapshot) -> tuple[list[str], int, int]:
            for e in snap.events:
                if e.kind == "move-refused" and e.message.startswith(name + " "):
                    refused.append(e.message.split(" refused: ", 1)[-1])
            if refused:
                return [], 1, 1
            if client.exists(f"{paths.moves}/{name}"):
                return ["the leader has not taken up the request yet"
                        + ("" if snap.summary["leader"] else ": no coordinator is running")
                        ], 0, 1
            reasons = move_pending(snap.summary, shard, source, dest,
                                   shard_row(client, paths, shard))
            return reasons, 0 if reasons else 1, 1

        took = wait_until(client, paths, check, label=f"moving shard {shard}",
                          timeout=timeout, what="the move", after_event=before)
    if refused:
        raise ShardkeeperError(f"the leader refused the move: {refused[0]}")
    click.echo(f"shard {shard} moved from {source} to {dest} ({took:.1f}s)")


COMMANDS = (plan, drain, undrain, rebalance, move)
