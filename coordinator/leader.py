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

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    BadVersionError,
    ConnectionLoss,
    KazooException,
    NodeExistsError,
    NoNodeError,
    SessionExpiredError,
)

from coordinator import policy
from coordinator.placement import place
from coordinator.reconcile import Throttle, next_step, with_terms
from coordinator.writes import PlanState, Write, batches, plan_writes
from shardkeeper import cluster
from shardkeeper.config import ClusterConfig
from shardkeeper.layout import (
    AgentStatus,
    Event,
    Maintenance,
    MemberInfo,
    MoveRequest,
    Paths,
    encode_epoch,
    encode_events,
)
from shardkeeper.vocab import CorruptZnode, ShardkeeperError
from shardkeeper.zk import close, connect, ensure_layout

log = logging.getLogger(__name__)

EVENTS_CAP = 1000  # audit log entries kept; the oldest are trimmed
# A new cluster's first plan waits until membership has been still this long, so that
# agents starting together are placed together instead of all shards landing on the
# first one and then moving (Kafka's group.initial.rebalance.delay plays the same role).
INITIAL_SETTLE = 1.0


class Deposed(Exception):
    """The epoch moved on: another leader was elected. Stop writing at once."""


class TermOver(Exception):
    """The session was suspended or lost, or the coordinator is stopping."""


