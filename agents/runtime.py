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
* A plan znode that is corrupt, stale, or that no leader could have committed (its epoch
  is past the epoch znode's, its generation past plan/meta's, or it is older than the
  applied one): keep what is applied and every replica, log the reason, wait for the
  next (``shardsm.distrust``).
* Its own member or status znode deleted or overwritten while the session lives (a
  mistake or an attack): write it again at once (both are watched).
* A failed ZooKeeper read or status write: retried from the main loop after a short delay.
* SIGTERM (``stop``): the graceful hand-off, when the agent holds primaries
  (``agents.leaving``). It marks its member znode ``leaving``; the leader moves its
  primaries to in-sync replicas (the agent demotes each at once: it refuses writes and
  redirects to the new primary). Once that is done, or after ``handoff_timeout``, it
  refuses writes, closes its session (the member znode vanishes at once) and keeps
  answering forwards for a moment, so that no write waits on a replica that is gone.
  ``handoff_timeout`` 0 skips all of this: the session closes at once (``halt`` always).

Dropped replicas go to the data dir's trash (``agents.trash``), not to deletion.

Other agents are known by id in the plan; their data-plane addresses are read from their
``members/<id>`` znodes (read, never watched) each time the plan is read.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import secrets
import threading
import time
from collections import Counter
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
from agents.addresses import AddressBook
from agents.dataplane import DataPlane
from agents.handler import KVShardHandler, ShardHandler
from agents.host import DataDirInUse, DataDirLock, HealthServer  # noqa: F401 - for the CLI
from agents.leaderlink import LeaderLink
from agents.leaving import HANDOFF_TIMEOUT, HandOff, LookupTable, linger, primaries
from agents.shardsm import (
    Action,
    AgentState,
    CopyFailed,
    Event,
    Limits,
    ReportStatus,
    Session,
    SetServing,
    SetWritable,
    ShardEvent,
)
from agents.shardsm.views import referenced_agents
from agents.store import StoreError
from agents.storeset import DEFAULT_OPEN_STORES, StoreSet
from agents.trash import DEFAULT_KEEP_SECONDS, Trash
from agents.turnwork import Routes, Statuses, Targets
from agents.work import Job, ShardWork
from shardkeeper import __version__
from shardkeeper.layout import (
    AgentPlan,
    AgentStatus,
    MemberInfo,
    Paths,
    PlanMeta,
    decode_liveness,
)
from shardkeeper.peer import PeerClient
from shardkeeper.token import BadTokens, NoToken, Tokens, no_tokens_message, read_tokens
from shardkeeper.vocab import CorruptZnode, ShardkeeperError
from shardkeeper.zk import ZkTarget, ZkUnavailable, close, connect, ensure_layout

log = logging.getLogger(__name__)

# An address that refuses connections at once: stands in for a member whose znode is gone,
# so that a copy from it fails (and is retried) instead of looking like a new, empty shard.
UNREACHABLE = "127.0.0.1:1"
RETRY_DELAY = 0.2  # before re-trying a failed ZooKeeper read or status write
# How long a report that only acknowledges a new plan generation may wait for one that
# carries it anyway (a finished copy, a promotion): re-replication rewrites every agent's
# plan at each step, and each acknowledgement was a whole status write. The leader reads
# a late acknowledgement only as "not applied yet", the cautious side.
ACK_DELAY = 0.25
# When idle, the plan and other agents' addresses are read again this often (see
# agents/addresses.py: a members watch event may be lost with a session).
REFRESH_SECONDS = 5.0
# ZooKeeper errors that a new attempt on the same client may not meet again.
ZK_TRANSIENT = (ConnectionLoss, SessionExpiredError, OperationTimeoutError)

_SESSIONS = {
    KazooState.CONNECTED: Session.CONNECTED,
    KazooState.SUSPENDED: Session.SUSPENDED,
    KazooState.LOST: Session.LOST,
}


class StillRegistered(ShardkeeperError):
    pass


