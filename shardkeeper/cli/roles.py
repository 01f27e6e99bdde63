"""`shardkeeper agent run` and `shardkeeper coordinator run`: the two long-lived roles."""

from __future__ import annotations

import socket
from pathlib import Path

import click

from shardkeeper.cli.options import operator_errors, zk_options
from shardkeeper.layout import Paths, validate_name
from shardkeeper.vocab import ShardkeeperError
from shardkeeper.zk import ZkTarget


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}", param_hint="--listen")
    return host.strip("[]"), int(port)


@click.group()
def agent() -> None:
    """Run an agent (one per host)."""


@agent.command("run")
@zk_options
@click.option("--id", "agent_id", required=True, help="Agent id, unique in the cluster.")
@click.option("--zone", default="", help="Failure zone (rack, AZ); replicas spread over zones.")
@click.option("--weight", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="Relative capacity.")
@click.option("--listen", required=True, help="HOST:PORT of the agent's data plane.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the agent's shard replicas.")
@click.option("--session-timeout", type=click.FloatRange(min=0.5), default=10.0,
              show_default=True, help="ZooKeeper session timeout in seconds.")
@click.option("--log-level", default="info", show_default=True)
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
    host, port = parse_listen(listen)
    setup_logging(log_level)
    a = Agent(target, paths.cluster, agent_id, address=f"{host}:{port}", zone=zone,
              weight=weight, data_dir=data_dir, session_timeout=session_timeout)
    try:
        health = HealthServer(a, host, port)
    except OSError as e:
        raise ShardkeeperError(f"cannot listen on {listen}: {e.strerror}") from None
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
@click.option("--session-timeout", type=click.FloatRange(min=0.5), default=10.0,
              show_default=True, help="ZooKeeper session timeout in seconds; bounds failover.")
@click.option("--log-level", default="info", show_default=True)
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
