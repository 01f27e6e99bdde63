"""Tombstone compaction: which deletes every replica has, and purging them.

A delete stays a tombstone (``agents.store``) so that a replica that streams rows learns
it. Once every in-sync replica of a shard has passed a delete's LSN, none of them needs
it again, and the only readers that could still miss it (a copy or a repair streaming
from below that point) are refused by the store (``BehindHorizon``) and copy the whole
store instead. This module picks that point, the **horizon**, and applies it.

The shard's primary picks it. Every ``interval`` it asks each replica in its in-sync set
for its ``sync_lsn`` (``GET .../digest?digest=0``); the smallest of those and its own is
a candidate, remembered with the in-sync set and term it was measured under. A candidate
becomes the horizon once it is ``grace`` seconds old, if the in-sync set and the term
are still the same and no copy into the shard was seen meanwhile (a replica that joins
got its rows from a source, maybe before that source learned of the newest deletes; it
is in the set only after it caught up). So a tombstone is purged no sooner than
``grace`` after every in-sync replica had it. Replicas purge up to their primary's
horizon (asked for in the same way), never past their own ``sync_lsn``.

A replica that cannot answer, a changed set, a copy in flight: no candidate this round,
nothing purged. Compaction only ever waits; it is never needed for correctness.

``SHARDKEEPER_TOMBSTONE_GRACE`` sets ``grace`` (seconds, default an hour; 0 turns
compaction off); ``interval`` is a quarter of it.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agents.dataplane.table import ShardRoute, ShardTable
from agents.shardsm import ShardState
from agents.store import StoreError
from agents.storeset import StoreSet
from shardkeeper.peer import PeerClient, PeerError
from shardkeeper.wire import shard_path

log = logging.getLogger(__name__)

GRACE_ENV = "SHARDKEEPER_TOMBSTONE_GRACE"
DEFAULT_GRACE = 3600.0


def grace_from_env() -> float:
    """The configured grace in seconds (0: compaction off)."""
    text = os.environ.get(GRACE_ENV, "")
    try:
        grace = float(text) if text else DEFAULT_GRACE
    except ValueError:
        log.warning("%s=%r is not a number of seconds: using %g", GRACE_ENV, text,
                    DEFAULT_GRACE)
        return DEFAULT_GRACE
    return max(0.0, grace)


@dataclass(frozen=True)
class Candidate:
    lsn: int
    at: float
    term: int
    in_sync: frozenset[str]


@dataclass
class Horizons:
    """The primary's candidates per shard (pure: ``now`` comes in)."""

    grace: float
    candidates: dict[int, list[Candidate]] = field(default_factory=dict)

    def forget(self, shard: int) -> None:
        self.candidates.pop(shard, None)

    def offer(self, shard: int, candidate: Candidate, now: float) -> int | None:
        """Record a measured candidate; return the horizon now due, if any: the highest
        candidate at least ``grace`` old measured under the same term and in-sync set."""
        kept = [c for c in self.candidates.get(shard, [])
                if c.term == candidate.term and c.in_sync == candidate.in_sync]
        kept.append(candidate)
        due = [c for c in kept if now - c.at >= self.grace]
        # One due candidate is enough to keep: the highest; older ones add nothing.
        rest = [c for c in kept if now - c.at < self.grace]
        self.candidates[shard] = ([max(due, key=lambda c: c.lsn)] if due else []) + rest
        return max(c.lsn for c in due) if due else None


class Compactor:
    """The agent's compaction thread: one round every ``interval`` over its shards."""

    def __init__(self, stores: StoreSet, table: ShardTable, token: Callable[[], str],
                 grace: float, *, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stores = stores
        self.table = table
        self.token = token
        self.grace = grace
        self.interval = interval if interval is not None else max(0.5, grace / 4)
        self.clock = clock
        self.horizons = Horizons(grace)
        self.purged = 0  # tombstones purged so far (for tests and logs)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="compaction", daemon=True)
        self._client: PeerClient | None = None

    def start(self) -> Compactor:
        if self.grace > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.round()
            except Exception:  # a bug here must not end the thread, nor go unseen
                log.exception("compaction round failed")

    def _peer(self) -> PeerClient:
        token = self.token()
        if self._client is None or self._client.token != token:
            self._client = PeerClient(token, timeout=2.0, attempts=1)
        return self._client

    def _markers(self, address: str, shard: int) -> dict | None:
        """A holder's markers (sync_lsn, horizon, term, state), or None if it did not
        answer them."""
        try:
            reply = self._peer().call(address, "GET", shard_path(shard, "digest") + "?digest=0")
        except PeerError:
            return None
        return reply.body if reply.status == 200 else None

    def round(self) -> None:
        """One pass over every shard this agent serves (PRIMARY or synced REPLICA)."""
        routes = self.table.routes()
        for shard in [s for s in list(self.horizons.candidates) if s not in routes]:
            self.horizons.forget(shard)
        if not self.table.writable:
            return  # fenced (session suspended or lost): the in-sync set may be stale
        for shard, route in sorted(routes.items()):
            if self._stop.is_set():
                return
            try:
                if route.state == ShardState.PRIMARY:
                    self._as_primary(shard, route)
                elif route.state == ShardState.REPLICA:
                    self._as_replica(shard, route)
            except (StoreError, sqlite3.Error) as exc:  # dropped meanwhile, a full disk
                log.debug("shard %d: no compaction this round: %s", shard, exc)

    def _as_primary(self, shard: int, route: ShardRoute) -> None:
        store = self.stores.get(shard)
        if store is None:
            return
        if route.bootstrapping:
            self.horizons.forget(shard)  # a copy in flight: start measuring afresh after
            return
        lowest = store.sync_lsn()
        for address in route.in_sync:
            markers = self._markers(address, shard)
            if (markers is None or markers.get("term") != route.term
                    or markers.get("state") != ShardState.REPLICA):
                return  # not provably past anything this round
            lowest = min(lowest, int(markers.get("sync_lsn", 0)))
        now = self.clock()
        due = self.horizons.offer(
            shard, Candidate(lowest, now, route.term, frozenset(route.in_sync)), now)
        if due is not None:
            self._compact(shard, store, due)

    def _as_replica(self, shard: int, route: ShardRoute) -> None:
        store = self.stores.get(shard)
        if store is None or not route.primary:
            return
        markers = self._markers(route.primary, shard)
        if markers is None or markers.get("term") != route.term:
            return
        horizon = int(markers.get("horizon", 0))
        if horizon > store.horizon():
            self._compact(shard, store, horizon)

    def _compact(self, shard: int, store, horizon: int) -> None:
        purged = store.compact(horizon)
        if purged:
            self.purged += purged
            log.info("shard %d: %d tombstones compacted (horizon LSN %d)", shard, purged,
                     store.horizon())
