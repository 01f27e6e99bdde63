"""Test helpers: real role processes, polling waits, and a per-test cluster on real ZooKeeper."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any, TypeVar

from kazoo.client import KazooClient

from shardkeeper import cluster as clusterstate
from shardkeeper.dev.zkserver import free_port
from shardkeeper.layout import Paths
from shardkeeper.process import cli_command, spawn
from shardkeeper.zk import close, connect

T = TypeVar("T")


class RoleProcess:
    """An agent or coordinator running as a real child process."""

    def __init__(self, name: str, argv: list[str], log: Path):
        self.name = name
        self.log = log
        self.popen = spawn(argv, log)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(10)

    def term(self, timeout: float = 15.0) -> int:
        self.signal(signal.SIGTERM)
        return self.popen.wait(timeout)

    def stop(self) -> None:
        self.signal(signal.SIGSTOP)

    def cont(self) -> None:
        self.signal(signal.SIGCONT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Cluster:
    """A cluster with a unique name on a shared ZooKeeper, and the processes a test starts."""

    def __init__(self, hosts: str, workdir: Path):
        self.hosts = hosts
        self.name = "t" + uuid.uuid4().hex[:10]
        self.paths = Paths(self.name)
        self.workdir = workdir
        self.procs: dict[str, RoleProcess] = {}
        self._client: KazooClient | None = None

    @property
    def client(self) -> KazooClient:
        if self._client is None:
            self._client = connect(self.hosts)
        return self._client

    def cli(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = cli_command(*args, "--zk", self.hosts, "--cluster", self.name)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)

    def init(self, shards: int, replicas: int) -> None:
        r = self.cli("init", "--shards", str(shards), "--replicas", str(replicas))
        assert r.returncode == 0, r.stderr

    def start_agent(self, name: str, session_timeout: float = 1.0, zone: str = "",
                    weight: float = 1.0) -> RoleProcess:
        argv = cli_command(
            "agent", "run", "--zk", self.hosts, "--cluster", self.name, "--id", name,
            "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(self.workdir / name),
            "--session-timeout", str(session_timeout), "--zone", zone, "--weight", str(weight),
            "--log-level", "debug",
        )
        self.procs[name] = RoleProcess(name, argv, self.workdir / f"{name}.log")
        return self.procs[name]

    def start_coordinator(self, name: str, session_timeout: float = 1.0) -> RoleProcess:
        argv = cli_command(
            "coordinator", "run", "--zk", self.hosts, "--cluster", self.name, "--id", name,
            "--session-timeout", str(session_timeout), "--log-level", "debug",
        )
        self.procs[name] = RoleProcess(name, argv, self.workdir / f"{name}.log")
        return self.procs[name]

    # -- reads ---------------------------------------------------------------------
    def plan(self) -> clusterstate.PlanState:
        return clusterstate.read_plan(self.client, self.paths)

    def members(self) -> set[str]:
        return set(clusterstate.read_members(self.client, self.paths))

    def statuses(self) -> dict[str, Any]:
        return clusterstate.read_statuses(self.client, self.paths)

    def leader(self) -> str | None:
        return clusterstate.current_leader(self.client, self.paths)

    def epoch(self) -> int:
        return clusterstate.read_leader(self.client, self.paths)[1]

    def settled(self, agents: set[str]) -> bool:
        """``agents`` are the members and the plan's, nothing is copying, and each agent
        holds exactly what its latest plan says."""
        return clusterstate.settled(self.client, self.paths, agents)

    def close(self) -> None:
        for p in self.procs.values():
            p.cont()
            p.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(10)
        if self._client is not None:
            close(self._client)
