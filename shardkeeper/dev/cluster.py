"""`shardkeeper dev`: a local cluster in the background, for trying the product.

`dev up` starts ZooKeeper (unless --zk names one), writes the config, and starts the
coordinator candidates and agents as detached processes. Their pids, logs and data live
under the state directory (default `.shardkeeper-dev/`), so that `dev status`, `dev kill`
and `dev down` work from any later shell.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import click

from shardkeeper import admin
from shardkeeper import cluster as clusterstate
from shardkeeper.cli.options import (
    DEFAULT_CLUSTER,
    FiniteFloatRange,
    auth_options,
    build_target,
    emit_json,
    operator_errors,
    read_credentials,
    writable_dir,
    write_credentials,
)
from shardkeeper.cli.term import interruptible
from shardkeeper.config import ClusterConfig
from shardkeeper.dev.zkserver import ZkServer, free_port
from shardkeeper.layout import Paths
from shardkeeper.poll import poll_until
from shardkeeper.process import cli_command, spawn
from shardkeeper.vocab import ShardkeeperError
from shardkeeper.zk import Credential, ZkTarget, close, connect

DEFAULT_DIR = Path(".shardkeeper-dev")
STATE_FILE = "state.json"
AUTH_FILE = "zk-auth"


@dataclass
class Proc:
    name: str
    role: str  # zookeeper, coordinator or agent
    pid: int
    log: str
    address: str = ""
    zone: str = ""  # agents: what `dev start` restarts them with
    weight: float = 1.0


@dataclass
class DevState:
    zk: str
    cluster: str
    session_timeout: float
    processes: list[Proc] = field(default_factory=list)
    # The ZooKeeper credentials' file (mode 0600 under the state directory), "" without:
    # the processes get its path, never the password itself, so `ps` does not show it.
    zk_auth_file: str = ""

    def target(self) -> ZkTarget:
        auth = read_credentials(Path(self.zk_auth_file)) if self.zk_auth_file else ()
        return ZkTarget.parse(self.zk, auth)

    def zk_args(self) -> tuple[str, ...]:
        auth = ("--zk-auth-file", self.zk_auth_file) if self.zk_auth_file else ()
        return ("--zk", self.zk, "--cluster", self.cluster, *auth)

    def save(self, root: Path) -> None:
        (root / STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, root: Path) -> DevState:
        try:
            obj = json.loads((root / STATE_FILE).read_text())
        except (FileNotFoundError, NotADirectoryError):
            raise ShardkeeperError(
                f"no dev cluster in {root}: start one with `shardkeeper dev up`"
            ) from None
        except (OSError, ValueError) as e:
            raise ShardkeeperError(f"cannot read {root / STATE_FILE}: {e}") from None
        try:
            obj["processes"] = [Proc(**p) for p in obj["processes"]]
            return cls(**obj)
        except (TypeError, KeyError) as e:
            raise ShardkeeperError(f"{root / STATE_FILE} is damaged ({e}): remove {root}"
                                   " after stopping what it started") from None

    def proc(self, name: str) -> Proc:
        for p in self.processes:
            if p.name == name:
                return p
        names = ", ".join(p.name for p in self.processes)
        raise ShardkeeperError(f"no process {name!r} in the dev cluster (have: {names})")


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def port_in_use(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_agent(root: Path, state: DevState, name: str, zone: str = "", weight: float = 1.0,
                port: int | None = None) -> Proc:
    """Start an agent in the background; ``port``: its data plane's (default: a free one)."""
    port = port or free_port()
    log = root / "logs" / f"{name}.log"
    argv = cli_command(
        "agent", "run", *state.zk_args(), "--id", name,
        "--listen", f"127.0.0.1:{port}", "--data-dir", str(root / "data" / name),
        "--session-timeout", str(state.session_timeout), "--zone", zone,
        "--weight", f"{weight:g}",
    )
    p = spawn(argv, log, detach=True)
    return Proc(name, "agent", p.pid, str(log), f"127.0.0.1:{port}", zone, weight)


