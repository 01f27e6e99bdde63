"""`shardkeeper agent run` and `shardkeeper coordinator run`: the two long-lived roles."""

from __future__ import annotations

import socket
from pathlib import Path

import click

from shardkeeper.cli.options import (
    FiniteFloatRange,
    InputError,
    operator_errors,
    writable_dir,
    zk_options,
)
from shardkeeper.layout import Paths, validate_name
from shardkeeper.vocab import ShardkeeperError
from shardkeeper.zk import ZkTarget, ZkTargetError, split_host_port

LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)
# ZooKeeper caps a session at its maxSessionTimeout (20 ticks by default) anyway.
SESSION_TIMEOUT = FiniteFloatRange(min=0.5, max=600)


def parse_listen(value: str) -> tuple[str, int]:
    try:
        return split_host_port(value.strip(), default_port=None)
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
@click.option("--listen", required=True, help="HOST:PORT of the agent's data plane.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the agent's shard replicas (created if missing).")
@click.option("--session-timeout", type=SESSION_TIMEOUT, default=10.0,
              show_default=True, help="ZooKeeper session timeout in seconds.")
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True)
@operator_errors
def agent_run(target: ZkTarget, paths: Paths, agent_id: str, zone: str, weight: float,
              listen: str, data_dir: Path, session_timeout: float, log_level: str) -> None:
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
    setup_logging(log_level)
    a = Agent(target, paths.cluster, agent_id, address=f"{host}:{port}", zone=zone,
              weight=weight, data_dir=data_dir, session_timeout=session_timeout)
    try:
        health = HealthServer(a, host, port)
    except OSError as e:
        raise ShardkeeperError(f"cannot listen on {listen}: {e.strerror or e}") from None
    health.start()
    try:
        run_until_signal(a.run, a.stop)
    finally:
        health.stop()


@click.group()
def coordinator() -> None:
    """Run a coordinator candidate."""


@coordinator.command("run")
@zk_options
@click.option("--id", "candidate_id", default=None,
              help="Candidate id shown as leader. Default: HOSTNAME-PID.")
@click.option("--session-timeout", type=SESSION_TIMEOUT, default=10.0,
              show_default=True, help="ZooKeeper session timeout in seconds; bounds failover.")
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True)
@operator_errors
def coordinator_run(target: ZkTarget, paths: Paths, candidate_id: str | None,
                    session_timeout: float, log_level: str) -> None:
    """Campaign for leadership; when leading, plan on every membership or config change."""
    import os

    from coordinator.leader import Coordinator
    from shardkeeper.process import run_until_signal, setup_logging

    setup_logging(log_level)
    cid = candidate_id or f"{socket.gethostname()}-{os.getpid()}"
    c = Coordinator(target, paths.cluster, cid, session_timeout=session_timeout)
    run_until_signal(c.run, c.stop)


COMMANDS = (agent, coordinator)