class ChildCache:
    """The decoded data of every child of ``parent``, kept current by watches.

    The leader reads 1,000 members and statuses from memory instead of issuing 2,000
    reads per plan. A child that vanishes or turns corrupt drops out of ``snapshot``.
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
                value = self.decode(f"{self.parent}/{name}", data)
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
    ):
        self.client = client
        self.paths = paths
        self.leader_id = leader_id
        self.lost = lost
        self.stop = stop
        self.debounce = debounce
        self.wake = threading.Event()
        self.token = -1
        self.state = PlanState()
        self.known: dict[str, MemberInfo] = {}
        self.live_before: set[str] = set()
        self.departed_at: dict[str, float] = {}
        self.rebalance_version: int | None = None
        self.deadline: float | None = None
        self.events_kept = 0
        self.drained_reported: set[str] = set()
        self._unavailable_reported: tuple[int, ...] = ()
        self.pins: list[MoveRequest] = []  # moves carried out this term, kept in place
        self.seen: set[str] = set()
        self.membership_changed = 0.0

    # -- fenced writes -----------------------------------------------------------------
    def claim_epoch(self) -> int:
        """Bump the epoch; its new zk version fences every write of this term."""
        with contextlib.suppress(NodeExistsError):
            self.client.create(self.paths.epoch, encode_epoch(self.leader_id))
        stat = self.client.set(self.paths.epoch, encode_epoch(self.leader_id))
        return stat.version

    def commit(self, writes: list[Write]) -> None:
        """Apply writes in fenced multi() batches; plan/meta, last, is the commit point."""
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
            failed = [(w.path, r) for w, r in zip(batch, results[1:], strict=True)
                      if isinstance(r, Exception)]
            if failed:
                # Our view of the plan znodes was stale (NoNode/NodeExists): reload, retry.
                raise KazooException(f"plan write failed: {failed[:3]}")

    def event(self, kind: str, message: str, generation: int = 0) -> Event:
        log.info("event %s: %s", kind, message)
        return Event(time.time(), kind, message, generation)

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

    def caught_up(self, statuses: dict[str, AgentStatus]) -> set[tuple[str, int]]:
        """(agent, shard) pairs reported online by an agent that applied its latest plan."""
        out = set()
        for agent, status in statuses.items():
            plan = self.state.agents.get(agent)
            if plan is None or status.generation < plan.generation:
                continue
            out.update((agent, s) for s, st in status.shards.items() if st.in_sync)
        return out

    # -- one reconciliation ------------------------------------------------------------
    def reconcile(self, now: float) -> None:
        """Compute the next plan step from members, status, config and admin requests, and
        write what changed (plan, events, admin bookkeeping) in fenced multis."""
        config: ClusterConfig = cluster.read_config(self.client, self.paths)
        members: dict[str, MemberInfo] = self.members.snapshot()
        statuses: dict[str, AgentStatus] = self.statuses.snapshot()
        live = set(members)
        if live != self.seen:
            self.seen, self.membership_changed = live, now
        if self.state.meta is None and (
            not live or now - self.membership_changed < INITIAL_SETTLE
        ):
            self.deadline = self.membership_changed + INITIAL_SETTLE if live else None
            return
        self.known.update(members)
        writes: list[Write] = []
        audit: list[Event] = []
        gen = self.state.generation + 1

        for agent in sorted(live - self.live_before):
            audit.append(self.event("member-joined", f"{agent} joined", gen))
        for agent in sorted(self.live_before - live):
            audit.append(self.event("member-left", f"{agent} left", gen))
        self.departed_at = policy.track_departures(self.departed_at, self.live_before, live, now)
        self.live_before = live
        if self.rebalance_requested():
            self.departed_at = {}
            audit.append(self.event("rebalance", "rebalance requested: delay skipped", gen))

        maintenance = self.read_maintenance()
        wanted = policy.guard(maintenance, live, self.departed_at, config, now)
        if wanted != maintenance:
            if wanted is None:
                writes.append(Write("delete", self.paths.maintenance))
                audit.append(self.event("maintenance-left", "members returned: moves resume",
                                         gen))
            else:
                writes.append(Write("create", self.paths.maintenance, wanted.encode()))
                audit.append(self.event("maintenance-entered", wanted.note, gen))
            maintenance = wanted

        draining = set(self.client.get_children(self.paths.drains))
        waiting = policy.delayed(self.departed_at, config.rebalance_delay, now)
        self.deadline = policy.next_deadline(self.departed_at, config.rebalance_delay, now)
        previous = self.state.targets if self.state.meta else None
        placement = place(
            previous,
            policy.placement_members(members, self.known, waiting, draining),
            config.shards,
            config.replicas,
        )
        target, self.pins = policy.hold_moves(placement.replicas, self.pins, live, draining)
        target, outcomes = policy.apply_moves(target, self.read_moves(), live, draining)
        self.pins += [o.request for o in outcomes if o.accepted]
        for o in outcomes:
            writes.append(Write("delete", f"{self.paths.moves}/{o.name}"))
            if o.accepted:
                audit.append(self.event(
                    "move-accepted",
                    f"move shard {o.request.shard} from {o.request.source} to {o.request.dest}",
                    gen))
            else:
                audit.append(self.event("move-refused", f"{o.name} refused: {o.reason}", gen))

        step = next_step(
            self.state.shards,
            target,
            live,
            self.caught_up(statuses),
            Throttle(config.max_moves_per_agent, config.max_moves_total,
                     paused=maintenance is not None),
            min_in_sync=config.replicas,
        )
        summary = {
            "in_flight": step.in_flight,
            "deferred": step.deferred,
            "unavailable": len(step.unavailable),
            "maintenance": maintenance.reason if maintenance else None,
            "draining": sorted(draining),
            "waiting": sorted(waiting),
        }
        plan_changes, state = plan_writes(
            self.paths, self.state, with_terms(self.state.shards, step.plan, gen),
            tuple(target), live,
            epoch=self.token, leader=self.leader_id, replicas=config.replicas,
            shortfall=placement.shortfall, now=time.time(), summary=summary,
        )
        if plan_changes:
            moves = step.started + step.dropped + step.failovers + step.promotions + step.joined
            if moves or state.generation == 1:
                audit.append(self.event(
                    "plan",
                    f"generation {state.generation}: {step.started} copies started,"
                    f" {step.joined} joined, {step.dropped} dropped, {step.failovers}"
                    f" failovers, {step.promotions} primary moves, {step.in_flight} in flight,"
                    f" {step.deferred} deferred",
                    state.generation))
            if step.unavailable and step.unavailable != self._unavailable_reported:
                audit.append(self.event(
                    "shards-unavailable",
                    f"{len(step.unavailable)} shards have no live in-sync replica",
                    state.generation))
                self._unavailable_reported = step.unavailable
        for agent in sorted(draining - self.drained_reported):
            if state.meta and not any(agent in p.holders for p in state.shards):
                audit.append(self.event("drain-done", f"{agent} is drained", gen))
                self.drained_reported.add(agent)
        self.drained_reported &= draining
        if audit:
            writes.append(Write("append", self.paths.event_prefix, encode_events(audit)))
            self.events_kept += 1
        if not plan_changes and not writes:
            return
        # Plan znodes first and plan/meta last (the commit point), then the audit trail.
        self.commit(plan_changes[:-1] + writes + plan_changes[-1:])
        self.state = state
        self.trim_events()
        if plan_changes:
            log.info("plan generation %d written: %d members, %d znodes", state.generation,
                     len(live), len(plan_changes))

    def run(self) -> None:
        self.token = self.claim_epoch()
        log.info("%s leads with epoch %d", self.leader_id, self.token)
        self.state = cluster.read_plan(self.client, self.paths)
        # Members of the last plan that are gone now left during the failover: their
        # clocks (rebalance delay, mass-departure guard) start now.
        self.live_before = set(self.state.meta.members) if self.state.meta else set()
        self.events_kept = len(self.client.get_children(self.paths.events))
        self.members = ChildCache(self.client, self.paths.members, MemberInfo.decode,
                                  self._poke, self._active)
        self.statuses = ChildCache(self.client, self.paths.status, AgentStatus.decode,
                                   self._poke, self._active)
        for path in (self.paths.config, self.paths.maintenance, self.paths.rebalance):
            self.client.DataWatch(path, self._poke)
        for path in (self.paths.drains, self.paths.moves):
            self.client.ChildrenWatch(path, self._poke)
        self.wake.set()
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
            try:
                self.reconcile(time.time())
            except (cluster.NoConfig, CorruptZnode) as e:
                log.warning("%s", e)
            except (BadVersionError, Deposed):
                raise
            except KazooException as e:
                log.warning("reconcile failed (%s): reloading the stored plan", e)
                self.state = cluster.read_plan(self.client, self.paths)
                self.wake.set()


class Coordinator:
    """A candidate that campaigns until stopped, leading whenever it wins."""

    def __init__(self, hosts: str, cluster_name: str, candidate_id: str,
                 session_timeout: float = 10.0, debounce: float = 0.02):
        self.hosts = hosts
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
        client = connect(self.hosts, self.session_timeout)
        lost = threading.Event()

        def on_state(state: str) -> None:
            if state != KazooState.CONNECTED:
                lost.set()

        client.add_listener(on_state)
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

    def _lead(self, client: KazooClient, lost: threading.Event) -> None:
        term = LeaderTerm(client, self.paths, self.id, lost, self.stop_event, self.debounce)
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
            # Drop the session before Election.run releases its lock: releasing needs the
            # server, which may be unreachable; closing ends the term either way.
            client.stop()