def start_coordinator(root: Path, state: DevState, name: str, port: int | None = None) -> Proc:
    """A coordinator candidate serving its status page, /api/status and /metrics on
    127.0.0.1:``port`` (a free port when None)."""
    log = root / "logs" / f"{name}.log"
    port = port or free_port()
    argv = cli_command(
        "coordinator", "run", *state.zk_args(), "--id", name,
        "--session-timeout", str(state.session_timeout), "--http", f"127.0.0.1:{port}",
    )
    p = spawn(argv, log, detach=True)
    return Proc(name, "coordinator", p.pid, str(log), f"127.0.0.1:{port}")


def page_url(proc: Proc) -> str:
    """The status page of a coordinator of the dev cluster ("" for other processes)."""
    return f"http://{proc.address}/" if proc.role == "coordinator" and proc.address else ""


def up(root: Path, *, agents: int, shards: int, replicas: int, coordinators: int,
       zk: str | None, zk_port: int, cluster: str, session_timeout: float,
       credentials: tuple[Credential, ...] = ()) -> DevState:
    if (root / STATE_FILE).exists():
        old = DevState.load(root)
        if any(alive(p.pid) for p in old.processes):
            raise ShardkeeperError(
                f"a dev cluster is already running from {root}: `shardkeeper dev down` first"
            )
    config = ClusterConfig(shards=shards, replicas=replicas)
    writable_dir(root, "--dir")
    state = DevState(zk=zk or f"127.0.0.1:{zk_port}", cluster=cluster,
                     session_timeout=session_timeout)
    if credentials:
        state.zk_auth_file = str(write_credentials(root / AUTH_FILE, credentials))
    if zk is None:
        server = ZkServer(data_dir=(root / "zookeeper").resolve(), client_port=zk_port,
                          tick_ms=250)
        if port_in_use(zk_port):
            raise ShardkeeperError(
                f"port {zk_port} is in use: pass --zk-port, or --zk to use that ZooKeeper"
            )
        server.start(detach=True)
        state.processes.append(Proc("zookeeper", "zookeeper", server.process.pid,
                                    str(server.data_dir / "zookeeper.log"), server.address))
        state.save(root)
        server.wait_ready()
    paths = Paths(cluster)
    client = connect(state.target())
    try:
        admin.init_cluster(client, paths, config, overwrite=True)
        for i in range(1, coordinators + 1):
            state.processes.append(start_coordinator(root, state, f"coordinator-{i}"))
        names = {f"agent-{i}" for i in range(1, agents + 1)}
        for name in sorted(names):
            state.processes.append(start_agent(root, state, name))
        state.save(root)
        def settled() -> bool:
            """every agent to hold what its plan says"""
            return clusterstate.settled(client, paths, names)

        poll_until(settled, 120, "the cluster to converge")
    finally:
        close(client)
    return state


def down(root: Path, timeout: float = 10.0) -> list[str]:
    """SIGTERM agents, then coordinators, then ZooKeeper; SIGKILL what lingers.

    Data (ZooKeeper's and the agents') is removed; logs stay in ``<root>/logs``.
    """
    state = DevState.load(root)
    order = {"agent": 0, "coordinator": 1, "zookeeper": 2}
    stopped = []
    for p in sorted(state.processes, key=lambda p: order[p.role]):
        if not alive(p.pid):
            continue
        os.kill(p.pid, signal.SIGTERM)
        try:
            poll_until(lambda p=p: not alive(p.pid), timeout, f"{p.name} to exit")
        except ShardkeeperError:
            os.kill(p.pid, signal.SIGKILL)
        stopped.append(p.name)
    (root / STATE_FILE).unlink()
    # A dev cluster is throw-away: the next `dev up` starts from an empty ZooKeeper.
    for sub in ("zookeeper", "data"):
        shutil.rmtree(root / sub, ignore_errors=True)
    (root / AUTH_FILE).unlink(missing_ok=True)
    return stopped


