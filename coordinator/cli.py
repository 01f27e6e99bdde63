"""`shardkeeper`: the admin CLI, and the entry point of the agent and coordinator roles.

Every command takes --zk and --cluster (or SHARDKEEPER_ZK / SHARDKEEPER_CLUSTER). Errors
meant for the operator are printed on one line and exit non-zero, without a traceback.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import click
from kazoo.exceptions import NodeExistsError

from coordinator import cluster as clusterstate
from coordinator.cliutil import emit_json, operator_errors, zk_options
from coordinator.config import ClusterConfig, ConfigError
from coordinator.devcluster import dev
from coordinator.layout import Paths, validate_name
from coordinator.summary import summarize
from coordinator.zk import ShardkeeperError, close, connect, ensure_layout


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}", param_hint="--listen")
    return host.strip("[]"), int(port)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shardkeeper")
def main() -> None:
    """shardkeeper: a ZooKeeper-coordinated cluster manager.

    Agents hold shard replicas; an elected coordinator plans which agent holds which;
    this CLI shows and steers the cluster.
    """
    # kazoo logs each failed connection attempt; admin commands report one clear error
    # instead. `agent run` and `coordinator run` configure logging for themselves.
    logging.getLogger("kazoo").setLevel(logging.CRITICAL)


@main.command()
@zk_options
@click.option("--shards", type=int, required=True, help="Number of shards S (>= 1).")
@click.option("--replicas", type=int, required=True, help="Replicas per shard R (>= 1).")
@click.option("--force", is_flag=True, help="Overwrite an existing config.")
@operator_errors
def init(zk_hosts: str, paths: Paths, shards: int, replicas: int, force: bool) -> None:
    """Create the cluster's config (shards and replicas)."""
    try:
        config = ClusterConfig(shards=shards, replicas=replicas)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    client = connect(zk_hosts)
    try:
        ensure_layout(client, paths)
        try:
            client.create(paths.config, config.encode())
        except NodeExistsError:
            if not force:
                raise ShardkeeperError(
                    f"cluster {paths.cluster!r} already has a config"
                    f" ({clusterstate.read_config(client, paths)}): pass --force to overwrite"
                ) from None
            client.set(paths.config, config.encode())
    finally:
        close(client)
    click.echo(f"cluster {paths.cluster!r}: {shards} shards, {replicas} replicas per shard")


def read_summary(zk_hosts: str, paths: Paths) -> dict[str, Any]:
    client = connect(zk_hosts)
    try:
        config = clusterstate.read_config(client, paths)
        _, epoch = clusterstate.read_leader(client, paths)
        return summarize(
            cluster=paths.cluster,
            leader=clusterstate.current_leader(client, paths),
            epoch=epoch,
            shards=config.shards,
            replicas=config.replicas,
            plan=clusterstate.read_plan(client, paths),
            members=clusterstate.read_members(client, paths, skip_corrupt=True),
            statuses=clusterstate.read_statuses(client, paths),
        )
    finally:
        close(client)


def render_status(s: dict[str, Any]) -> str:
    lines = [
        f"cluster {s['cluster']}  leader {s['leader'] or '(none)'}  epoch {s['epoch']}"
        f"  generation {s['generation']}",
        f"shards {s['shards']}  replicas {s['replicas']}  under-replicated {s['under_replicated']}"
        f"  balance {s['balance']:.3f} (max/mean replicas per member)",
    ]
    if s["shortfall"]:
        lines.append(f"shortfall {s['shortfall']} replicas: fewer members than replicas")
    header = ("MEMBER", "ZONE", "WEIGHT", "REPLICAS", "PRIMARIES", "APPLIED", "ADDRESS")
    rows = [header] + [
        (m["id"], m["zone"] or "-", f"{m['weight']:g}", str(m["replicas"]), str(m["primaries"]),
         str(m["applied_generation"] if m["applied_generation"] is not None else "-"),
         m["address"])
        for m in s["members"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if not s["members"]:
        lines.append("(no members: start agents with `shardkeeper agent run`)")
    return "\n".join(lines)


@main.command()
@zk_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@operator_errors
def status(zk_hosts: str, paths: Paths, as_json: bool) -> None:
    """Leader, epoch, plan generation, members and balance."""
    s = read_summary(zk_hosts, paths)
    if as_json:
        emit_json(s)
    else:
        click.echo(render_status(s))


@main.command()
@zk_options
@click.option("--agent", default=None, help="Only shards with a replica on this agent.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@operator_errors
def shards(zk_hosts: str, paths: Paths, agent: str | None, as_json: bool) -> None:
    """Shard -> replicas, primary first."""
    client = connect(zk_hosts)
    try:
        clusterstate.read_config(client, paths)
        plan = clusterstate.read_plan(client, paths)
    finally:
        close(client)
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


@main.group()
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
def agent_run(zk_hosts: str, paths: Paths, agent_id: str, zone: str, weight: float, listen: str,
              data_dir: Path, session_timeout: float, log_level: str) -> None:
    """Register with the cluster and hold the replicas the plan gives this agent."""
    from agents.runtime import Agent, HealthServer
    from coordinator.process import run_until_signal, setup_logging

    try:
        validate_name("agent id", agent_id)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--id") from None
    host, port = parse_listen(listen)
    setup_logging(log_level)
    a = Agent(zk_hosts, paths.cluster, agent_id, address=f"{host}:{port}", zone=zone,
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


@main.group()
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
def coordinator_run(zk_hosts: str, paths: Paths, candidate_id: str | None,
                    session_timeout: float, log_level: str) -> None:
    """Campaign for leadership; when leading, plan on every membership or config change."""
    import os

    from coordinator.leader import Coordinator
    from coordinator.process import run_until_signal, setup_logging

    setup_logging(log_level)
    cid = candidate_id or f"{socket.gethostname()}-{os.getpid()}"
    c = Coordinator(zk_hosts, paths.cluster, cid, session_timeout=session_timeout)
    run_until_signal(c.run, c.stop)


main.add_command(dev)

if __name__ == "__main__":
    main()
