"""Admin commands: create the cluster, show its state (status, shards, config, events),
pause and resume moves, and manage ACLs. Requests are recorded under ``admin/``; the
leader carries them out. None of them writes a plan. Drain, undrain, move, rebalance and
the what-if live in ``steer``; `watch` in ``watch``."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import click

from shardkeeper import admin
from shardkeeper import cluster as clusterstate
from shardkeeper.cli.follow import latest_events
from shardkeeper.cli.options import (
    InputError,
    emit_json,
    operator_errors,
    zk_options,
    zk_session,
)
from shardkeeper.cli.term import exit_interrupted, interruptible
from shardkeeper.cli.view import status_text
from shardkeeper.config import KNOBS, ClusterConfig
from shardkeeper.layout import AuditEvent, Paths
from shardkeeper.summary import read_summary
from shardkeeper.vocab import ShardkeeperError
from shardkeeper.zk import AUTH_HINT, ZkTarget, acl_census, set_acl_tree


@click.command()
@zk_options
@click.option("--shards", type=int, required=True, help="Number of shards S (>= 1).")
@click.option("--replicas", type=int, required=True, help="Replicas per shard R (>= 1).")
@click.option("--force", is_flag=True,
              help="Change the replica count of an existing cluster (its policies are kept;"
              " the shard count never changes), or replace a damaged config.")
@operator_errors
def init(target: ZkTarget, paths: Paths, shards: int, replicas: int, force: bool) -> None:
    """Create the cluster's config (shards and replicas); a no-op if it exists as asked."""
    config = ClusterConfig(shards=shards, replicas=replicas)
    with zk_session(target, paths) as client:
        existing = admin.init_cluster(client, paths, config, overwrite=force)
        other_acl = target.credentials and set(client.get_acls(paths.root)[0]) != set(
            target.acl() or ())
    if other_acl:
        click.echo(f"note: cluster {paths.cluster!r} existed with another ACL: `shardkeeper acl"
                   " apply` gives its znodes the ACL of these credentials", err=True)
    if existing is not None and (existing.shards, existing.replicas) == (shards, replicas):
        # Idempotent, so that deployment scripts (docker compose) can run it every time.
        click.echo(f"cluster {paths.cluster!r} is already initialised: {shards} shards,"
                   f" {replicas} replicas per shard")
        return
    if existing is not None:
        raise ShardkeeperError(
            f"cluster {paths.cluster!r} already has a config ({existing.shards} shards,"
            f" {existing.replicas} replicas): pass --force to change the replica count"
            " (the shard count is fixed)"
        )
    click.echo(f"cluster {paths.cluster!r}: {shards} shards, {replicas} replicas per shard")


@click.command()
@zk_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@operator_errors
def status(target: ZkTarget, paths: Paths, as_json: bool) -> None:
    """Leader, epoch, plan generation, members (down ones too) and balance."""
    with zk_session(target, paths) as client:
        s = read_summary(client, paths)
    if as_json:
        emit_json(s)
    else:
        click.echo(status_text(s))


