"""The cluster under test: a 3-server ZooKeeper ensemble, coordinators and agents, each a
real process in a network namespace of its own (``net.Network``).

:class:`Fleet` starts, signals and restarts them, remembers which processes it ended on
purpose, and reports any other exit as unexpected. Agents keep their data dir across a
SIGKILL and a restart; one agent's data dir is a small tmpfs (``disk.mount_tmpfs``) for
the full-disk fault.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kazoo.client import KazooClient

from bench.chaos import disk
from bench.chaos.net import Network
from bench.common import REPO, Processes
from shardkeeper import admin
from shardkeeper import cluster as clusterstate
from shardkeeper.dev.zkserver import MAIN_CLASS, ZK_CONF_DIR, find_zookeeper, four_letter
from shardkeeper.layout import Paths
from shardkeeper.poll import poll_until
from shardkeeper.process import cli_command
from shardkeeper.zk import ZkTarget, close, connect

CLUSTER = "chaos"
ZK_CLIENT_PORT = 2181
ZK_PEER_PORT = 2888
ZK_ELECTION_PORT = 3888


@dataclass(frozen=True)
class FleetOptions:
    agents: int = 6
    zones: tuple[str, ...] = ("a", "b", "c")
    coordinators: int = 2
    shards: int = 12
    replicas: int = 3
    session_timeout: float = 3.0  # agents and coordinators
    tick_ms: int = 500
    zk_heap_mb: int = 192
    disk_agent: int = 6  # whose data dir is a tmpfs (1-based); 0: none
    disk_mb: int = 160
    tombstone_grace: float = 20.0  # agents' SHARDKEEPER_TOMBSTONE_GRACE (compaction)


@dataclass
class Fleet:
    root: Path
    opts: FleetOptions
    net: Network
    procs: Processes = field(init=False)
    zk_names: list[str] = field(default_factory=list)
    coordinators: list[str] = field(default_factory=list)
    agents: list[str] = field(default_factory=list)  # every agent ever started, in order
    zones: dict[str, str] = field(default_factory=dict)
    disk_agent: str | None = None
    stopped: set[str] = field(default_factory=set)  # SIGSTOPped now
    down: set[str] = field(default_factory=set)  # killed on purpose, not yet restarted
    unexpected: list[str] = field(default_factory=list)
    paths: Paths = field(default_factory=lambda: Paths(CLUSTER))
    _client: KazooClient | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Children die with the thread that started them (setpriv --pdeathsig: the kernel
    # signals on the exit of the creating *thread*), so every start goes through this
    # one thread, which lives as long as the fleet; a nemesis thread that restarts a
    # server and then ends would otherwise take the server with it.
    _spawner: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="spawner"))

    def __post_init__(self) -> None:
        self.procs = Processes(self.root / "logs")

    # -- addresses -------------------------------------------------------------------

    @property
    def zk_hosts(self) -> str:
        return ",".join(f"{self.net.nodes[z].address}:{ZK_CLIENT_PORT}" for z in self.zk_names)

    @property
    def target(self) -> ZkTarget:
        return ZkTarget.parse(self.zk_hosts)

    @property
    def client(self) -> KazooClient:
        if self._client is None:
            self._client = connect(self.target, session_timeout=10.0)
        return self._client

    def data_dir(self, agent: str) -> Path:
        return self.root / "data" / agent

    # -- ZooKeeper -------------------------------------------------------------------

    def _zk_config(self, name: str, index: int) -> Path:
        data = self.root / "zk" / name
        data.mkdir(parents=True, exist_ok=True)
        (data / "myid").write_text(f"{index}\n")
        address = self.net.nodes[name].address
        lines = [
            f"tickTime={self.opts.tick_ms}",
            f"dataDir={data}",
            f"clientPort={ZK_CLIENT_PORT}",
            f"clientPortAddress={address}",
            "initLimit=20",
            "syncLimit=10",
            "maxClientCnxns=0",
            f"minSessionTimeout={2 * self.opts.tick_ms}",
            "maxSessionTimeout=60000",
            "admin.enableServer=false",
            "4lw.commands.whitelist=*",
            "autopurge.purgeInterval=0",
        ]
        for i, other in enumerate(self.zk_names, 1):
            host = self.net.nodes[other].address
            lines.append(f"server.{i}={host}:{ZK_PEER_PORT}:{ZK_ELECTION_PORT}")
        cfg = data / "zoo.cfg"
        cfg.write_text("\n".join(lines) + "\n")
        return cfg

    def start_zk(self, name: str) -> None:
        java, jar = find_zookeeper()
        index = self.zk_names.index(name) + 1
        cfg = self._zk_config(name, index)
        argv = [*self.net.exec_prefix(name), java, f"-Xmx{self.opts.zk_heap_mb}m",
                f"-Dzookeeper.log.dir={cfg.parent}", "-cp", f"{ZK_CONF_DIR}:{jar}",
                MAIN_CLASS, str(cfg)]
        self._start(name, argv)

    def zk_ok(self, name: str) -> bool:
        address = self.net.nodes[name].address
        try:
            srvr = four_letter(address, ZK_CLIENT_PORT, "srvr")
        except OSError:
            return False
        return "Mode:" in srvr and "not currently serving" not in srvr

    # -- roles -----------------------------------------------------------------------

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        def start() -> None:
            with self._lock:
                self.procs.start(name, argv, env=env)
                self.down.discard(name)
                self.stopped.discard(name)

        self._spawner.submit(start).result()

    def start_coordinator(self, name: str) -> None:
        address = self.net.nodes[name].address
        argv = [*self.net.exec_prefix(name), *cli_command(
            "coordinator", "run", "--zk", self.zk_hosts, "--cluster", CLUSTER, "--id", name,
            "--session-timeout", str(self.opts.session_timeout),
            "--liveness", f"{address}:0")]
        self._start(name, argv)

    def new_agent(self) -> str:
        """Give the next agent a namespace, a zone and a data dir; returns its name."""
        n = len(self.agents) + 1
        name = f"agent-{n}"
        self.net.add(name)
        self.zones[name] = self.opts.zones[(n - 1) % len(self.opts.zones)]
        self.agents.append(name)
        if n == self.opts.disk_agent:
            disk.mount_tmpfs(self.data_dir(name), self.opts.disk_mb)
            self.disk_agent = name
        return name

    def start_agent(self, name: str) -> None:
        address = self.net.nodes[name].address
        argv = [*self.net.exec_prefix(name), *cli_command(
            "agent", "run", "--zk", self.zk_hosts, "--cluster", CLUSTER, "--id", name,
            "--listen", f"{address}:0", "--data-dir", str(self.data_dir(name)),
            "--session-timeout", str(self.opts.session_timeout), "--zone", self.zones[name])]
        env = {"SHARDKEEPER_TOMBSTONE_GRACE": str(self.opts.tombstone_grace)}
        if name == self.disk_agent:
            env["SHARDKEEPER_TRASH_KEEP"] = "0"  # a dropped replica must free the small disk
        self._start(name, argv, env)

    def running(self, name: str) -> bool:
        return name in self.procs.running

    def kill(self, name: str) -> None:
        with self._lock:
            self.down.add(name)
            self.stopped.discard(name)
            if name in self.procs.running:
                with contextlib.suppress(ProcessLookupError):
                    self.procs.running[name].send_signal(signal.SIGCONT)
                self.procs.kill(name)

    def pause(self, name: str) -> None:
        with self._lock:
            proc = self.procs.running.get(name)
            if proc is not None:
                proc.send_signal(signal.SIGSTOP)
                self.stopped.add(name)

    def resume(self, name: str) -> None:
        with self._lock:
            proc = self.procs.running.get(name)
            if proc is not None:
                proc.send_signal(signal.SIGCONT)
            self.stopped.discard(name)

    def check_exits(self) -> list[str]:
        """Processes that ended without being killed (recorded once, with their code)."""
        with self._lock:
            ended = {n: p.returncode for n, p in self.procs.running.items()
                     if p.poll() is not None}
            for name in ended:
                del self.procs.running[name]
        for name, code in sorted(ended.items()):
            self.unexpected.append(f"{name} exited with code {code}")
        return sorted(ended)

    def live_agents(self) -> set[str]:
        """Agents whose process runs and is not stopped."""
        with self._lock:
            return {a for a in self.agents if a in self.procs.running and a not in self.stopped}

    def leader(self) -> str | None:
        try:
            return clusterstate.current_leader(self.client, self.paths)
        except Exception:  # noqa: BLE001 - no quorum, or a damaged znode: nobody known
            return None

    # -- admin -----------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = cli_command(*args, "--zk", self.zk_hosts, "--cluster", CLUSTER)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def drain(self, agent: str) -> None:
        admin.drain(self.client, self.paths, agent)

    def undrain(self, agent: str) -> None:
        admin.undrain(self.client, self.paths, agent)

    def close(self) -> None:
        if self._client is not None:
            close(self._client)
            self._client = None
        self.procs.close()
        self._spawner.shutdown(wait=False)
        if self.disk_agent is not None:
            disk.unmount(self.data_dir(self.disk_agent))


def start_fleet(root: Path, opts: FleetOptions, net: Network,
                progress: Callable[[str], None] = lambda _m: None) -> Fleet:
    """Start the ensemble, create the cluster, start coordinators and agents, and wait
    until every agent holds its first plan."""
    fleet = Fleet(root, opts, net)
    fleet.zk_names = [f"zk{i}" for i in range(1, 4)]
    for name in fleet.zk_names:
        net.add(name)
    for name in fleet.zk_names:
        fleet.start_zk(name)
    poll_until(lambda: all(fleet.zk_ok(z) for z in fleet.zk_names), 90,
               "the ZooKeeper ensemble to serve")
    progress(f"ZooKeeper ensemble up at {fleet.zk_hosts}")
    done = fleet.cli("init", "--shards", str(opts.shards), "--replicas", str(opts.replicas))
    if done.returncode != 0:
        raise RuntimeError(f"init failed: {done.stderr.strip()}")
    fleet.coordinators = [f"coordinator-{i}" for i in range(1, opts.coordinators + 1)]
    for name in fleet.coordinators:
        net.add(name)
        fleet.start_coordinator(name)
    for _ in range(opts.agents):
        fleet.start_agent(fleet.new_agent())
    agents = set(fleet.agents)
    poll_until(lambda: fleet.check_exits() == [] and clusterstate.settled(
        fleet.client, fleet.paths, agents), 120, "the agents to hold their first plan")
    progress(f"{len(agents)} agents and {len(fleet.coordinators)} coordinators up")
    return fleet


def wait_zk_quorum(fleet: Fleet, timeout: float) -> None:
    poll_until(lambda: sum(fleet.zk_ok(z) for z in fleet.zk_names) >= 2, timeout,
               "a ZooKeeper quorum")


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""
