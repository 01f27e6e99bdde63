"""`shardkeeper agent run` and `shardkeeper coordinator run`: the two long-lived roles."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from shardkeeper.cli.options import (
    FiniteFloatRange,
    InputError,
    emit_json,
    operator_errors,
    writable_dir,
    zk_options,
)
from shardkeeper.layout import Paths, validate_name
from shardkeeper.process import LOG_FORMATS
from shardkeeper.vocab import ShardkeeperError
from shardkeeper.zk import ZkTarget, ZkTargetError, split_host_port

LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)


def log_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--log-level and --log-format of a long-lived role."""
    f = click.option("--log-format", type=click.Choice(LOG_FORMATS, case_sensitive=False),
                     default="text", show_default=True, envvar="SHARDKEEPER_LOG_FORMAT",
                     help="text, or json: one object per line (time, level, role, id,"
                     " logger, event, fields). Env: SHARDKEEPER_LOG_FORMAT.")(f)
    return click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True,
                        envvar="SHARDKEEPER_LOG_LEVEL",
                        help="The least severe messages logged. Env: SHARDKEEPER_LOG_LEVEL.")(f)
# ZooKeeper caps a session at its maxSessionTimeout (20 ticks by default) anyway.
SESSION_TIMEOUT = FiniteFloatRange(min=0.5, max=600)


def parse_listen(value: str) -> tuple[str, int]:
    try:
        return split_host_port(value.strip(), default_port=None, allow_zero=True)
    except ZkTargetError as e:
        raise InputError(f"--listen: {e}") from None


@click.group()
def agent() -> None:
    """Run an agent (one per host)."""


@agent.command("run")
@zk_options
@click.option("--id", "agent_id", required=True, help="Agent id, unique in the cluster.")
@click.option("--zone", default="", help="Failure zone (rack, AZ); replicas spread over zones.")
@click.option("--weight", type=FiniteFloatRange(min=0, min_open=True, max=1e6), default=1.0,
              show_default=True, help="Relative capacity.")
@click.option("--listen", required=True,
              help="HOST:PORT of the agent's data plane (port 0: any free port, which the"
              " agent then advertises in its member znode).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the agent's shard replicas (created if missing).")
@click.option("--session-timeout", type=SESSION_TIMEOUT, default=10.0,
              show_default=True, help="ZooKeeper session timeout in seconds.")
@click.option("--trash-keep", type=FiniteFloatRange(min=0, max=365 * 86400), default=86400.0,
              show_default=True, envvar="SHARDKEEPER_TRASH_KEEP",
              help="Seconds to keep a dropped replica's files in <data-dir>/trash before"
              " deleting them (0: delete at once). Env: SHARDKEEPER_TRASH_KEEP.")
@click.option("--handoff-timeout", type=FiniteFloatRange(min=0, max=20), default=10.0,
              show_default=True, envvar="SHARDKEEPER_HANDOFF_TIMEOUT",
              help="On SIGTERM, wait at most this many seconds for the leader to move the"
              " agent's primaries to in-sync replicas before closing its session (0: close"
              " it at once). Env: SHARDKEEPER_HANDOFF_TIMEOUT.")
@click.option("--open-stores", type=click.IntRange(1, 100_000), default=64,
              show_default=True, envvar="SHARDKEEPER_OPEN_STORES",
              help="Most shard stores kept open at once (one SQLite connection, ~150 KiB,"
              " each); the least recently used beyond it are closed and reopened on their"
              " next use. Env: SHARDKEEPER_OPEN_STORES.")
@log_options
@operator_errors
def agent_run(target: ZkTarget, paths: Paths, agent_id: str, zone: str, weight: float,
              listen: str, data_dir: Path, session_timeout: float, trash_keep: float,
              handoff_timeout: float, open_stores: int, log_level: str,
              log_format: str) -> None:
    """Register with the cluster and hold the replicas the plan gives this agent."""
    from agents.runtime import Agent, HealthServer
    from shardkeeper.process import run_until_signal, setup_logging

    try:
        validate_name("agent id", agent_id)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--id") from None
    writable_dir(data_dir, "--data-dir")
    host, port = parse_listen(listen)
    # Unbracketed, as the data plane splits an address at its last colon.
    setup_logging(log_level, log_format.lower(), "agent", agent_id)
    a = Agent(target, paths.cluster, agent_id, address=f"{host}:{port}", zone=zone,
              weight=weight, data_dir=data_dir, session_timeout=session_timeout,
              trash_keep=trash_keep, handoff_timeout=handoff_timeout, open_stores=open_stores)
    try:
        health = HealthServer(a, host, port)
    except OSError as e:
        raise ShardkeeperError(f"cannot listen on {listen}: {e.strerror or e}") from None
    if port == 0:
        a.set_address(health.plane.address)
    health.start()
    try:
        run_until_signal(a.run, a.stop)
    finally:
        health.stop()


DATA_DIR = click.option(
    "--data-dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
    required=True, help="The agent's data dir.")


@agent.group("trash")
def trash() -> None:
    """Dropped replicas the agent keeps for a while (see `agent run --trash-keep`).

    Restore and purge work on a stopped agent only (they take the data dir's lock)."""


