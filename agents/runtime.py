"""The agent's I/O shell: membership, its plan watch, local replicas and status reports.

What it does on each ZooKeeper event:

* CONNECTED (first time): register ``members/<id>`` and ``status/<id>`` (ephemeral),
  watch only ``plan/agents/<id>``.
* SUSPENDED: keep serving what it holds; the data plane (issue 5) stops acknowledging
  writes as primary here.
* LOST: kazoo opens a new session on its own; when it is CONNECTED again the agent
  registers again and re-applies its plan (its ephemeral znodes died with the session).
* A member znode left by an earlier incarnation of this agent (killed before its session
  expired): wait, bounded, for the server to expire it, then register.
* A corrupt or stale plan znode: keep what is applied, log the reason, wait for the next.
* SIGTERM: close the session, so that the member znode vanishes at once.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import KazooException, NodeExistsError, NoNodeError
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from coordinator.layout import (
    ROLE_PRIMARY,
    AgentPlan,
    AgentStatus,
    Assignment,
    CorruptZnode,
    MemberInfo,
    Paths,
    ShardStatus,
)
from coordinator.zk import ShardkeeperError, close, connect, ensure_layout

log = logging.getLogger(__name__)
VERSION = "0.1.0"

STATE_PRIMARY = "PRIMARY"
STATE_REPLICA = "REPLICA"


class StillRegistered(ShardkeeperError):
    pass


@dataclass(frozen=True)
class LocalChanges:
    """What the shell must do to make the local replicas match a target."""

    create: tuple[int, ...]
    drop: tuple[int, ...]


def local_changes(target: dict[int, Assignment], held: set[int]) -> LocalChanges:
    """Pure: the replica directories to create and to drop for ``target``."""
    return LocalChanges(
        create=tuple(sorted(set(target) - held)),
        drop=tuple(sorted(held - set(target))),
    )


def shard_states(target: dict[int, Assignment]) -> dict[int, ShardStatus]:
    # The skeleton holds no data, so a replica asked to copy is caught up at once.
    return {
        s: ShardStatus(STATE_PRIMARY if a.role == ROLE_PRIMARY else STATE_REPLICA)
        for s, a in target.items()
    }


class LocalReplicas:
    """One directory per shard replica under ``<data-dir>/shards``."""

    def __init__(self, data_dir: Path):
        self.root = data_dir / "shards"
        self.root.mkdir(parents=True, exist_ok=True)

    def held(self) -> set[int]:
        return {int(p.name) for p in self.root.iterdir() if p.is_dir() and p.name.isdigit()}

    def apply(self, changes: LocalChanges) -> None:
        for shard in changes.create:
            (self.root / str(shard)).mkdir(exist_ok=True)
        for shard in changes.drop:
            shutil.rmtree(self.root / str(shard), ignore_errors=True)


class Agent:
    def __init__(
        self,
        hosts: str,
        cluster: str,
        agent_id: str,
        *,
        address: str,
        zone: str = "",
        weight: float = 1.0,
        data_dir: Path,
        session_timeout: float = 10.0,
    ):
        self.hosts = hosts
        self.paths = Paths(cluster)
        self.id = agent_id
        self.info = MemberInfo(
            id=agent_id,
            address=address,
            zone=zone,
            weight=weight,
            version=VERSION,
            started=time.time(),
        )
        self.session_timeout = session_timeout
        self.replicas = LocalReplicas(data_dir)
        self.events: queue.Queue[str] = queue.Queue()
        self.stop_event = threading.Event()
        self.applied = AgentPlan(generation=0, epoch=0)
        self.client: KazooClient | None = None
        self._lost = False

    # -- ZooKeeper callbacks: never block, hand work to the main loop -----------------
    def _on_state(self, state: str) -> None:
        if state == KazooState.LOST:
            self._lost = True
            log.warning("session lost: will register again")
        elif state == KazooState.SUSPENDED:
            log.warning("session suspended")
        elif state == KazooState.CONNECTED and self._lost:
            self._lost = False
            self.events.put("register")

    def _on_plan(self, _data: bytes | None, _stat: object) -> bool:
        self.events.put("plan")
        return not self.stop_event.is_set()

    # -- main loop ---------------------------------------------------------------------
    def stop(self) -> None:
        self.stop_event.set()
        self.events.put("stop")

    def run(self) -> None:
        self.client = connect(self.hosts, self.session_timeout)
        self.client.add_listener(self._on_state)
        try:
            ensure_layout(self.client, self.paths)
            self.register()
            self.client.DataWatch(self.paths.plan_agent(self.id), self._on_plan)
            while not self.stop_event.is_set():
                event = self.events.get()
                if event == "stop":
                    break
                try:
                    if event == "register":
                        self.register()
                        self.events.put("plan")
                    elif event == "plan":
                        self.apply_plan()
                except KazooException as e:
                    log.warning("%s failed (%s); retrying", event, type(e).__name__)
                    self.stop_event.wait(0.2)
                    self.events.put(event)
        finally:
            close(self.client)
            log.info("agent %s stopped; session closed", self.id)

    # -- registration ----------------------------------------------------------------
    def register(self) -> None:
        """Create our ephemeral member and status znodes for the current session."""
        self._create_ephemeral(self.paths.member(self.id), self.info.encode())
        self.report()
        log.info("registered as %s at %s", self.id, self.info.address)

    def _create_ephemeral(self, path: str, data: bytes) -> None:
        @retry(
            retry=retry_if_exception_type(NodeExistsError),
            stop=stop_after_delay(max(30.0, 3 * self.session_timeout)),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            reraise=True,
        )
        def attempt() -> None:
            try:
                self.client.create(path, data, ephemeral=True)
            except NodeExistsError:
                _, stat = self.client.get(path)
                if stat.ephemeralOwner != self.client.client_id[0]:
                    log.info("%s is held by an earlier session; waiting for it to expire", path)
                    raise
                self.client.set(path, data)

        try:
            attempt()
        except NodeExistsError:
            raise StillRegistered(
                f"{path} is held by another live session: is agent {self.id!r} already running?"
            ) from None

    # -- plan ------------------------------------------------------------------------
    def read_plan(self) -> AgentPlan | None:
        path = self.paths.plan_agent(self.id)
        try:
            data, _ = self.client.get(path)
        except NoNodeError:
            return None
        try:
            return AgentPlan.decode(path, data)
        except CorruptZnode as e:
            log.error("keeping generation %d: %s", self.applied.generation, e)
            return None

    def apply_plan(self) -> None:
        plan = self.read_plan()
        if plan is None:
            return
        if plan.generation < self.applied.generation:
            log.warning("ignoring plan generation %d: generation %d is applied",
                        plan.generation, self.applied.generation)
            return
        changes = local_changes(plan.replicas, self.replicas.held())
        self.replicas.apply(changes)
        self.applied = plan
        self.report()
        log.info("applied plan generation %d: %d replicas (+%d -%d)", plan.generation,
                 len(plan.replicas), len(changes.create), len(changes.drop))

    def status(self) -> AgentStatus:
        return AgentStatus(self.id, self.applied.generation, shard_states(self.applied.replicas))

    def report(self) -> None:
        path = self.paths.agent_status(self.id)
        data = self.status().encode()
        try:
            self.client.set(path, data)
        except NoNodeError:
            self._create_ephemeral(path, data)


class HealthServer:
    """Serves GET /healthz on the agent's --listen address (JSON: id and generation)."""

    def __init__(self, agent: Agent, host: str, port: int):
        agent_ref = agent

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path != "/healthz":
                    self.send_error(404)
                    return
                body = json.dumps(
                    {"id": agent_ref.id, "generation": agent_ref.applied.generation}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
