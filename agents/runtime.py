"""The agent's I/O shell: membership, its plan watch, the shard state machine, the data plane.

The shell decides nothing about shards itself: it turns its plan znode into
``agents.shardsm`` targets, calls ``shardsm.reconcile`` and carries out the actions it
returns (shard work through the ``ShardHandler`` on worker threads, one action at a time
per shard), feeds the results back as events, keeps the data plane's ``ShardTable`` in
line with what has actually been done, and reports ``status/<id>``.

What it does on each ZooKeeper event:

* CONNECTED (first time): register ``members/<id>`` and ``status/<id>`` (ephemeral),
  watch only ``plan/agents/<id>``; the data plane starts serving.
  A connection loss or an expired session during these first steps retries them
  (bounded): on a loaded host a short session can expire before the agent is up.
* SUSPENDED: primaries stop acknowledging writes (``SetWritable(False)``): the session may
  be gone, and with it this agent's right to be primary.
* LOST: the data plane answers nothing (``SetServing(False)``). kazoo opens a new session
  on its own; when it is CONNECTED again the agent registers again, reads its plan and
  reconciles (dropping shards it no longer owns, repairing shards it now follows). Until
  it has read a plan znode in the new session it serves nothing (``SetServing(False)``
  stays): the plan it applied before may be one the cluster no longer routes by, and
  the leader deletes the plan znode of a departed agent that holds nothing. It keeps its
  shard data meanwhile; the plan the leader writes for it decides what is kept (a
  demoted primary or a replica that fell behind repairs, the rest is dropped).
* A member znode left by an earlier incarnation of this agent (killed before its session
  expired): wait, bounded, for the server to expire it, then register.
* A corrupt or stale plan znode: keep what is applied, log the reason, wait for the next.
* A failed ZooKeeper read or status write: retried from the main loop after a short delay.
* SIGTERM: close the session, so that the member znode vanishes at once.

Other agents are known by id in the plan; their data-plane addresses are read from their
``members/<id>`` znodes (read, never watched) each time the plan is read.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    ConnectionLoss,
    KazooException,
    NodeExistsError,
    NoNodeError,
    OperationTimeoutError,
    SessionExpiredError,
)
from tenacity import (
    retry,
    retry_if_exception_type,
    stop_after_delay,
    stop_when_event_set,
    wait_exponential,
)

from agents import shardsm
from agents.dataplane import DataPlane, ShardRoute, ShardTable
from agents.handler import KVShardHandler, ShardHandler, perform
from agents.shardsm import (
    SYNC_ACTIONS,
    Action,
    AgentState,
    BecomeReplica,
    CatchUp,
    CopyFailed,
    Demote,
    Event,
    Limits,
    Promote,
    Repair,
    ReportStatus,
    Session,
    SetServing,
    SetWritable,
    StartBootstrap,
    StartDrop,
    SyncFailed,
    Target,
)
from agents.store import StoreSet
from shardkeeper.layout import AgentPlan, AgentStatus, Assignment, MemberInfo, Paths, ShardStatus
from shardkeeper.peer import PeerClient
from shardkeeper.token import NoToken, Tokens, no_tokens_message, read_tokens
from shardkeeper.vocab import CorruptZnode, Role, ShardkeeperError, ShardState
from shardkeeper.zk import ZkUnavailable, close, connect, ensure_layout

log = logging.getLogger(__name__)
VERSION = "0.2.0"

# An address that refuses connections at once: stands in for a member whose znode is gone,
# so that a copy from it fails (and is retried) instead of looking like a new, empty shard.
UNREACHABLE = "127.0.0.1:1"
RETRY_DELAY = 0.2  # before re-trying a failed ZooKeeper read or status write
# Other agents' addresses are read, not watched: read again this often when idle (an
# agent that restarts at a new address without a plan change is found this way).
REFRESH_SECONDS = 5.0
HANDLER_RETRY_SECONDS = 30.0  # a repair or promotion keeps trying this long, then logs
# ZooKeeper errors that a new attempt on the same client may not meet again.
ZK_TRANSIENT = (ConnectionLoss, SessionExpiredError, OperationTimeoutError)

_SESSIONS = {
    KazooState.CONNECTED: Session.CONNECTED,
    KazooState.SUSPENDED: Session.SUSPENDED,
    KazooState.LOST: Session.LOST,
}


class StillRegistered(ShardkeeperError):
    pass


@dataclass(frozen=True)
class _Job:
    """One shard action queued for a worker; ``seq`` tells stale copy results apart."""

    action: Action
    seq: int
    stop: threading.Event
    peers: tuple[str, ...] = ()  # for Promote: in-sync peer addresses to catch up from


@dataclass
class _Inputs:
    """What one turn of the main loop collected from its inbox."""

    events: list[Event] = field(default_factory=list)
    plan: bool = False
    status: bool = False
    stop: bool = False


def target_of(assignment: Assignment, address_of: Any) -> Target:
    """Pure: the state machine's target for one plan assignment (agent ids -> addresses)."""
    if assignment.role == Role.PRIMARY:
        return Target(Role.PRIMARY, since=assignment.term)
    return Target(
        Role.REPLICA,
        source=address_of(assignment.source) if assignment.source else None,
        primary=address_of(assignment.primary) if assignment.primary else None,
        since=assignment.term,
    )


