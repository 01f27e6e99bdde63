"""Test helpers: real role processes, polling waits, and a per-test cluster on real ZooKeeper."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import subprocess
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kazoo.client import KazooClient

from shardkeeper import cluster as clusterstate
from shardkeeper.layout import Paths
from shardkeeper.poll import poll_until
from shardkeeper.process import cli_command, spawn
from shardkeeper.zk import Credential, ZkTarget, close, connect

T = TypeVar("T")


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes


def fetch(url: str, method: str = "GET", timeout: float = 10.0) -> Reply:
    """One HTTP request, any status (no proxy from the environment, no redirects)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""))
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


class RoleProcess:
    """An agent or coordinator running as a real child process."""

    def __init__(self, name: str, argv: list[str], log: Path,
                 env: dict[str, str] | None = None):
        self.name = name
        self.log = log
        self.popen = spawn(argv, log, env=env)

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

    def http_url(self, timeout: float = 20.0) -> str:
        """The base URL (``http://HOST:PORT/``) a coordinator started with ``http`` logs once
        it has bound its --http port (port 0: the port the kernel chose)."""
        def logged() -> str | None:
            found = re.search(r"serving HTTP on (http://\S+/)", self.output())
            return found.group(1) if found else None

        return poll_until(logged, timeout, f"{self.name} to serve HTTP")


class Cluster:
    """A cluster with a unique name on a shared ZooKeeper, and the processes a test starts.

    The target's credentials reach the CLI and the roles through SHARDKEEPER_ZK_AUTH (as an
    operator would keep them out of `ps`), its TLS files through --zk-tls-* options."""

    def __init__(self, target: ZkTarget | str, workdir: Path, name: str | None = None):
        self.target = target if isinstance(target, ZkTarget) else ZkTarget.parse(target)
        self.hosts = self.target.connect_string
        self.name = name or "t" + uuid.uuid4().hex[:10]
        self.paths = Paths(self.name)
        self.workdir = workdir
        self.procs: dict[str, RoleProcess] = {}
        self._client: KazooClient | None = None
        self._views: list[Cluster] = []

    def as_user(self, *credentials: Credential) -> Cluster:
        """This cluster seen with other ZooKeeper credentials (none: anonymous). What the
        view starts belongs to this cluster (stopped with it); its session closes with it."""
        view = Cluster(ZkTarget.parse(self.hosts, credentials, self.target.tls), self.workdir,
                       self.name)
        view.procs = self.procs
        self._views.append(view)
        return view

    @property
    def client(self) -> KazooClient:
        if self._client is None:
            self._client = connect(self.target)
        return self._client

    def zk_args(self) -> list[str]:
        args = ["--zk", self.hosts, "--cluster", self.name]
        tls = self.target.tls
        if tls is not None:
            args.append("--zk-tls")
            for option, path in (("--zk-tls-ca", tls.ca), ("--zk-tls-cert", tls.cert),
                                 ("--zk-tls-key", tls.key)):
                args += [option, str(path)] if path else []
        return args

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a child: ours, with the target's credentials (or none)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDKEEPER_ZK")}
        if self.target.credentials:
            env["SHARDKEEPER_ZK_AUTH"] = "\n".join(
                f"{c.user}:{c.password}" for c in self.target.credentials)
        return {**env, **(extra or {})}

    def cli(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = cli_command(*args, *self.zk_args())
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=env if env is not None else self.env())

    def init(self, shards: int, replicas: int) -> None:
        r = self.cli("init", "--shards", str(shards), "--replicas", str(replicas))
        assert r.returncode == 0, r.stderr

    def start_agent(self, name: str, session_timeout: float = 1.0, zone: str = "",
                    weight: float = 1.0, env: dict[str, str] | None = None) -> RoleProcess:
        argv = cli_command(
            "agent", "run", *self.zk_args(), "--id", name,
            # Port 0: the agent binds any free port and advertises it (no port race).
            "--listen", "127.0.0.1:0", "--data-dir", str(self.workdir / name),
            "--session-timeout", str(session_timeout), "--zone", zone, "--weight", str(weight),
            "--log-level", "debug",
        )
        self.procs[name] = RoleProcess(name, argv, self.workdir / f"{name}.log", self.env(env))
        return self.procs[name]

    def start_coordinator(self, name: str, session_timeout: float = 1.0,
                          http: str | None = None,
                          env: dict[str, str] | None = None) -> RoleProcess:
        """``http``: serve --http there (``127.0.0.1:0``: any port; see ``http_url``)."""
        argv = cli_command(
            "coordinator", "run", *self.zk_args(), "--id", name,
            "--session-timeout", str(session_timeout), "--log-level", "debug",
            *(["--http", http] if http is not None else []),
        )
        self.procs[name] = RoleProcess(name, argv, self.workdir / f"{name}.log", self.env(env))
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
        for client in [v._client for v in self._views] + [self._client]:
            if client is not None:
                close(client)