def restart(root: Path, name: str) -> Proc:
    """Start a stopped process of the dev cluster again, with its data: an agent keeps its
    id, zone, weight, data dir and (when still free) its port; ZooKeeper its data."""
    state = DevState.load(root)
    old = state.proc(name)
    if alive(old.pid):
        raise ShardkeeperError(f"{name} (pid {old.pid}) is running: `shardkeeper dev kill"
                               f" {name}` first")
    if old.role == "agent":
        port = int(old.address.rsplit(":", 1)[1])
        new = start_agent(root, state, name, old.zone, old.weight,
                          port=None if port_in_use(port) else port)
    elif old.role == "coordinator":
        port = int(old.address.rsplit(":", 1)[1]) if old.address else 0
        new = start_coordinator(root, state, name,
                                port=None if not port or port_in_use(port) else port)
    else:
        port = int(old.address.rsplit(":", 1)[1])
        if port_in_use(port):
            raise ShardkeeperError(f"port {port} of ZooKeeper is taken by another process")
        server = ZkServer(data_dir=(root / "zookeeper").resolve(), client_port=port,
                          tick_ms=250)
        server.start(detach=True)
        server.wait_ready()
        new = replace(old, pid=server.process.pid)
    state.processes[state.processes.index(old)] = new
    state.save(root)
    if new.role == "agent":
        wait_joined(state, new)
    return new


def add_agent(root: Path, zone: str, weight: float, timeout: float = 30.0) -> Proc:
    """Start one more agent (agent-N, N one past the highest) and wait until it is a
    member of the cluster."""
    state = DevState.load(root)
    numbers = [int(p.name.split("-")[1]) for p in state.processes
               if p.role == "agent" and p.name.split("-")[-1].isdigit()]
    name = f"agent-{max(numbers, default=0) + 1}"
    proc = start_agent(root, state, name, zone, weight)
    state.processes.append(proc)
    state.save(root)
    wait_joined(state, proc, timeout)
    return proc


def wait_joined(state: DevState, proc: Proc, timeout: float = 30.0) -> None:
    """Wait until an agent just started is a member (so that what follows, e.g. `watch
    --until-stable`, sees it)."""
    paths = Paths(state.cluster)
    client = connect(state.target(), root=paths.root)
    try:
        def joined() -> bool:
            """the agent's member znode"""
            if not alive(proc.pid):
                raise ShardkeeperError(f"{proc.name} exited at start: see {proc.log}")
            return client.exists(paths.member(proc.name)) is not None

        poll_until(joined, timeout, f"{proc.name} to join")
    finally:
        close(client)


def wait_departure(state: DevState, name: str, timeout: float = 60.0) -> None:
    """Wait until the leader has written a plan without agent ``name``."""
    paths = Paths(state.cluster)
    client = connect(state.target(), root=paths.root)
    try:
        def planned() -> bool:
            """a plan without the agent"""
            meta = clusterstate.read_plan_meta(client, paths)
            return meta is not None and name not in meta.members

        poll_until(planned, timeout, f"a plan without {name}")
    finally:
        close(client)


@dataclass(frozen=True)
class Rebalance:
    member_gone_s: float
    plan_s: float
    replicated_s: float
    generation: int
    moved: int


def kill_and_watch(root: Path, name: str, sig: signal.Signals, timeout: float = 60.0) -> Rebalance:
    """Signal an agent, then time the member's departure, the new plan and re-replication."""
    state = DevState.load(root)
    proc = state.proc(name)
    paths = Paths(state.cluster)
    client = connect(state.target(), root=paths.root)
    try:
        clusterstate.read_config(client, paths)
        before = clusterstate.read_plan(client, paths)
        os.kill(proc.pid, sig)
        t0 = time.monotonic()

        survivors = set(before.meta.members) - {name} if before.meta else set()
        # Timed together: the leader may plan the departure (a closed liveness link)
        # long before the session expires and the member znode goes.
        seen: dict[str, Any] = {}

        def member_gone() -> bool:
            return not client.exists(paths.member(name))

        def new_plan() -> Any:  # plan/meta alone: the whole plan is ~20 KB per agent
            meta = clusterstate.read_plan_meta(client, paths)
            return meta if meta is not None and name not in meta.members else None

        def replicated() -> bool:
            return "plan" in seen and clusterstate.settled(client, paths, survivors,
                                                           members=False)

        def all_seen() -> bool:
            """the member znode to vanish, a plan without the agent and every shard to be
            fully replicated again, with nothing copying"""
            for what, check in (("member", member_gone), ("plan", new_plan),
                                ("replicated", replicated)):
                if what not in seen and (found := check()):
                    seen[what] = (time.monotonic() - t0, found)
            return len(seen) == 3

        # Every 0.1 s: "settled" reads every agent's status (~40 KB each at 600 replicas).
        poll_until(all_seen, timeout, f"{name} to be gone and its shards re-replicated",
                   interval=0.1)
        t_member, t_plan, t_repl = (seen[k][0] for k in ("member", "plan", "replicated"))
        plan = seen["plan"][1]
        final = clusterstate.read_plan(client, paths)
    finally:
        close(client)
    old = {(s, a) for s, r in enumerate(before.routing) for a in r}
    moved = sum(1 for s, r in enumerate(final.routing) for a in r if (s, a) not in old)
    return Rebalance(t_member, t_plan, t_repl, plan.generation, moved)