def referenced_agents(replicas: dict[int, Assignment]) -> set[str]:
    """Every agent id an AgentPlan names (whose address the shell needs)."""
    ids: set[str] = set()
    for a in replicas.values():
        ids.update(x for x in (a.primary, a.source) if x)
        ids.update(a.peers)
        ids.update(a.bootstrapping)
    return ids


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
        limits: Limits = Limits(max_bootstraps=4),  # noqa: B008 - frozen
        handler: ShardHandler | None = None,
    ):
        self.hosts = hosts
        self.paths = Paths(cluster)
        self.id = agent_id
        self.address = address
        self.info = MemberInfo(
            id=agent_id,
            address=address,
            zone=zone,
            weight=weight,
            version=VERSION,
            started=time.time(),
        )
        self.session_timeout = session_timeout
        self.limits = limits
        self.stores = StoreSet(Path(data_dir) / "shards")
        # Nothing is served until the first connected reconcile says so.
        self.table = ShardTable(writable=False, serving=False)
        self.plane: DataPlane | None = None
        self.peer_client: PeerClient | None = None
        self.catch_up_client: PeerClient | None = None
        self._custom_handler = handler
        self.handler: ShardHandler | None = handler
        self.inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.stop_event = threading.Event()
        self.state = AgentState()
        self.assignments: dict[int, Assignment] = {}
        self.addresses: dict[str, str] = {}
        self.client: KazooClient | None = None
        self._plan_replicas: dict[int, Assignment] = {}
        self._session = Session.CONNECTED
        self._must_register = False
        # Read our plan znode in this session yet? Until then nothing is served.
        self._plan_current = False
        self._pruned = False
        # shard work: one action at a time per shard
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="shard")
        self._queues: dict[int, deque[_Job]] = {}
        self._running: dict[int, _Job] = {}
        self._copy_seq: dict[int, int] = {}
        self._sync_seq: dict[int, int] = {}  # the latest repair/catch-up: older results are stale
        self._seq = 0
        # what the data plane may serve: advanced when the handler finished the work
        self._served: dict[int, ShardState] = {}
        self._fence: dict[int, int] = {}

    # -- the data plane -------------------------------------------------------------------
    def attach_plane(self, host: str, port: int) -> DataPlane:
        """Bind the data plane on host:port now (so a bad --listen fails at once).

        Until the cluster token is known it holds a random one, so it answers 401.
        """
        self.plane = DataPlane(
            self.stores, self.table, secrets.token_urlsafe(32), host=host, port=port,
            peer_token=secrets.token_urlsafe(32),  # issue 10: replication has its own token
        )
        return self.plane

    @property
    def applied_generation(self) -> int:
        return self.state.applied_generation

    def _use_token(self, tokens: Tokens) -> None:
        # Agents call each other's replication endpoints: they send the peer token.
        downloaded = self.plane.metrics.downloaded if self.plane else None  # issue 12
        self.peer_client = PeerClient(tokens.peer, timeout=5.0, attempts=4,
                                      on_download=downloaded)
        self.catch_up_client = PeerClient(tokens.peer, timeout=1.0, attempts=1)
        if self.handler is None:
            self.handler = KVShardHandler(self.stores, self.peer_client)
        if self.plane is not None:
            self.plane.set_tokens(tokens)

    def read_token(self) -> Tokens:
        """The cluster and peer tokens; waits (woken by a watch) for `shardkeeper init`."""
        created = threading.Event()
        warned = False
        while not self.stop_event.is_set():
            tokens = read_tokens(self.client, self.paths, watch=lambda _e: created.set())
            if tokens is not None:
                return tokens
            if not warned:
                log.warning("%s; waiting", no_tokens_message(self.paths))
                warned = True
            self._publish()  # issue 12: alive and connected, not ready
            created.wait(1.0)
            created.clear()
        raise NoToken(no_tokens_message(self.paths))

    # -- ZooKeeper callbacks: never block, hand work to the main loop -------------------
    def _on_state(self, state: str) -> None:
        if state == KazooState.LOST:
            log.warning("session lost: will register again")
        elif state == KazooState.SUSPENDED:
            log.warning("session suspended: refusing writes")
        self.inbox.put(("session", _SESSIONS[state]))
        if self.plane is not None:  # issue 12: at once, not at the next turn
            self.plane.metrics.zk_connected(state == KazooState.CONNECTED)

    def _on_plan(self, _data: bytes | None, _stat: object) -> bool:
        self.inbox.put(("plan",))
        return not self.stop_event.is_set()

    def _later(self, *item: Any) -> None:
        timer = threading.Timer(RETRY_DELAY, self.inbox.put, args=(item,))
        timer.daemon = True
        timer.start()

    # -- main loop ----------------------------------------------------------------------
    def stop(self) -> None:
        self.stop_event.set()
        self.inbox.put(("stop",))

    def _connect(self) -> KazooClient | None:
        """The first session: keep trying until ZooKeeper answers or the agent is stopped,
        so that an agent started before ZooKeeper (or on a host too loaded to connect in
        time) waits instead of exiting."""

        def log_retry(state: Any) -> None:
            log.warning("%s; retrying", state.outcome.exception())

        policy = retry(
            retry=retry_if_exception_type(ZkUnavailable),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            stop=stop_when_event_set(self.stop_event),
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            return policy(connect)(self.hosts, self.session_timeout)
        except ZkUnavailable:
            if self.stop_event.is_set():
                return None
            raise

    def run(self) -> None:
        client = self._connect()
        if client is None:
            return
        self.client = client
        self.client.add_listener(self._on_state)
        try:
            self._start()
            self.inbox.put(("session", Session.CONNECTED))
            while not self.stop_event.is_set():
                try:
                    first = self.inbox.get(timeout=REFRESH_SECONDS)
                except queue.Empty:
                    first = ("plan",)
                inputs = self._collect(first)
                if inputs.stop:
                    break
                self._turn(inputs)
        finally:
            for job in self._running.values():
                job.stop.set()
            self._pool.shutdown(wait=False, cancel_futures=True)
            close(self.client)
            log.info("agent %s stopped; session closed", self.id)

    def _start(self) -> None:
        """Layout, token, registration and the plan watch, retried (bounded) while the
        session is lost or the connection drops: a loaded host or ZooKeeper can expire a
        short session before the agent is up, and kazoo reconnects on its own."""

        def log_retry(state: Any) -> None:
            log.warning("start-up step failed (%s); retrying",
                        type(state.outcome.exception()).__name__)

        watching = False

        def steps() -> None:
            nonlocal watching
            ensure_layout(self.client, self.paths)
            self._use_token(self.read_token())
            self.register()
            if not watching:
                self.client.DataWatch(self.paths.plan_agent(self.id), self._on_plan)
                watching = True

        policy = retry(
            retry=retry_if_exception_type(ZK_TRANSIENT),
            stop=stop_after_delay(max(60.0, 6 * self.session_timeout)),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            before_sleep=log_retry,
            reraise=True,
        )
        policy(steps)()

    def _collect(self, first: tuple[Any, ...]) -> _Inputs:
        """Fold the first inbox item and everything else already queued into one turn."""
        inputs = _Inputs()
        item: tuple[Any, ...] | None = first
        while item is not None:
            self._fold(item, inputs)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None
        return inputs

    def _fold(self, item: tuple[Any, ...], inputs: _Inputs) -> None:
        kind = item[0]
        if kind == "stop":
            inputs.stop = True
        elif kind == "plan":
            inputs.plan = True
        elif kind == "status":
            inputs.status = True
        elif kind == "session":
            session = item[1]
            if session == Session.LOST:
                self._must_register = True
                self._plan_current = False
            if session == Session.CONNECTED:
                inputs.plan = True  # the plan may have changed while we were away
            self._session = session
        elif kind == "done":
            self._finished(item[1], item[2], item[3], inputs)

    def _turn(self, inputs: _Inputs) -> None:
        plan = None
        session = self._session
        if session == Session.CONNECTED and self._must_register:
            if not self._try(self.register, "register"):
                session = Session.SUSPENDED  # not registered yet: do not take writes
                inputs.plan = False
            else:
                self._must_register = False
        if session == Session.CONNECTED and (inputs.plan or not self._plan_current):
            plan = self._try(self.read_plan, "plan")
        if not self._plan_current:
            session = Session.LOST  # no plan read in this session: serve nothing yet
        decision = shardsm.reconcile(
            self.state, plan=plan, events=inputs.events, session=session, limits=self.limits
        )
        applied = decision.agent.plan
        if plan is not None and applied is not None and applied.generation == plan.generation:
            self.assignments = self._plan_replicas
        self.state = decision.agent
        for t in decision.transitions:
            log.info("shard %d: %s -> %s", t.shard, t.before, t.after)
        reported = False
        for action in decision.actions:
            if isinstance(action, ReportStatus):
                reported = True
            self._carry_out(action)
        if inputs.status and not reported:
            self.report()
        if plan is not None and not self._pruned:
            self._prune_unowned()
        self._refresh_table()
        self._publish()

    def _try(self, fn: Any, what: str) -> Any:
        """A ZooKeeper step of the main loop; on failure, another turn comes shortly."""
        try:
            return fn()
        except KazooException as e:
            log.warning("%s failed (%s); retrying", what, type(e).__name__)
            self._later("plan")
            return None

    # -- issue 12: what only the runtime knows, for the data plane's /metrics and /readyz --
    def _publish(self) -> None:
        """Replicas by state, ZooKeeper connectivity and readiness, after each turn."""
        if self.plane is None:
            return
        metrics = self.plane.metrics
        metrics.replicas(Counter(str(r.state) for r in self.state.shards.values()))
        metrics.zk_connected(self.client is not None and self.client.connected)
        if not self._plan_current:
            metrics.ready(False, "no plan read in this ZooKeeper session yet")
        else:
            metrics.ready(self.table.serving, "not serving: ZooKeeper session lost")

    # -- registration -------------------------------------------------------------------
    def register(self) -> bool:
        """Create our ephemeral member and status znodes for the current session."""
        self._create_ephemeral(self.paths.member(self.id), self.info.encode())
        self.report()
        log.info("registered as %s at %s", self.id, self.info.address)
        return True

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

    # -- plan ---------------------------------------------------------------------------
    def read_plan(self) -> shardsm.Plan | None:
        """Our plan znode as state-machine targets, with the addresses of the agents named."""
        path = self.paths.plan_agent(self.id)
        try:
            data, _ = self.client.get(path)
        except NoNodeError:
            if not self._plan_current:
                log.info("no plan for this agent yet: serving nothing until the leader"
                         " writes one (keeping %d shards' data)", len(self.state.shards))
            return None
        try:
            plan = AgentPlan.decode(path, data)
        except CorruptZnode as e:
            log.error("keeping generation %d: %s", self.applied_generation, e)
            return None
        if plan.generation < self.applied_generation:
            log.warning("ignoring plan generation %d: generation %d is applied",
                        plan.generation, self.applied_generation)
            return None
        self._plan_current = True
        self._read_addresses(referenced_agents(plan.replicas))
        self._plan_replicas = plan.replicas
        targets = {s: target_of(a, self.address_of) for s, a in plan.replicas.items()}
        level = logging.INFO if plan.generation != self.applied_generation else logging.DEBUG
        log.log(level, "read plan generation %d: %d replicas", plan.generation, len(targets))
        return shardsm.Plan(plan.generation, targets)

    def _read_addresses(self, ids: Iterable[str]) -> None:
        pending = {
            i: self.client.get_async(self.paths.member(i)) for i in sorted(ids) if i != self.id
        }
        for agent, result in pending.items():
            try:
                data, _ = result.get()
                self.addresses[agent] = MemberInfo.decode(self.paths.member(agent), data).address
            except NoNodeError:
                continue  # departed: keep the last known address, the plan will move on
            except CorruptZnode as e:
                log.error("ignoring member: %s", e)

    def address_of(self, agent: str) -> str:
        if agent == self.id:
            return self.address
        return self.addresses.get(agent, UNREACHABLE)

    def _prune_unowned(self) -> None:
        """Delete store files left from an earlier run for shards the plan does not place here."""
        self._pruned = True
        wanted = set(self.assignments) | set(self.state.shards)
        for shard in sorted(self.stores.on_disk() - wanted):
            log.info("shard %d: not in the plan; deleting its old store", shard)
            self.stores.drop(shard)

    # -- shard actions ------------------------------------------------------------------
    def _carry_out(self, action: Action) -> None:
        if isinstance(action, SetWritable):
            if action.writable:
                self._refresh_table()  # the routes of this turn first, then writes
            self.table.set_writable(action.writable)
        elif isinstance(action, SetServing):
            if action.serving:
                self._refresh_table()  # no request may see the routes of before the loss
            self.table.set_serving(action.serving)
        elif isinstance(action, ReportStatus):
            self.report()
        else:
            self._enqueue(action)

    def _enqueue(self, action: Action) -> None:
        shard = action.shard
        jobs = self._queues.setdefault(shard, deque())
        self._supersede(shard, action, jobs)
        self._seq += 1
        if isinstance(action, SYNC_ACTIONS):
            self._sync_seq[shard] = self._seq
        if isinstance(action, StartBootstrap):
            self._copy_seq[shard] = self._seq
            self.stores.open(shard)
            self._served[shard] = ShardState.BOOTSTRAPPING  # takes forwards while copying
        elif isinstance(action, Demote):
            self._served[shard] = ShardState.REPLICA  # refuse writes before repairing
            self._raise_fence(shard, action.generation)
        elif isinstance(action, Repair):
            self._raise_fence(shard, action.generation)  # refuse the old primary's forwards
        elif isinstance(action, StartDrop):
            self._served.pop(shard, None)
        peers: tuple[str, ...] = ()
        if isinstance(action, Promote):
            assignment = self.assignments.get(shard)
            peers = tuple(self.address_of(p) for p in assignment.peers) if assignment else ()
        jobs.append(_Job(action, self._seq, threading.Event(), peers))
        self._kick(shard)

    def _supersede(self, shard: int, action: Action, jobs: deque[_Job]) -> None:
        """Cancel the work a new action makes moot, so it does not wait behind it.

        A newer copy or a drop ends any copy; any newer action ends a repair or promotion
        still retrying against a peer (perhaps a dead one, or one at an old address).
        """
        ends_copies = isinstance(action, StartBootstrap | StartDrop)
        running = self._running.get(shard)
        if (
            running is not None
            and not isinstance(running.action, StartDrop)
            and (ends_copies or not isinstance(running.action, StartBootstrap))
        ):
            running.stop.set()
        moot = (StartBootstrap, Repair, CatchUp) if ends_copies else (Repair, CatchUp)
        for job in [j for j in jobs if isinstance(j.action, moot)]:
            jobs.remove(job)

    def _raise_fence(self, shard: int, generation: int) -> None:
        self._fence[shard] = max(self._fence.get(shard, 0), generation)

    def _kick(self, shard: int) -> None:
        jobs = self._queues.get(shard)
        if shard in self._running or not jobs:
            return
        job = jobs.popleft()
        self._running[shard] = job
        self._pool.submit(self._work, job)

    def _work(self, job: _Job) -> None:
        """Worker thread: carry out one shard action, report back to the main loop."""
        action = job.action
        event = None
        ok = False
        try:
            if isinstance(action, StartBootstrap | CatchUp) and action.attempt:
                job.stop.wait(min(0.25 * 2**action.attempt, 3.0))
            if isinstance(action, Promote):
                # Writes acknowledged while this replica was joining may have reached it
                # only best effort: take them from the in-sync peers before taking writes.
                self.handler.catch_up(action.shard, job.peers)
            if isinstance(action, StartBootstrap | StartDrop):
                event = perform(self.handler, action, job.stop)
            else:
                event = self._handler_call(lambda: perform(self.handler, action, job.stop), job)
            ok = True
        except Exception as exc:
            log.exception("shard %d: %s failed", action.shard, type(action).__name__)
            if isinstance(action, SYNC_ACTIONS):
                event = SyncFailed(action.shard, f"{type(exc).__name__}: {exc}")
        self.inbox.put(("done", job, event, ok))

    def _handler_call(self, fn: Any, job: _Job) -> Any:
        """Repairs and promotions wait on peers that may be mid-transition: retry, bounded."""

        def log_retry(state: Any) -> None:
            log.warning("shard %d: %s failed (%s); retrying", job.action.shard,
                        type(job.action).__name__, state.outcome.exception())
            # The peer may have come back at a new address: read the plan and members again.
            self.inbox.put(("plan",))

        policy = retry(
            stop=stop_after_delay(HANDLER_RETRY_SECONDS),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            retry=lambda state: state.outcome.failed and not job.stop.is_set(),
            before_sleep=log_retry,
            reraise=True,
        )
        return policy(fn)()

    def _finished(self, job: _Job, event: Event | None, ok: bool, inputs: _Inputs) -> None:
        action = job.action
        shard = action.shard
        if self._running.get(shard) is job:
            del self._running[shard]
        record = self.state.shards.get(shard)
        now = record.state if record is not None else None
        # Serve the new role only once the handler has done its part, and only if the
        # machine still wants that role.
        if ok and isinstance(action, BecomeReplica | CatchUp) and now == ShardState.REPLICA:
            self._served[shard] = ShardState.REPLICA
        elif ok and isinstance(action, Promote) and now == ShardState.PRIMARY:
            self._served[shard] = ShardState.PRIMARY
        if isinstance(event, CopyFailed):
            inputs.plan = True  # the source may have moved: read addresses again
        if event is not None:
            stale = (
                isinstance(action, StartBootstrap) and self._copy_seq.get(shard) != job.seq
            ) or (isinstance(action, SYNC_ACTIONS) and self._sync_seq.get(shard) != job.seq)
            if not stale:
                inputs.events.append(event)
        if isinstance(action, StartDrop):
            self._fence.pop(shard, None)
        self._kick(shard)

    # -- the data plane's table ---------------------------------------------------------
    def _refresh_table(self) -> None:
        for shard in set(self.table.routes()) - set(self._served):
            self.table.remove(shard)
        for shard, served in self._served.items():
            route = self._route_for(shard, served)
            if route != self.table.route(shard):
                self.table.set_route(shard, route)

    def _route_for(self, shard: int, served: ShardState) -> ShardRoute:
        record = self.state.shards.get(shard, shardsm.ShardRecord())
        assignment = self.assignments.get(shard)
        if served == ShardState.PRIMARY:
            peers: tuple[str, ...] = ()
            copying: tuple[str, ...] = ()
            if assignment is not None and assignment.role == Role.PRIMARY:
                peers = tuple(self.address_of(a) for a in assignment.peers)
                copying = tuple(self.address_of(a) for a in assignment.bootstrapping)
            # Its own term (Promote's): the high bits of its LSNs, the term of its forwards.
            return ShardRoute(ShardState.PRIMARY, record.generation, self.address, peers, copying)
        primary = None
        if assignment is not None and assignment.primary:
            primary = self.address_of(assignment.primary)
        # A replica takes forwards at exactly the term its plan gives the shard's primary
        # (the data plane never moves it); from a plan without terms, the last Repair's or
        # Demote's. Terms only grow, so the larger of the two is the current one.
        since = assignment.term if assignment is not None else 0
        return ShardRoute(served, max(since, self._fence.get(shard, 0)), primary)

    # -- status -------------------------------------------------------------------------
    def status(self) -> AgentStatus:
        shards = {}
        for shard, record in self.state.shards.items():
            store = self.stores.get(shard)
            lsn = store.sync_lsn() if store is not None else record.lsn
            shards[shard] = ShardStatus(str(record.state), lsn, record.syncing)
        return AgentStatus(self.id, self.applied_generation, shards)

    def report(self) -> None:
        """Write status/<id>; if ZooKeeper is unavailable, try again shortly."""
        path = self.paths.agent_status(self.id)
        data = self.status().encode()
        try:
            try:
                self.client.set(path, data)
            except NoNodeError:
                self._create_ephemeral(path, data)
        except KazooException as e:
            log.warning("status write failed (%s); retrying", type(e).__name__)
            self._later("status")


class HealthServer:
    """The agent's data plane (client and replication API, and GET /healthz) on --listen.

    Kept under this name for `shardkeeper agent run`: it binds at construction (so a bad
    --listen fails before the agent registers) and serves once the agent knows the token.
    """

    def __init__(self, agent: Agent, host: str, port: int):
        self.agent = agent
        self.plane = agent.attach_plane(host, port)

    def start(self) -> None:
        self.plane.start()

    def stop(self) -> None:
        self.plane.stop()
        self.agent.stores.close_all()
