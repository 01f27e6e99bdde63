"""The coordinator: candidates elect a leader; the leader alone writes plans, fenced by epoch.

kazoo's Election gives no callback when leadership is lost, so this module wraps it once:

* A candidate runs ``Election.run`` on a fresh session. Winning bumps ``epoch``; the
  znode's new version is this term's fencing token, and every plan write is a
  ``multi()`` that starts with ``check(epoch, token)``.
* The term ends at once on SUSPENDED or LOST (a connection listener sets ``lost``), on a
  BadVersion from the epoch check (another leader was elected: we are deposed), or on
  stop. The session is then closed and a new one campaigns again. Closing, rather than
  reusing, the session guarantees that our election znode goes away with the term; if
  the session cannot be closed cleanly (we were cut off) the server expires it after the
  session timeout, which is what bounds failover.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import replace

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    BadVersionError,
    ConnectionLoss,
    KazooException,
    NodeExistsError,
    NoNodeError,
    SessionExpiredError,
)

from coordinator.decide import Inputs, Memory, decide, still_dead
from coordinator.liveness import LivenessServer
from coordinator.metrics import CoordinatorMetrics
from coordinator.recover import rebuild
from coordinator.writes import Write, batches
from shardkeeper import cluster
from shardkeeper.config import ClusterConfig
from shardkeeper.layout import (
    AgentStatus,
    Maintenance,
    MemberInfo,
    MoveRequest,
    Paths,
    encode_epoch,
)
from shardkeeper.plan import PlanState, digest
from shardkeeper.token import peer_tokens_of, read_peer_tokens
from shardkeeper.vocab import CorruptZnode, ShardkeeperError
from shardkeeper.zk import ZkTarget, close, connect, ensure_layout

log = logging.getLogger(__name__)

EVENTS_CAP = 1000  # audit log entries kept; the oldest are trimmed
RETRY_FIRST, RETRY_MAX = 0.05, 2.0  # pause after a failed pass, doubling while it fails
# Placement runs on the leader's only thread of decisions: past this, a pass writes the
# best valid plan it has so that no departure waits for balance.
PLACEMENT_BUDGET = 0.5


class Deposed(Exception):
    """The epoch moved on: another leader was elected. Stop writing at once."""


class TermOver(Exception):
    """The session was suspended or lost, or the coordinator is stopping."""


class ChildCache:
    """The decoded data of every child of ``parent``, kept current by watches.

    The leader reads 1,000 members and statuses from memory instead of issuing 2,000
    reads per plan. A child that vanishes or turns corrupt drops out of ``snapshot``.
    ``decode(path, data, previous)`` gets the value last decoded for that child (None if
    there is none), so that it can take over what did not change.
    """

    def __init__(self, client: KazooClient, parent: str, decode, on_change, active):
        self.client = client
        self.parent = parent
        self.decode = decode
        self.on_change = on_change
        self.active = active
        self.lock = threading.Lock()
        self.names: set[str] = set()
        self.data: dict[str, object] = {}
        self.watched: set[str] = set()
        client.ChildrenWatch(parent, self._children)

    def _children(self, names: list[str]) -> bool:
        if not self.active():
            return False
        with self.lock:
            self.names = set(names)
            new = [n for n in names if n not in self.watched]
            self.watched.update(new)
        for name in new:
            self.client.DataWatch(f"{self.parent}/{name}", self._watcher(name))
        self.on_change()
        return True

    def _watcher(self, name: str):
        # Exactly two parameters: kazoo passes the event too to a callback with three.
        def on_data(data: bytes | None, _stat: object) -> bool:
            return self._data(name, data)

        return on_data

    def _data(self, name: str, data: bytes | None) -> bool:
        if not self.active():
            return False
        value = None
        if data is not None:
            try:
                with self.lock:
                    previous = self.data.get(name)
                value = self.decode(f"{self.parent}/{name}", data, previous)
            except CorruptZnode as e:
                log.error("ignoring corrupt znode: %s", e)
        with self.lock:
            if value is None:
                self.data.pop(name, None)
            else:
                self.data[name] = value
        self.on_change()
        return True

    def snapshot(self) -> dict:
        with self.lock:
            return {n: v for n, v in self.data.items() if n in self.names}


class LeaderTerm:
    """One term of leadership on one session. ``run`` returns or raises when it ends."""

    def __init__(
        self,
        client: KazooClient,
        paths: Paths,
        leader_id: str,
        lost: threading.Event,
        stop: threading.Event,
        debounce: float = 0.02,
        liveness: tuple[str, int] | None = None,
        metrics: CoordinatorMetrics | None = None,
    ):
        self.client = client
        self.metrics = metrics or CoordinatorMetrics()  # issue 12: /metrics and /readyz
        self.liveness_at = liveness
        self.liveness: LivenessServer | None = None
        # (agent, started) of member incarnations whose process is known dead.
        self.dead: set[tuple[str, float]] = set()
        self.dead_lock = threading.Lock()  # _died runs on the liveness server's thread
        self.paths = paths
        self.leader_id = leader_id
        self.lost = lost
        self.stop = stop
        self.debounce = debounce
        self.wake = threading.Event()
        self.token = -1
        self.memory = Memory()
        self.rebalance_version: int | None = None
        self.deadline: float | None = None
        self.events_kept = 0
        self.placement_overruns = 0
        # What this term believes each plan znode holds (digest of its bytes): a watch
        # that sees something else means a znode was changed or deleted behind our back.
        self.digests: dict[str, int] = {}
        # The digest each plan znode had before our last write of it: a watch callback may
        # read that write's predecessor and run only after we recorded the new digest.
        self.previous: dict[str, int | None] = {}
        self.tampered = threading.Event()
        self._chunk_watches: set[str] = set()

    # -- fenced writes -----------------------------------------------------------------
    def claim_epoch(self, plan: PlanState) -> int:
        """Bump the epoch; its new zk version fences every write of this term.

        A deleted epoch znode comes back at version 0: bump it past every epoch the
        stored plan was written under, so that no earlier leader's token is valid again.
        """
        created = False
        data = encode_epoch(self.leader_id, self.liveness.address if self.liveness else "")
        with contextlib.suppress(NodeExistsError):
            self.client.create(self.paths.epoch, data)
            created = True
        floor = max([plan.meta.epoch if plan.meta else 0]
                    + [a.epoch for a in plan.agents.values()])
        stat = self.client.set(self.paths.epoch, data)
        if created and floor:
            log.error("the epoch znode was missing: recreated past epoch %d", floor)
            while stat.version <= floor:
                stat = self.client.set(self.paths.epoch, data)
        return stat.version

    def commit(self, writes: list[Write]) -> None:
        """Apply writes in fenced multi() batches; plan/meta, last, is the commit point."""
        for w in writes:
            if w.path.startswith(self.paths.plan + "/") and w.op != "append":
                self.previous[w.path] = self.digests.get(w.path)
                if w.op == "delete":
                    self.digests.pop(w.path, None)
                else:
                    self.digests[w.path] = digest(w.data)
        for batch in batches(writes):
            self._check_term()
            tx = self.client.transaction()
            tx.check(self.paths.epoch, self.token)
            for w in batch:
                if w.op == "create":
                    tx.create(w.path, w.data)
                elif w.op == "append":
                    tx.create(w.path, w.data, sequence=True)
                elif w.op == "set":
                    tx.set_data(w.path, w.data)
                else:
                    tx.delete(w.path)
            results = tx.commit()
            if isinstance(results[0], BadVersionError):
                raise Deposed(f"epoch moved past {self.token}")
            if isinstance(results[0], NoNodeError):
                # Someone deleted the epoch: step down; the next leader recreates it past
                # every epoch in use.
                raise Deposed("the epoch znode is gone")
            failed = [(w.path, r) for w, r in zip(batch, results[1:], strict=True)
                      if isinstance(r, Exception)]
            if failed:
                # Our view of the plan znodes was stale (NoNode/NodeExists): reload, retry.
                raise KazooException(f"plan write failed: {failed[:3]}")

    def trim_events(self) -> None:
        """Keep the audit log capped: delete the oldest entries beyond EVENTS_CAP."""
        if self.events_kept <= EVENTS_CAP + EVENTS_CAP // 10:
            return
        names = sorted(self.client.get_children(self.paths.events))
        excess = names[: max(0, len(names) - EVENTS_CAP)]
        self.commit([Write("delete", f"{self.paths.events}/{n}") for n in excess])
        self.events_kept = len(names) - len(excess)

    def _check_term(self) -> None:
        if self.lost.is_set() or self.stop.is_set():
            raise TermOver()

    def _active(self) -> bool:
        return not (self.lost.is_set() or self.stop.is_set())

    def _poke(self, *_args: object) -> bool:
        self.wake.set()
        # Returning False removes the watch once this term is over.
        return self._active()

    # -- watching our own plan -----------------------------------------------------------
    def watch_plan(self) -> None:
        """Watch plan/meta, the routing chunks and the list of agent plans: the leader is
        the only writer, so any other change is damage to repair (clients route by the
        chunks). Agents check their own plan znodes (shardsm.distrust)."""
        self.client.DataWatch(self.paths.plan_meta, self._plan_data(self.paths.plan_meta))
        self.client.ChildrenWatch(self.paths.routing, self._chunk_names)
        self.client.ChildrenWatch(self.paths.plan_agents, self._agent_names)

    def _plan_data(self, path: str):
        def on_data(data: bytes | None, _stat: object) -> bool:
            if not self._active():
                return False
            seen = digest(data)
            if (path in self.digests and seen != self.digests[path]
                    and (data is None or seen != self.previous.get(path))):
                self._tamper(path, "deleted" if data is None else "changed")
            return data is not None or path == self.paths.plan_meta

        return on_data

    def _chunk_names(self, names: list[str]) -> bool:
        if not self._active():
            return False
        present = {f"{self.paths.routing}/{n}" for n in names}
        for path in sorted(present - self._chunk_watches):
            self._chunk_watches.add(path)
            self.client.DataWatch(path, self._plan_data(path))
        self._chunk_watches &= present
        self._missing(present, self.paths.routing)
        return True

    def _agent_names(self, names: list[str]) -> bool:
        if not self._active():
            return False
        self._missing({f"{self.paths.plan_agents}/{n}" for n in names}, self.paths.plan_agents)
        return True

    def _missing(self, present: set[str], parent: str) -> None:
        gone = [p for p in self.digests if p.startswith(parent + "/") and p not in present]
        if gone:
            self._tamper(gone[0], "deleted")

    def _tamper(self, path: str, how: str) -> None:
        log.error("%s was %s behind the leader's back: reading the plan again to repair it",
                  path, how)
        self.tampered.set()
        self.wake.set()

    # -- reading admin state -------------------------------------------------------------
    def read_maintenance(self) -> Maintenance | None:
        try:
            data, _ = self.client.get(self.paths.maintenance)
        except NoNodeError:
            return None
        try:
            return Maintenance.decode(self.paths.maintenance, data)
        except CorruptZnode as e:
            log.error("treating a corrupt maintenance znode as manual maintenance: %s", e)
            return Maintenance("manual", 0.0, note="corrupt maintenance znode")

    def read_moves(self) -> list[tuple[str, MoveRequest | None]]:
        out: list[tuple[str, MoveRequest | None]] = []
        for name in sorted(self.client.get_children(self.paths.moves)):
            path = f"{self.paths.moves}/{name}"
            try:
                data, _ = self.client.get(path)
                out.append((name, MoveRequest.decode(path, data)))
            except NoNodeError:
                continue
            except CorruptZnode as e:
                log.error("%s", e)
                out.append((name, None))
        return out

    def rebalance_requested(self) -> bool:
        """True once per `shardkeeper rebalance` (each bumps the znode's version)."""
        stat = self.client.exists(self.paths.rebalance)
        version = stat.version if stat else -1
        first = self.rebalance_version is None
        changed = version != self.rebalance_version
        self.rebalance_version = version
        return changed and not first

    # -- one pass --------------------------------------------------------------------
    def read_config(self) -> tuple[ClusterConfig | None, str]:
        """The config znode, or None and why not: a missing or damaged config must not
        stop failover (decide keeps the last accepted one)."""
        try:
            return cluster.read_config(self.client, self.paths), ""
        except (cluster.NoConfig, CorruptZnode) as e:
            return None, str(e)

    def start_liveness(self) -> None:
        """Listen for the agents' liveness links (see coordinator/liveness.py). Without a
        free port, failover simply waits for sessions."""
        if self.liveness_at is None:
            return
        # The peer tokens: agents hold them, clients do not (a hello proves an agent).
        # None yet before `shardkeeper init`: the server listens from the term's start all
        # the same, refuses hellos until the watch below brings the tokens, and agents
        # retry (a leader elected before init must not wait for crashed agents' sessions).
        tokens = read_peer_tokens(self.client, self.paths)
        try:
            self.liveness = LivenessServer(*self.liveness_at, tokens, self._address_of,
                                           self._died).start()
        except OSError as e:
            log.error("cannot listen for liveness links on %s:%d (%s): crashed agents are"
                      " seen at their session timeout", *self.liveness_at, e.strerror)
            return
        self.client.DataWatch(self.paths.peer_token, self._on_peer_token)

    def _on_peer_token(self, data: bytes | None, _stat: object) -> bool:
        """A rotation step: accept the hellos of the peer tokens listed now."""
        liveness = self.liveness
        if liveness is None or liveness.stopped.is_set():
            return False
        tokens = peer_tokens_of(data)
        if tokens and tokens != liveness.tokens:
            liveness.tokens = tokens
            log.info("liveness: accepting %d peer token(s)", len(tokens))
        return True

    def _address_of(self, agent: str) -> str | None:
        info = self.members.snapshot().get(agent)
        return info.address if info else None

    def _died(self, agent: str, started: float) -> None:
        with self.dead_lock:
            self.dead.add((agent, started))
        self.wake.set()

    def read_inputs(self, now: float) -> Inputs:
        config, config_error = self.read_config()
        members = self.members.snapshot()
        statuses = self.statuses.snapshot()
        with self.dead_lock:
            self.dead, dead = still_dead(self.dead, members, statuses)
        return Inputs(
            now=now,
            config=config,
            config_error=config_error,
            members=members,
            statuses=statuses,
            maintenance=self.read_maintenance(),
            draining=frozenset(self.client.get_children(self.paths.drains)),
            moves=tuple(self.read_moves()),
            rebalance=self.rebalance_requested(),
            dead=dead,
        )

    def reconcile(self, now: float) -> None:
        """Read, decide (pure), and write what changed in fenced multis."""
        started = time.monotonic()
        inputs = self.read_inputs(now)
        stop_at = time.monotonic() + PLACEMENT_BUDGET
        outcome = decide(self.memory, inputs, paths=self.paths, leader=self.leader_id,
                         epoch=self.token, should_stop=lambda: time.monotonic() > stop_at)
        if not outcome.balanced:
            self.placement_overruns += 1
            log.warning("placement took longer than %.2fs: wrote a valid plan (failover and"
                        " re-replication done), balance continues in the next pass (%d"
                        " overruns this term)", PLACEMENT_BUDGET, self.placement_overruns)
        self.deadline = outcome.deadline
        if outcome.writes:
            self.commit(list(outcome.writes))
        self.memory = outcome.memory
        for e in outcome.audit:
            log.info("event %s: %s", e.kind, e.message)
        if any(w.op == "append" for w in outcome.writes):
            self.events_kept += 1
            self.trim_events()
        if outcome.plan_written:
            log.info("plan generation %d written: %d members, %d znodes", outcome.generation,
                     len(outcome.memory.live_before), len(outcome.writes))
        self.metrics.pass_done(outcome, time.monotonic() - started)  # issue 12

    def load_plan(self) -> Memory:
        """The stored plan, rebuilt where plan znodes are damaged or missing: a damaged
        znode is repaired by the next plan, never a reason to give up leadership."""
        stored = cluster.read_stored_plan(self.client, self.paths)
        config, _ = self.read_config()
        shards = config.shards if config else (stored.meta.shards if stored.meta else 0)
        replicas = config.replicas if config else (stored.meta.replicas if stored.meta else 1)
        rebuilt = rebuild(stored, self.statuses.snapshot(), self.paths, shards=shards,
                          replicas=replicas)
        for note in rebuilt.notes:
            log.error("damaged plan: %s", note)
        self.digests = {p: d for p, d in stored.digests.items() if p not in stored.damaged}
        return replace(Memory.at_start(rebuilt.plan, rebuilt.notes), config=self.memory.config)

    def reload(self) -> None:
        """Read the stored plan again (repairing what is damaged), keeping this term's
        memory of departures, pins and what was reported."""
        fresh = self.load_plan()
        self.memory = replace(self.memory, plan=fresh.plan, notes=fresh.notes)

    def run(self) -> None:
        self.members = ChildCache(self.client, self.paths.members,
                                  lambda path, data, _previous: MemberInfo.decode(path, data),
                                  self._poke, self._active)
        self.statuses = ChildCache(self.client, self.paths.status, AgentStatus.decode,
                                   self._poke, self._active)
        self.memory = self.load_plan()
        self.watch_plan()
        self.start_liveness()
        self.token = self.claim_epoch(self.memory.plan)
        log.info("%s leads with epoch %d", self.leader_id, self.token)
        self.metrics.term_started(self.token)  # issue 12
        self.memory = replace(self.memory,
                              announce=f"{self.leader_id} leads with epoch {self.token}")
        self.events_kept = len(self.client.get_children(self.paths.events))
        for path in (self.paths.config, self.paths.maintenance, self.paths.rebalance):
            self.client.DataWatch(path, self._poke)
        for path in (self.paths.drains, self.paths.moves):
            self.client.ChildrenWatch(path, self._poke)
        self.wake.set()
        failures = 0
        while True:
            timeout = 0.5
            if self.deadline is not None:
                timeout = max(0.0, min(timeout, self.deadline - time.time()))
            self.wake.wait(timeout)
            self._check_term()
            due = self.deadline is not None and time.time() >= self.deadline
            if not self.wake.is_set() and not due:
                continue
            # Coalesce a burst of events (a rack going away) into one plan.
            self.stop.wait(self.debounce)
            self.wake.clear()
            self._check_term()
            if self.tampered.is_set():
                self.tampered.clear()
                self.reload()
            try:
                self.reconcile(time.time())
                failures = 0
            except (BadVersionError, Deposed):
                raise
            except KazooException as e:
                # Our view of the stored plan was wrong (a znode deleted or written behind
                # our back): read it again, rebuilding what is damaged, and retry with a
                # growing pause so that a fault we cannot fix costs no busy loop.
                failures += 1
                self.metrics.pass_failed(type(e).__name__)  # issue 12
                pause = min(RETRY_MAX, RETRY_FIRST * 2 ** (failures - 1))
                log.warning("reconcile failed (%s): reloading the stored plan, retrying in"
                            " %.2fs", e, pause)
                self.stop.wait(pause)
                self._check_term()
                self.reload()
                self.wake.set()


class Coordinator:
    """A candidate that campaigns until stopped, leading whenever it wins."""

    def __init__(self, zk: ZkTarget, cluster_name: str, candidate_id: str,
                 session_timeout: float = 10.0, debounce: float = 0.02,
                 liveness: tuple[str, int] | None = ("127.0.0.1", 0),
                 metrics: CoordinatorMetrics | None = None):
        self.zk = zk
        # Issue 12: what --http serves (/metrics, /readyz), fed by the marked hooks below.
        self.metrics = metrics or CoordinatorMetrics()
        self.liveness = liveness  # where agents hold a link to the leader; None: no link
        self.paths = Paths(cluster_name)
        self.id = candidate_id
        self.session_timeout = session_timeout
        self.debounce = debounce
        self.stop_event = threading.Event()
        self._client: KazooClient | None = None
        self._election = None
        self._backoff = 0.0

    def stop(self) -> None:
        self.stop_event.set()
        if self._election is not None:
            self._election.cancel()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self._backoff = 0.0
            try:
                self._campaign()
            except ShardkeeperError as e:
                log.error("%s; retrying", e)
                self._backoff = 1.0
            self.stop_event.wait(self._backoff)

    def _campaign(self) -> None:
        # NotAuthorised (no credentials the cluster's ACL grants) is a ShardkeeperError:
        # run() logs it and campaigns again after a pause.
        client = connect(self.zk, self.session_timeout, root=self.paths.root)
        lost = threading.Event()

        def on_state(state: str) -> None:
            self.metrics.zk_connected(state == KazooState.CONNECTED)  # issue 12
            if state != KazooState.CONNECTED:
                lost.set()

        client.add_listener(on_state)
        self.metrics.zk_connected(client.connected)  # issue 12: connected before the listener
        try:
            ensure_layout(client, self.paths)
            self._election = client.Election(self.paths.election, self.id)
            if self.stop_event.is_set():
                return
            self._election.run(self._lead, client, lost)
        except (KazooException, TermOver, Deposed) as e:
            log.info("%s: term or candidacy ended (%s)", self.id, type(e).__name__)
        finally:
            self._election = None
            close(client)
            self.metrics.zk_connected(False)  # issue 12

    def _lead(self, client: KazooClient, lost: threading.Event) -> None:
        term = LeaderTerm(client, self.paths, self.id, lost, self.stop_event, self.debounce,
                          self.liveness, self.metrics)
        try:
            term.run()
        except Deposed as e:
            log.warning("%s deposed: %s", self.id, e)
        except TermOver:
            log.warning("%s gives up leadership (session %s)", self.id,
                        "ending" if self.stop_event.is_set() else "suspended or lost")
        except (SessionExpiredError, ConnectionLoss) as e:
            # A read or write failed before the connection listener ran: same cause.
            log.warning("%s gives up leadership (session suspended or lost: %s)", self.id,
                        type(e).__name__)
        except KazooException as e:
            log.warning("%s gives up leadership after a ZooKeeper error: %r", self.id, e)
        except Exception:
            # A bug must not leave a leader that holds the lock but does nothing: step
            # down, let a standby try, and campaign again after a pause.
            log.exception("%s: leader term failed", self.id)
            self._backoff = 1.0
        finally:
            self.metrics.term_ended()  # issue 12
            if term.liveness is not None:
                term.liveness.stop()
            # Drop the session before Election.run releases its lock: releasing needs the
            # server, which may be unreachable; closing ends the term either way.
            client.stop()