# -- CLI ------------------------------------------------------------------------------
dir_option = click.option(
    "--dir", "root", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DIR,
    show_default=True, envvar="SHARDKEEPER_DEV_DIR", help="State, logs and data of the cluster.",
)


@click.group()
def dev() -> None:
    """A local cluster in the background: ZooKeeper, coordinators and agents."""


@dev.command("up")
@dir_option
@click.option("--agents", type=click.IntRange(min=1, max=50), default=3, show_default=True,
              help="Agents to start (agent-1 ... agent-N).")
@click.option("--coordinators", type=click.IntRange(min=1, max=5), default=2, show_default=True,
              help="Coordinator candidates to start; one leads.")
@click.option("--shards", type=int, default=64, show_default=True, help="Shards S.")
@click.option("--replicas", type=int, default=2, show_default=True, help="Replicas per shard R.")
@click.option("--zk", default=None, envvar="SHARDKEEPER_ZK",
              help="Use this ZooKeeper (HOST:PORT[,...]) instead of starting one.")
@click.option("--zk-port", type=click.IntRange(1, 65535), default=2181, show_default=True,
              help="Client port of the ZooKeeper that dev up starts.")
@auth_options
@click.option("--cluster", default=DEFAULT_CLUSTER, envvar="SHARDKEEPER_CLUSTER",
              show_default=True)
@click.option("--session-timeout", type=FiniteFloatRange(min=0.5, max=600), default=2.0,
              show_default=True, help="Session timeout of agents and coordinators (s).")
@operator_errors
def dev_up(root: Path, agents: int, coordinators: int, shards: int, replicas: int,
           zk: str | None, zk_port: int, zk_auth: tuple[Credential, ...],
           zk_auth_file: Path | None, cluster: str, session_timeout: float) -> None:
    """Start a local cluster and wait until every agent holds its plan.

    With --zk-auth (or --zk-auth-file) the cluster's znodes get that credential's ACL;
    `shardkeeper` commands then need it too (SHARDKEEPER_ZK_AUTH)."""
    ClusterConfig(shards=shards, replicas=replicas)
    try:
        Paths(cluster)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--cluster") from None
    target = build_target(zk or f"127.0.0.1:{zk_port}", zk_auth, zk_auth_file)
    t0 = time.monotonic()
    state = up(root, agents=agents, shards=shards, replicas=replicas, coordinators=coordinators,
               zk=target.connect_string if zk else None, zk_port=zk_port, cluster=cluster,
               session_timeout=session_timeout, credentials=target.credentials)
    users = ", ".join(c.user for c in target.credentials)
    acl = f"; its znodes grant access to ZooKeeper user {users} only" if users else ""
    click.echo(
        f"dev cluster {cluster!r} up in {time.monotonic() - t0:.1f}s: ZooKeeper {state.zk},"
        f" {coordinators} coordinators, {agents} agents; logs in {root}/logs{acl}"
    )
    pages = [page_url(p) for p in state.processes if page_url(p)]
    if pages:
        click.echo(f"status page: {' or '.join(pages)} (any coordinator serves it)")


@dev.command("down")
@dir_option
@operator_errors
def dev_down(root: Path) -> None:
    """Stop everything `dev up` started."""
    stopped = down(root)
    click.echo(f"stopped {len(stopped)} processes: {', '.join(stopped) or 'none were running'}")


