"""The replicate call, both ends: how a primary forwards a write, how a replica takes it.

Primary (``Replicator.forward``, called by the write path under the shard's write lock,
after the rows are applied locally): forward the rows to every in-sync replica (must ack)
and every catching-up replica (best effort), in parallel, with bounded timeouts. Forwards
carry the primary's generation and ``prev_lsn`` (its LSN before the batch). An in-sync
replica that is behind answers ``gap`` and is pushed every row it missed, in LSN order.
Holding the shard lock across the forward keeps each replica's stream in LSN order.

Replica (``accept_forward``, called under the shard's replica lock once the forward's
generation passed the fence): apply the rows in order.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from agents.dataplane.table import ShardRoute
from agents.store import ShardStore
from shardkeeper.peer import PeerClient, PeerError
from shardkeeper.wire import ErrorCode, Row

log = logging.getLogger(__name__)

# A lagging in-sync replica is pushed at most this many rows inline with a write; beyond
# that it should leave the in-sync set and catch up on its own.
MAX_PUSH_ROWS = 50_000
PUSH_PAGE_ROWS = 2_000


class Refused(Exception):
    """A replica refuses a forward (409): ``error`` and the details of the answer."""

    def __init__(self, error: ErrorCode, **details: Any):
        super().__init__(error)
        self.error = error
        self.details = details


def accept_forward(store: ShardStore, prev: int, rows: list[Row], sync: bool) -> int:
    """Apply a primary's forward on this replica; returns the replica's ``sync_lsn`` after.

    Best-effort forwards (``sync`` False, to a catching-up replica) are applied
    last-writer-wins. An in-sync forward applies only on top of ``prev`` (then
    ``sync_lsn`` moves to its last LSN); a retried forward already held is acknowledged;
    otherwise the replica is behind (``gap``) or ahead of the primary (``diverged``).
    Raises Refused; the caller holds the shard's replica lock.
    """
    if not sync:
        store.apply(rows)
        return store.sync_lsn()
    have, top = store.sync_lsn(), max(r.lsn for r in rows)
    if have == prev:
        store.apply_forward(rows, sync_lsn=top)
        return top
    if have >= top:
        return have  # a retried forward we already hold
    raise Refused(ErrorCode.GAP if have < prev else ErrorCode.DIVERGED, sync_lsn=have)


class Replicator:
    """A primary's forwards to its replicas; ``client`` is replaced when the token is."""

    def __init__(self, client: PeerClient, forward_timeout: float):
        self.client = client
        self.forward_timeout = forward_timeout
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="forward")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def forward(
        self, shard: int, route: ShardRoute, store: ShardStore, prev: int, rows: list[Row]
    ) -> list[str]:
        """Forward ``rows`` to all of ``route``'s replicas in parallel; returns the in-sync
        replicas that did not apply them (the write must not be acknowledged then)."""
        must: dict[Future, str] = {}
        for address in route.in_sync:
            future = self._pool.submit(
                self._forward_in_sync, address, shard, route.generation, store, prev, rows
            )
            must[future] = address
        best_effort = [
            self._pool.submit(self._forward_best_effort, address, shard, route.generation, rows)
            for address in route.catching_up
        ]
        done, _ = wait([*must, *best_effort], timeout=self.forward_timeout * 3)
        failed = []
        for future, address in sorted(must.items(), key=lambda item: item[1]):
            error = future.exception() if future in done else TimeoutError("no answer in time")
            if error is not None:
                log.warning("shard %s: forward to in-sync replica %s failed: %s",
                            shard, address, error)
                failed.append(address)
        return failed

    def _forward_in_sync(
        self,
        address: str,
        shard: int,
        generation: int,
        store: ShardStore,
        prev: int,
        rows: list[Row],
    ) -> None:
        reply = self.client.replicate(
            address, shard, generation=generation, prev_lsn=prev, rows=rows, sync=True
        )
        if reply.status == 409 and reply.body.get("error") == ErrorCode.GAP:
            self._push_missing(address, shard, generation, store, int(reply.body["sync_lsn"]))
        elif reply.status != 200:
            raise PeerError(address, f"replicate: {reply.status} {reply.body}", reply.status)

    def _push_missing(
        self, address: str, shard: int, generation: int, store: ShardStore, cursor: int
    ) -> None:
        """Send a lagging in-sync replica every row after its ``sync_lsn``, in LSN order."""
        pushed = 0
        while page := store.rows_after(cursor, PUSH_PAGE_ROWS):
            pushed += len(page)
            if pushed > MAX_PUSH_ROWS:
                raise PeerError(address, f"more than {MAX_PUSH_ROWS} rows behind")
            reply = self.client.replicate(
                address, shard, generation=generation, prev_lsn=cursor, rows=page, sync=True
            )
            if reply.status != 200:
                raise PeerError(address, f"push: {reply.status} {reply.body}", reply.status)
            cursor = page[-1].lsn

    def _forward_best_effort(
        self, address: str, shard: int, generation: int, rows: list[Row]
    ) -> None:
        try:
            self.client.replicate(
                address, shard, generation=generation, prev_lsn=0, rows=rows, sync=False
            )
        except PeerError as exc:
            log.debug("best-effort forward of shard %s to %s failed: %s", shard, address, exc)