@click.command()
@zk_options
@click.option("--agent", default=None, help="Only shards with a replica on this agent.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@operator_errors
def shards(target: ZkTarget, paths: Paths, agent: str | None, as_json: bool) -> None:
    """Shard -> replicas, primary first."""
    with zk_session(target, paths) as client:
        clusterstate.read_config(client, paths)
        plan = clusterstate.read_plan(client, paths, complete=True)
    rows = [
        {"shard": shard, "replicas": list(replicas)}
        for shard, replicas in enumerate(plan.routing)
        if agent is None or agent in replicas
    ]
    if as_json:
        emit_json({"generation": plan.generation, "shards": rows})
        return
    if plan.meta is None:
        click.echo("no plan yet: is a coordinator running?")
        return
    click.echo(f"generation {plan.generation}")
    for r in rows:
        click.echo(f"{r['shard']:>6}  {' '.join(r['replicas']) or '(unplaced)'}")


@click.command()
@zk_options
@click.option("--note", default="", help="Why: shown by `shardkeeper status`.")
@operator_errors
def pause(target: ZkTarget, paths: Paths, note: str) -> None:
    """Enter maintenance mode: no moves; primaries of departed agents still fail over."""
    with zk_session(target, paths) as client:
        clusterstate.read_config(client, paths)
        current = admin.pause(client, paths, note)
    if current is None:
        click.echo("maintenance mode on: no moves until `shardkeeper resume`")
    else:
        click.echo(f"already in maintenance ({current.reason}: {current.note or 'no note'})")


@click.command()
@zk_options
@operator_errors
def resume(target: ZkTarget, paths: Paths) -> None:
    """Leave maintenance mode (manual or automatic): moves resume."""
    with zk_session(target, paths) as client:
        left = admin.resume(client, paths)
    click.echo("maintenance mode off: moves resume" if left else "not in maintenance mode")


@click.group()
def config() -> None:
    """Show or change the cluster's config and policies."""


@config.command("show")
@zk_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@operator_errors
def config_show(target: ZkTarget, paths: Paths, as_json: bool) -> None:
    """Every setting with its value and meaning."""
    with zk_session(target, paths) as client:
        cfg = clusterstate.read_config(client, paths)
    if as_json:
        emit_json(dataclasses.asdict(cfg))
        return
    for key, (_, _, _, meaning) in KNOBS.items():
        click.echo(f"{key:<26} {getattr(cfg, key)!s:<8} {meaning}")


@config.command("set")
@zk_options
@click.argument("settings", nargs=-1, required=True, metavar="KEY=VALUE...")
@operator_errors
def config_set(target: ZkTarget, paths: Paths, settings: tuple[str, ...]) -> None:
    """Change settings, e.g. `config set rebalance_delay=60 max_moves_total=32`."""
    parsed = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="SETTINGS")
        parsed[key.strip()] = value.strip()
    with zk_session(target, paths) as client:
        new = admin.set_config(client, paths, parsed)
    click.echo(", ".join(f"{k}={getattr(new, k)}" for k in parsed))


def render_event(e: AuditEvent) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time))
    return f"{stamp}  {e.kind:<20} {e.message}"


@click.command()
@zk_options
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events (Ctrl-C stops).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="How many of the latest events to show first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@operator_errors
def events(target: ZkTarget, paths: Paths, follow: bool, limit: int, as_json: bool) -> None:
    """The leader's audit log: leader changes, joins, departures, plans, drains, moves,
    maintenance."""

    def show(entries: list[tuple[str, AuditEvent]]) -> str:
        for _, e in entries:
            click.echo(json.dumps(e.to_json()) if as_json else render_event(e))
        return entries[-1][0] if entries else ""

    with zk_session(target, paths) as client:
        clusterstate.read_config(client, paths)
        last = show(latest_events(client, paths, limit))
        if not follow:
            return
        appended = threading.Event()
        with interruptible(appended) as stop:

            def on_children(_children: list[str]) -> bool:
                appended.set()
                return not stop.is_set()  # False removes the watch

            client.ChildrenWatch(paths.events, on_children)
            while not stop.is_set():
                appended.wait()
                appended.clear()
                if not stop.is_set():
                    last = show(admin.events(client, paths, after=last)) or last
    # Ctrl-C is how `events -f` ends: the session is closed by now, no traceback.
    exit_interrupted()


@click.group()
def acl() -> None:
    """Show or set the ACL of the cluster's znodes (ZooKeeper digest credentials)."""


@acl.command("show")
@zk_options
@operator_errors
def acl_show(target: ZkTarget, paths: Paths) -> None:
    """How many of the cluster's znodes carry each ACL (digest entries by user name)."""
    with zk_session(target, paths) as client:
        clusterstate.read_config(client, paths)
        census = acl_census(client, paths.root)
    for entries, count in sorted(census.items(), key=lambda item: -item[1]):
        click.echo(f"{count:>7} znodes  {' '.join(entries)}")


@acl.command("apply")
@zk_options
@operator_errors
def acl_apply(target: ZkTarget, paths: Paths) -> None:
    """Give the cluster's root and every znode below it an ACL that grants exactly the
    credentials given (all of them: repeat --zk-auth during a password rotation)."""
    acl_entries = target.acl()
    if acl_entries is None:
        raise InputError(f"acl apply needs the credentials to grant: {AUTH_HINT}")
    with zk_session(target, paths) as client:
        clusterstate.read_config(client, paths)
        changed = set_acl_tree(client, paths.root, acl_entries)
    users = ", ".join(c.user for c in target.credentials)
    click.echo(f"cluster {paths.cluster!r}: {changed} znodes changed; every znode now grants"
               f" all permissions to digest user(s) {users} only")


COMMANDS = (init, status, shards, pause, resume, config, events, acl)