@dev.command("status")
@dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@operator_errors
def dev_status(root: Path, as_json: bool) -> None:
    """The dev cluster's processes, and whether each is running."""
    state = DevState.load(root)
    procs = [{**asdict(p), "running": alive(p.pid), "url": page_url(p)}
             for p in state.processes]
    if as_json:
        emit_json({"zk": state.zk, "cluster": state.cluster, "dir": str(root),
                   "processes": procs})
        return
    click.echo(f"ZooKeeper {state.zk}  cluster {state.cluster}")
    for p in procs:
        running = "running" if p["running"] else "stopped"
        where = (p["url"] and f"status page {p['url']}") or p["address"]
        where += (f"  zone {p['zone']}" if p["zone"] else "") + (
            f"  weight {p['weight']:g}" if p["weight"] != 1 else "")
        click.echo(f"{p['name']:<16} {p['role']:<12} pid {p['pid']:<8} {running:<8} {where}")


@dev.command("start")
@dir_option
@click.argument("name")
@operator_errors
def dev_start(root: Path, name: str) -> None:
    """Start a stopped process again (after `dev kill`), with its data."""
    proc = restart(root, name)
    click.echo(f"started {name} (pid {proc.pid})" + (f" on {proc.address}"
                                                     if proc.address else ""))


@dev.command("add-agent")
@dir_option
@click.option("--zone", default="", help="Failure zone of the new agent.")
@click.option("--weight", type=FiniteFloatRange(min=0, min_open=True, max=1e6), default=1.0,
              help="Relative capacity of the new agent.")
@operator_errors
def dev_add_agent(root: Path, zone: str, weight: float) -> None:
    """Start one more agent (agent-N) and wait until it joins; the leader then moves
    replicas to it (`shardkeeper watch` shows them move)."""
    proc = add_agent(root, zone, weight)
    click.echo(f"{proc.name} joined (pid {proc.pid}, {proc.address}); `shardkeeper watch`"
               " shows replicas moving to it")


@dev.command("kill")
@dir_option
@click.argument("name")
@click.option("--signal", "sig", type=click.Choice(["KILL", "TERM", "STOP", "CONT"]),
              default="KILL", show_default=True,
              help="KILL: a crash; TERM: a clean stop; STOP/CONT: a hung process and back.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait for, and print, the rebalance that follows (agents only).")
@click.option("--watch", "then_watch", is_flag=True,
              help="Instead of --wait: once the leader has planned the agent's departure,"
              " show it live with `shardkeeper watch --until-stable`.")
@operator_errors
def dev_kill(root: Path, name: str, sig: str, wait: bool, then_watch: bool) -> None:
    """Send a signal to one process of the dev cluster (an agent by default: SIGKILL)."""
    signum = signal.Signals[f"SIG{sig}"]
    state = DevState.load(root)
    proc = state.proc(name)
    if not alive(proc.pid):
        raise ShardkeeperError(f"{name} (pid {proc.pid}) is not running")
    if then_watch:
        os.kill(proc.pid, signum)
        click.echo(f"sent SIG{sig} to {name} (pid {proc.pid})")
        if proc.role == "agent" and signum != signal.SIGCONT:
            # `watch --until-stable` would find the cluster stable if it looked before
            # the leader noticed the departure.
            wait_departure(state, name)
        argv = cli_command("watch", "--until-stable", "--timeout", "300", *state.zk_args())
        # Ctrl-C reaches the watch too, which ends cleanly and says so with its status.
        with interruptible():
            sys.exit(subprocess.call(argv))
    if not wait or proc.role != "agent" or signum in (signal.SIGCONT,):
        os.kill(proc.pid, signum)
        click.echo(f"sent SIG{sig} to {name} (pid {proc.pid})")
        return
    r = kill_and_watch(root, name, signum)
    click.echo(f"sent SIG{sig} to {name} (pid {proc.pid})")
    click.echo(f"  member znode gone          after {r.member_gone_s:6.2f} s")
    click.echo(f"  new plan (generation {r.generation:>3}) after {r.plan_s:6.2f} s:"
               " primaries failed over, copies started")
    click.echo(f"  fully replicated again     after {r.replicated_s:6.2f} s:"
               f" {r.moved} replicas re-homed, make-before-break")