@dataclass
class _Inputs:
    """What one turn of the main loop collected from its inbox."""

    events: list[Event] = field(default_factory=list)
    plan: bool = False
    status: bool = False
    register: bool = False
    stop: bool = False
    leave: bool = False  # SIGTERM: hand off, then stop
    tokens: bool = False  # a token znode changed (a rotation step): read both again
    ack: bool = False  # ACK_DELAY passed: write a deferred acknowledgement


class Agent:
    def __init__(
        self,
        zk: ZkTarget,
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
        trash_keep: float = DEFAULT_KEEP_SECONDS,
        handoff_timeout: float = HANDOFF_TIMEOUT,
        open_stores: int = DEFAULT_OPEN_STORES,
    ):
        self.zk = zk
        self.paths = Paths(cluster)
        self.id = agent_id
        self.address = address
        self.info = MemberInfo(
            id=agent_id,
            address=address,
            zone=zone,
            weight=weight,
            version=__version__,
            started=time.time(),
        )
        self.session_timeout = session_timeout
        self.limits = limits
        self.trash = Trash(Path(data_dir) / "trash", trash_keep)
        self.stores = StoreSet(Path(data_dir) / "shards", self.trash, max_open=open_stores)
        # Nothing is served until the first connected reconcile says so.
        self.table = LookupTable(writable=False, serving=False)
        self.plane: DataPlane | None = None
        self.peer_client: PeerClient | None = None
        self.catch_up_client: PeerClient | None = None
        self.tokens: Tokens | None = None  # what the data plane accepts and sends now
        self.handler: ShardHandler | None = handler
        self.inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.stop_event = threading.Event()
        self.state = AgentState()
        self.book = AddressBook(self.paths, agent_id)
        # The plan znode as last decoded (its unchanged assignments are taken over), and
        # what the turn builds from the state, each redone only where it changed.
        self._stored: AgentPlan | None = None
        self.targets = Targets()
        self.routes = Routes(self.table, address)
        self.statuses = Statuses()
        self.client: KazooClient | None = None
        self._session = Session.CONNECTED
        self._must_register = False
        # Read our plan znode in this session yet? Until then nothing is served.
        self._plan_current = False
        self._pruned = False
        self._report = ReportStatus(0, ())  # the status the machine last asked for
        self._ack_due = False  # a deferred acknowledgement waits for its ACK_DELAY
        self._transitions = 0  # shard state transitions so far, and the metric's count of
        self._counted: tuple[int, int] | None = None  # them and of shards when published
        self._reported = False  # status written in this turn
        self._written: dict[str, bytes] = {}  # path -> what we last wrote to our znodes
        # ... and what we wrote before that: a watch callback may read the previous write
        # and run only after the next one was recorded.
        self._before: dict[str, bytes] = {}
        self.refused = 0  # plans not acted on because they could not be trusted
        self._refusal = ""  # why the current plan znode is not acted on, for status
        self.link: LeaderLink | None = None
        self.handoff = HandOff(handoff_timeout)
        self._running = threading.Event()  # past start-up: the main loop reads the inbox
        self._cut_linger = threading.Event()  # halt() during the linger: stop now
        self.work = ShardWork(lambda: self.handler, self._job_done,
                              retry_hint=lambda: self.inbox.put(("plan",)))

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

    def set_address(self, address: str) -> None:
        """The data plane's real address, once bound (``--listen HOST:0``); before run()."""
        self.address = address
        self.routes.me = address
        self.info = dataclasses.replace(self.info, address=address)

    @property
    def applied_generation(self) -> int:
        return self.state.applied_generation

    def _on_epoch(self, data: bytes | None, _stat: object) -> bool:
        """A new leader: hold the liveness link to it (agents/leaderlink.py)."""
        if self.stop_event.is_set():
            return False
        address = ""
        if data:
            try:
                address = decode_liveness(self.paths.epoch, data)
            except CorruptZnode as e:
                log.debug("no liveness link: %s", e)
        if self.link is not None:
            self.link.follow(address or None)
        return True

    def _use_token(self, tokens: Tokens) -> None:
        # Agents call each other's replication endpoints: they send the peer token.
        self.tokens = tokens
        if self.peer_client is not None and self.catch_up_client is not None:  # a rotation
            self.peer_client.token = self.catch_up_client.token = tokens.peer
        else:
            downloaded = self.plane.metrics.downloaded if self.plane else None  # issue 12
            self.peer_client = PeerClient(tokens.peer, timeout=5.0, attempts=4,
                                          on_download=downloaded)
            self.catch_up_client = PeerClient(tokens.peer, timeout=1.0, attempts=1)
        if self.handler is None:
            self.handler = KVShardHandler(self.stores, self.peer_client,
                                          quick_client=self.catch_up_client)
        if self.link is not None:
            self.link.token = tokens.peer
        if self.plane is not None:
            self.plane.set_tokens(tokens)

    def _reread_tokens(self) -> None:
        """A token znode changed: switch to what both say now, at once."""
        try:
            tokens = read_tokens(self.client, self.paths)
        except BadTokens as e:
            log.error("tokens not changed: %s", e)
            return
        except KazooException:
            self._later("tokens")  # read them again shortly
            raise
        if tokens is not None and tokens != self.tokens:
            self._use_token(tokens)
            log.info("data-plane tokens changed: %s", tokens.counts())

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

    def _on_meta(self, _data: bytes | None, _stat: object) -> bool:
        self.inbox.put(("meta",))
        return not self.stop_event.is_set()

    def _watch_own(self, path: str, kind: str):
        """A watch on our own member or status znode: if it vanishes or changes while our
        session lives (deleted or overwritten by someone else), write it again."""

        def on_data(data: bytes | None, _stat: object) -> bool:
            if self.stop_event.is_set():
                return False
            written = self._written.get(path)
            ours = data == written or (data is not None and data == self._before.get(path))
            if written is not None and not ours and self._session == Session.CONNECTED:
                log.warning("%s was %s behind our back: writing it again", path,
                            "deleted" if data is None else "changed")
                self.inbox.put((kind,))
            return True

        return on_data

    def _remember(self, path: str, data: bytes) -> None:
        """``data`` is what we are writing to our own znode ``path``."""
        if path in self._written and self._written[path] != data:
            self._before[path] = self._written[path]
        self._written[path] = data

    def _later(self, *item: Any, delay: float = RETRY_DELAY) -> None:
        timer = threading.Timer(delay, self.inbox.put, args=(item,))
        timer.daemon = True
        timer.start()

    def _job_done(self, job: Job, event: ShardEvent | None) -> None:
        self.inbox.put(("done", job, event))

    # -- main loop ----------------------------------------------------------------------
    def stop(self) -> None:
        """SIGTERM: hand off this agent's primaries, then leave (see the module docstring).
        An agent still starting (waiting for ZooKeeper or its tokens) holds nothing: it
        stops at once."""
        if not self._running.is_set():
            self.halt()
        self.inbox.put(("leave",))

    def halt(self) -> None:
        """Leave at once: close the session without a hand-off (or end the linger)."""
        self.stop_event.set()
        self._cut_linger.set()
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
            # root: without credentials the cluster's ACL grants, NotAuthorised (a
            # ZkUnavailable) is logged and retried like an unreachable ZooKeeper.
            return policy(connect)(self.zk, self.session_timeout, root=self.paths.root)
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
            self._running.set()
            self.inbox.put(("session", Session.CONNECTED))
            while not self.stop_event.is_set():
                try:
                    first = self.inbox.get(timeout=self._idle_wait())
                except queue.Empty:
                    self.book.stale()  # idle: read the plan and the addresses again
                    first = ("plan",)
                inputs = self._collect(first)
                if inputs.stop:
                    break
                self._turn(inputs)
                if inputs.leave or self.handoff.started:
                    self._leave_when_handed_off()
        finally:
            if self.handoff.handed_off:
                # Nothing here may take a write once the session is gone.
                self.table.set_writable(False)
            self.work.shutdown()
            close(self.client)
            log.info("agent %s stopped; session closed", self.id)
            if self.handoff.handed_off and self.plane is not None:
                linger(self.table, self._cut_linger)
            if self.link is not None:
                self.link.stop()

    def _idle_wait(self) -> float:
        return self.handoff.wait(REFRESH_SECONDS, time.monotonic())

    def _start(self) -> None:
        """Layout, token, registration and the watches, retried (bounded) while the
        session is lost or the connection drops: a loaded host or ZooKeeper can expire a
        short session before the agent is up, and kazoo reconnects on its own."""

        def log_retry(state: Any) -> None:
            log.warning("start-up step failed (%s); retrying",
                        type(state.outcome.exception()).__name__)

        watching = False

        def steps() -> None:
            nonlocal watching
            ensure_layout(self.client, self.paths)
            token = self.read_token()
            self._use_token(token)
            self.register(wait=True)
            if self.link is None:
                self.link = LeaderLink(self.id, self.info.started, token.peer).start()
            if not watching:
                for path in (self.paths.token, self.paths.peer_token):  # rotations
                    self.client.DataWatch(path, lambda *_: self.inbox.put(("tokens",)))
                self.client.ChildrenWatch(self.paths.members, self._on_members)
                self.client.DataWatch(self.paths.plan_agent(self.id), self._on_plan)
                # A plan written ahead of its commit is acted on once plan/meta catches up.
                self.client.DataWatch(self.paths.plan_meta, self._on_meta)
                self.client.DataWatch(self.paths.epoch, self._on_epoch)
                for path, kind in ((self.paths.member(self.id), "register"),
                                   (self.paths.agent_status(self.id), "status")):
                    self.client.DataWatch(path, self._watch_own(path, kind))
                watching = True

        policy = retry(
            retry=retry_if_exception_type(ZK_TRANSIENT),
            stop=stop_after_delay(max(60.0, 6 * self.session_timeout)),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            before_sleep=log_retry,
            reraise=True,
        )
        policy(steps)()
        for name in self.trash.purge():
            log.info("trash: purged %s (kept longer than %gs)", name, self.trash.keep_seconds)

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
        elif kind == "leave":
            inputs.leave = True
        elif kind == "plan":
            inputs.plan = True
        elif kind == "status":
            inputs.status = True
        elif kind == "tokens":
            inputs.tokens = True
        elif kind == "ack":
            inputs.ack = True
        elif kind == "meta":
            # A new commit point: it matters only to a plan znode refused so far (written
            # ahead of its commit); our own plan znode's watch reports its changes. Every
            # plan step commits a new plan/meta, most without touching our plan znode.
            inputs.plan = inputs.plan or bool(self._refusal)
        elif kind == "register":
            self._must_register = True
        elif kind == "session":
            session = item[1]
            if session == Session.LOST:
                self._must_register = True
                self._plan_current = False
            if session == Session.CONNECTED:
                inputs.plan = True  # the plan may have changed while we were away
            self._session = session
        elif kind == "done":
            event = item[2]
            if event is not None:
                inputs.events.append(event)
            if isinstance(event, CopyFailed):
                inputs.plan = True  # the source may have moved: read addresses again

    def _turn(self, inputs: _Inputs) -> None:
        if inputs.tokens:
            self._try(self._reread_tokens, "token read")
        plan = None
        session = self._session
        if session == Session.CONNECTED and self._must_register:
            if not self._try(self.register, "register"):
                session = Session.SUSPENDED  # not registered yet: do not take writes
                inputs.plan = False
            else:
                self._must_register = False
        if session == Session.CONNECTED and self.handoff.started:
            # The leader's answer to our leaving, read before our plan: a plan read after
            # it is at least as new as the plan that answer comes with.
            acked = self._try(self._read_ack, "plan")
            if acked is not None and acked != self.handoff.acked:
                self.handoff.acked = acked
                inputs.plan = True
        if session == Session.CONNECTED and (inputs.plan or not self._plan_current):
            plan = self._try(self.read_plan, "plan")
        if not self._plan_current:
            session = Session.LOST  # no plan read in this session: serve nothing yet
        decision = shardsm.reconcile(
            self.state, plan=plan, events=inputs.events, session=session, limits=self.limits
        )
        self.state = decision.agent
        for t in decision.transitions:
            log.info("shard %d: %s -> %s", t.shard, t.before, t.after)
        self._transitions += len(decision.transitions)
        self._reported = False
        for action in decision.actions:
            self._carry_out(action)
        if (inputs.status or (inputs.ack and self._ack_due)) and not self._reported:
            self.report()
        if plan is not None and not self._pruned:
            self._prune_unowned()
        self._refresh_table()
        self._publish()

    def _try(self, fn: Any, what: str) -> Any:
        """A ZooKeeper step of the main loop; on failure, another turn comes shortly."""
        try:
            return fn()
        except (KazooException, StillRegistered) as e:
            log.warning("%s failed (%s); retrying", what, e if isinstance(e, StillRegistered)
                        else type(e).__name__)
            self._later("register" if isinstance(e, StillRegistered) else "plan")
            return None

    # -- leaving (SIGTERM) ---------------------------------------------------------------
    def _leave_when_handed_off(self) -> None:
        """Start the hand-off on SIGTERM, and end the main loop once it is done, or
        pointless (nothing to hand off, no session, disabled), or past its deadline."""
        now, handoff = time.monotonic(), self.handoff
        if not handoff.started:
            if (handoff.timeout <= 0 or self._session != Session.CONNECTED
                    or not primaries(self.state) or not self._announce_leaving()):
                handoff.handed_off = handoff.timeout > 0
                self.stop_event.set()
            else:
                handoff.begin(self.state, now)
        elif handoff.may_leave(self.state, now):
            self.stop_event.set()

    def _announce_leaving(self) -> bool:
        """Mark our member znode ``leaving``; False if ZooKeeper could not be told."""
        self.info = dataclasses.replace(self.info, leaving=True)
        path = self.paths.member(self.id)
        data = self.info.encode()
        self._remember(path, data)
        try:
            self.client.set(path, data)
        except KazooException as e:
            log.warning("leaving: cannot mark %s (%s); leaving at once", path,
                        type(e).__name__)
            return False
        return True

    def _read_ack(self) -> int | None:
        """How many primaries the leader lets us keep, once it has seen us leaving."""
        try:
            data, _ = self.client.get(self.paths.plan_meta)
            return PlanMeta.decode(self.paths.plan_meta, data).leaving().get(self.id)
        except (NoNodeError, CorruptZnode):
            return None

    # -- issue 12: what only the runtime knows, for the data plane's /metrics and /readyz --
    def _publish(self) -> None:
        """Replicas by state, ZooKeeper connectivity and readiness, after each turn."""
        if self.plane is None:
            return
        metrics = self.plane.metrics
        shards = self.state.shards  # counted again only if a shard moved, came or went
        if self._counted != (self._transitions, len(shards)):
            self._counted = (self._transitions, len(shards))
            metrics.replicas(Counter(str(r.state) for r in shards.values()))
        metrics.zk_connected(self.client is not None and self.client.connected)
        if not self._plan_current:
            metrics.ready(False, "no plan read in this ZooKeeper session yet")
        else:
            metrics.ready(self.table.serving, "not serving: ZooKeeper session lost")

    # -- registration -------------------------------------------------------------------
    def register(self, wait: bool = False) -> bool:
        """Create our ephemeral member and status znodes for the current session.

        ``wait``: at start-up, a member znode held by an earlier incarnation (killed before
        its session expired) is waited for, bounded; later, a znode held by another
        session is reported and registration retried from the main loop."""
        path = self.paths.member(self.id)
        data = self.info.encode()
        self._remember(path, data)
        self._create_ephemeral(path, data, wait)
        self.report()
        log.info("registered as %s at %s", self.id, self.info.address)
        return True

    def _create_ephemeral(self, path: str, data: bytes, wait: bool = True) -> None:
        @retry(
            retry=retry_if_exception_type(NodeExistsError),
            stop=stop_after_delay(max(30.0, 3 * self.session_timeout) if wait else 0),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            reraise=True,
        )
        def attempt() -> None:
            try:
                self.client.create(path, data, ephemeral=True)
            except NodeExistsError:
                _, stat = self.client.get(path)
                if stat.ephemeralOwner != self.client.client_id[0]:
                    log.info("%s is held by another session; waiting for it to expire", path)
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
        """Our plan znode as state-machine targets, with the addresses of the agents named,
        if it can be trusted (``shardsm.distrust``)."""
        path = self.paths.plan_agent(self.id)
        try:
            data, _ = self.client.get(path)
        except NoNodeError:
            if not self._plan_current:
                log.info("no plan for this agent yet: serving nothing until the leader"
                         " writes one (keeping %d shards' data)", len(self.state.shards))
            return None
        try:
            stored = AgentPlan.decode(path, data, self._stored)
        except CorruptZnode as e:
            self._refuse(f"damaged: {e}")
            return None
        offered = shardsm.Plan(stored.generation, {}, stored.epoch)
        problem = shardsm.distrust(offered, self.state.plan, epoch=self._epoch(),
                                   committed=self._committed())
        if problem is not None:
            self._refuse(f"generation {stored.generation}: {problem}")
            return None
        self._refusal = ""
        self._plan_current = True
        self._stored = stored
        self.book.read(self.client, referenced_agents(stored.replicas))
        targets = self.targets.build(stored.replicas, self.book.known, self.address_of)
        level = logging.INFO if stored.generation != self.applied_generation else logging.DEBUG
        log.log(level, "read plan generation %d: %d replicas", stored.generation, len(targets))
        return shardsm.Plan(stored.generation, targets, stored.epoch)

    def _refuse(self, reason: str) -> None:
        """Keep the applied plan and every replica; say why in the log and in status."""
        self.refused += 1
        if self.plane is not None:
            self.plane.metrics.plan_refused()
        if reason != self._refusal:
            log.error("not acting on plan znode (keeping generation %d and every replica):"
                      " %s", self.applied_generation, reason)
            self._refusal = reason
            self.report()

    def _epoch(self) -> int | None:
        stat = self.client.exists(self.paths.epoch)
        return stat.version if stat is not None else None

    def _committed(self) -> int | None:
        try:
            data, _ = self.client.get(self.paths.plan_meta)
            return PlanMeta.decode(self.paths.plan_meta, data).generation
        except (NoNodeError, CorruptZnode):
            return None

    def _on_members(self, _children: list[str]) -> bool:
        """Members came or went: a new incarnation may listen at a new address."""
        self.book.stale()
        self.inbox.put(("plan",))
        return not self.stop_event.is_set()

    def address_of(self, agent: str) -> str:
        if agent == self.id:
            return self.address
        return self.book.known.get(agent, UNREACHABLE)

    def _prune_unowned(self) -> None:
        """Put aside store files left from an earlier run for shards the plan does not
        place here (into the trash, like any drop)."""
        self._pruned = True
        targets = self.state.plan.targets if self.state.plan else {}
        wanted = set(targets) | set(self.state.shards)
        for shard in sorted(self.stores.on_disk() - wanted):
            log.info("shard %d: not in the plan; putting its old store in the trash", shard)
            self.stores.drop(shard, f"not in plan generation {self.applied_generation} at"
                                    " start-up")

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
            self._report = action
            if action.urgent:
                self.report()
            elif not self._ack_due:  # at most one acknowledgement waits
                self._ack_due = True
                self._later("ack", delay=ACK_DELAY)
        else:
            if isinstance(action, shardsm.StartBootstrap):
                try:
                    self.stores.open(action.shard)  # forwards land in it while it copies
                except StoreError as e:
                    # A full disk: the copy opens it again and fails, and the machine
                    # retries it (bounded) or reports it; the agent itself must go on.
                    log.warning("shard %d: %s", action.shard, e)
            self.work.submit(action)

    # -- the data plane's table ---------------------------------------------------------
    def _refresh_table(self) -> None:
        self.routes.refresh(self.state)

    # -- status -------------------------------------------------------------------------
    def status(self) -> AgentStatus:
        """status/<id> as the state machine last reported it."""
        return self.statuses.status(self.id, self._report, self._refusal)

    def report(self) -> None:
        """Write status/<id>; if ZooKeeper is unavailable, try again shortly."""
        self._reported, self._ack_due = True, False
        path = self.paths.agent_status(self.id)
        data = self.status().encode()
        self._remember(path, data)
        try:
            try:
                self.client.set(path, data)
            except NoNodeError:
                self._create_ephemeral(path, data)
        except KazooException as e:
            log.warning("status write failed (%s); retrying", type(e).__name__)
            self._later("status")