@trash.command("list")
@DATA_DIR
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@operator_errors
def trash_list(data_dir: Path, as_json: bool) -> None:
    """Every trash entry: name, shard, when it was dropped, why, size."""
    import dataclasses
    import time

    from agents.trash import Trash

    entries = Trash(data_dir / "trash").entries()
    if as_json:
        emit_json([dataclasses.asdict(e) for e in entries])
        return
    if not entries:
        click.echo("the trash is empty")
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time))
        click.echo(f"{e.name}  shard {e.shard:<6} {when}  {e.bytes:>12,} B  {e.reason}")


@trash.command("restore")
@DATA_DIR
@click.argument("entry")
@operator_errors
def trash_restore(data_dir: Path, entry: str) -> None:
    """Put ENTRY's shard files back. On its next start the agent uses them if its plan
    places the shard here (move a replica here with `shardkeeper move` if needed)."""
    from agents.runtime import DataDirLock
    from agents.storeset import StoreSet
    from agents.trash import Trash, TrashError

    lock = DataDirLock(data_dir)
    try:
        found = next((e for e in Trash(data_dir / "trash").entries() if e.name == entry), None)
        if found is None:
            raise InputError(f"no trash entry {entry!r}: see `shardkeeper agent trash list`")
        target = StoreSet(data_dir / "shards").path_for(found.shard)
        try:
            Trash(data_dir / "trash").restore(entry, target)
        except TrashError as e:
            raise ShardkeeperError(str(e)) from None
    finally:
        lock.release()
    click.echo(f"restored shard {found.shard} to {target}")


@trash.command("purge")
@DATA_DIR
@click.option("--older-than", type=FiniteFloatRange(min=0), default=None,
              help="Only entries older than this many seconds (default: every entry).")
@operator_errors
def trash_purge(data_dir: Path, older_than: float | None) -> None:
    """Delete trash entries for good."""
    from agents.runtime import DataDirLock
    from agents.trash import Trash

    lock = DataDirLock(data_dir)
    try:
        gone = Trash(data_dir / "trash").purge(older_than=older_than or 0)
    finally:
        lock.release()
    click.echo(f"purged {len(gone)} entries")


@click.group()
def coordinator() -> None:
    """Run a coordinator candidate."""


@coordinator.command("run")
@zk_options
@click.option("--id", "candidate_id", default=None,
              help="Candidate id shown as leader. Default: HOSTNAME-PID.")
@click.option("--session-timeout", type=SESSION_TIMEOUT, default=10.0,
              show_default=True, help="ZooKeeper session timeout in seconds; bounds failover.")
@click.option("--liveness", default="127.0.0.1:0", show_default=True,
              envvar="SHARDKEEPER_LIVENESS",
              help="HOST:PORT where agents hold a connection to the leader, so that a crashed"
              " agent process fails over at once rather than at its session timeout (port 0:"
              " any free port; agents must be able to reach HOST). 'off' disables it."
              " Env: SHARDKEEPER_LIVENESS.")
@click.option("--http", "http", default=None, envvar="SHARDKEEPER_HTTP",
              help="HOST:PORT to serve the status page (/), /api/status, /api/shards,"
              " /api/events, /metrics, /healthz and /readyz on, without the token (port 0:"
              " any free port, logged). Default: not served. Env: SHARDKEEPER_HTTP.")
@log_options
@operator_errors
def coordinator_run(target: ZkTarget, paths: Paths, candidate_id: str | None,
                    session_timeout: float, liveness: str, http: str | None, log_level: str,
                    log_format: str) -> None:
    """Campaign for leadership; when leading, plan on every membership or config change."""
    import os

    from coordinator.leader import Coordinator
    from shardkeeper.process import run_until_signal, setup_logging

    cid = candidate_id or f"{socket.gethostname()}-{os.getpid()}"
    setup_logging(log_level, log_format.lower(), "coordinator", cid)
    link = None
    if liveness.strip().lower() != "off":
        try:
            link = split_host_port(liveness.strip(), default_port=None, allow_zero=True)
        except ZkTargetError as e:
            raise InputError(f"--liveness: {e}") from None
    c = Coordinator(target, paths.cluster, cid, session_timeout=session_timeout,
                    liveness=link)
    server = serve_http(http, c, target, paths) if http is not None else None
    try:
        run_until_signal(c.run, c.stop)
    finally:
        if server is not None:
            server.stop()


def serve_http(address: str, c: Any, target: ZkTarget, paths: Paths) -> Any:
    """Bind --http before campaigning, so that a bad address fails at once: exit 2 when it
    is malformed, 1 when it cannot be bound (in use, not ours)."""
    from coordinator.http import ClusterReader, StatusServer

    try:
        host, port = split_host_port(address.strip(), default_port=None, allow_zero=True)
    except ZkTargetError as e:
        raise InputError(f"--http: {e}") from None
    try:
        server = StatusServer(host, port, c.metrics, ClusterReader(target, paths))
    except OSError as e:
        raise ShardkeeperError(f"--http: cannot listen on {address.strip()}:"
                               f" {e.strerror or e}") from None
    return server.start()


COMMANDS = (agent, coordinator)
