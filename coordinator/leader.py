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
from kazoo.exceptions import BadVersionError, KazooException, NodeExistsError, NoNodeError

from coordinator import cluster
from coordinator.layout import Paths, encode_epoch
from coordinator.placement import Member, place
from coordinator.plan import PlanState, Write, batches, plan_writes
from coordinator.zk import ShardkeeperError, close, connect, ensure_layout

log = logging.getLogger(__name__)


class Deposed(Exception):
    """The epoch moved on: another leader was elected. Stop writing at once."""


class TermOver(Exception):
    """The session was suspended or lost, or the coordinator is stopping."""


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

    def _check_term(self) -> None:
        if self.lost.is_set() or self.stop.is_set():
            raise TermOver()

    def _poke(self, *_args: object) -> bool:
        self.wake.set()
        # Returning False removes the watch once this term is over.
        return not (self.lost.is_set() or self.stop.is_set())

    def reconcile(self) -> None:
        """Compute the next plan from members and config, and write what changed."""
        config = cluster.read_config(self.client, self.paths)
        members = cluster.read_members(self.client, self.paths, skip_corrupt=True)
        previous = self.state.routing if self.state.meta else None
        if self.state.meta and self.state.meta.shards != config.shards:
            log.warning("shard count changed from %d to %d", self.state.meta.shards, config.shards)
        placement = place(
            previous,
            [Member(m.id, zone=m.zone, weight=m.weight) for m in members.values()],
            config.shards,
            config.replicas,
        )
        writes, state = plan_writes(
            self.paths,
            self.state,
            placement.replicas,
            members,
            epoch=self.token,
            leader=self.leader_id,
            replicas=config.replicas,
            shortfall=placement.shortfall,
            now=time.time(),
        )
        if not writes:
            return
        self.commit(writes)
        self.state = state
        log.info(
            "plan generation %d written: %d members, %d znodes, shortfall %d",
            state.generation, len(members), len(writes), placement.shortfall,
        )

    def run(self) -> None:
        self.token = self.claim_epoch()
        log.info("%s leads with epoch %d", self.leader_id, self.token)
        self.state = cluster.read_plan(self.client, self.paths)
        self.client.ChildrenWatch(self.paths.members, self._poke)
        self.client.DataWatch(self.paths.config, self._poke)
        self.wake.set()
        while True:
            self.wake.wait(0.5)
            self._check_term()
            if not self.wake.is_set():
                continue
            # Coalesce a burst of membership events into one plan.
            self.stop.wait(self.debounce)
            self.wake.clear()
            self._check_term()
            try:
                self.reconcile()
            except cluster.NoConfig as e:
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
        except NoNodeError as e:
            log.warning("%s: %s", self.id, e)
        except Exception:
            # A bug must not leave a leader that holds the lock but does nothing: step
            # down, let a standby try, and campaign again after a pause.
            log.exception("%s: leader term failed", self.id)
            self._backoff = 1.0
        finally:
            # Drop the session before Election.run releases its lock: releasing needs the
            # server, which may be unreachable; closing ends the term either way.
            client.stop()
