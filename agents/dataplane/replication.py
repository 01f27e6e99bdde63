"""The replicate call, both ends: how a primary forwards a write, how a replica takes it.

Primary (``Replicator.forward``, called by the write path under the shard's write lock,
after the rows are applied locally): forward the rows to every in-sync replica (must ack)
and every bootstrapping replica (best effort), in parallel, with bounded timeouts. The
calling thread encodes the forward once per kind (in sync, best effort), sends it to every
replica, then reads the answers (``PeerClient.post_many``): the replicas work at the same
time, and no other thread is woken on the way (a hand-off to a pool thread and back cost
more than a forward's own round trip on a busy 2-core host). Forwards carry the primary's
term and ``prev_lsn`` (its LSN before the batch). An in-sync replica that is behind answers
``gap`` and is pushed every row it missed, in LSN order; one that answers ``term_ahead``
has not read the plan that made this primary yet and is asked again for up to
``TERM_AHEAD_SECONDS``, then counts as failed (a bootstrapping one is not asked again: what
it misses is pushed once it is in sync). Those follow-ups run on the pool, in parallel,
within the same bound as before. Holding the shard lock across the forward keeps each
replica's stream in LSN order.

Replica (``accept_forward``, called under the shard's replica lock): the fencing rule. A
forward is taken only at exactly the term of the replica's route, which the runtime sets
from the plan (the term of the primary the plan names): a lower term is a deposed primary
(``stale_term``), a higher one a primary this replica's plan does not name yet
(``term_ahead``). Neither changes anything: a forward cannot move the fence, so a forged
one with a huge term cannot lock the real primary out.

Only agents hold the peer token that the replicate endpoint requires; still, a forward's
rows are checked against its term (``check_forward_rows``) and a retried forward is
acknowledged only if the replica holds its rows, so that not even a peer's bug can push a
replica's ``sync_lsn`` past what it applied and have real forwards acknowledged unapplied.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from agents.dataplane.table import ShardRoute
from agents.shardsm import ShardState
from agents.store import ShardStore, lsn_term
from shardkeeper.peer import PeerClient, PeerError, Reply, forward_payload
from shardkeeper.wire import ErrorCode, Malformed, Row, shard_path

log = logging.getLogger(__name__)

# A lagging in-sync replica is pushed at most this many rows inline with a write; beyond
# that it should leave the in-sync set and catch up on its own.
MAX_PUSH_ROWS = 50_000
PUSH_PAGE_ROWS = 2_000
# A replica answering term_ahead reads the same plan as this primary within about a plan
# propagation delay (tens of ms); past this it is treated as any failed replica.
TERM_AHEAD_SECONDS = 1.0

FORWARD_TAKERS = (ShardState.REPLICA, ShardState.BOOTSTRAPPING)


class Refused(Exception):
    """A replica refuses a forward (409): ``error`` and the details of the answer."""

    def __init__(self, error: ErrorCode, **details: Any):
        super().__init__(error)
        self.error = error
        self.details = details


def accept_forward(
    route: ShardRoute, store: ShardStore, term: int, prev: int, rows: list[Row], sync: bool
) -> int:
    """Apply a primary's forward on this replica; returns the replica's ``sync_lsn`` after.

    Best-effort forwards (``sync`` False, to a bootstrapping replica) are applied
    last-writer-wins. An in-sync forward applies only on top of ``prev`` (then
    ``sync_lsn`` moves to its last LSN); a retried forward already held is acknowledged;
    otherwise the replica is behind (``gap``) or ahead of the primary (``diverged``).
    Raises Refused, or Malformed for rows no primary of ``term`` sends; the caller holds the
    shard's replica lock and read ``route`` under it.
    """
    if route.state not in FORWARD_TAKERS:
        raise Refused(ErrorCode.NOT_REPLICA, state=str(route.state))
    if term < route.term:
        raise Refused(ErrorCode.STALE_TERM, term=route.term)
    if term > route.term:
        raise Refused(ErrorCode.TERM_AHEAD, term=route.term)
    check_forward_rows(term, prev, rows, sync)
    if not sync:
        store.apply(rows)
        return store.sync_lsn()
    applied, have = store.apply_on_top(rows, prev)  # reads sync_lsn in the same transaction
    if applied:
        return have
    if have >= rows[-1].lsn and _holds(store, rows):
        return have  # a retried forward we already hold
    raise Refused(ErrorCode.GAP if have < prev else ErrorCode.DIVERGED, sync_lsn=have)


def check_forward_rows(term: int, prev: int, rows: list[Row], sync: bool) -> None:
    """Raises Malformed unless ``rows`` could come from a primary of ``term``: LSNs rising,
    none of a later term, and (in sync) all after ``prev``.

    Rows of older terms are legitimate: a primary pushes a lagging replica the rows it
    missed, and those may have been written under an earlier primary.
    """
    if not rows:
        raise Malformed("a forward carries at least one row")
    if lsn_term(prev) > term:
        raise Malformed(f"prev_lsn {prev} is of term {lsn_term(prev)}, after term {term}")
    last = prev if sync else 0
    for row in rows:
        if lsn_term(row.lsn) > term:
            raise Malformed(f"row LSN {row.lsn} is of term {lsn_term(row.lsn)}, after the"
                            f" forward's term {term}")
        if row.lsn <= last:
            raise Malformed(f"row LSN {row.lsn} is not after {last}: a forward's rows rise"
                            " from its prev_lsn")
        last = row.lsn


def _holds(store: ShardStore, rows: list[Row]) -> bool:
    """Whether every row is applied here (or overwritten by a later write of its key)."""
    held = store.get_many(row.key for row in rows)
    return all(row.key in held and held[row.key].lsn >= row.lsn for row in rows)


def _term_ahead(reply: Reply) -> bool:
    return reply.status == 409 and reply.body.get("error") == ErrorCode.TERM_AHEAD


class Replicator:
    """A primary's forwards to its replicas; ``client`` is replaced when the token is."""

    def __init__(
        self,
        client: PeerClient,
        forward_timeout: float,
        *,
        term_ahead_wait: float = TERM_AHEAD_SECONDS,
        workers: int = 16,
        name: str = "forward",
    ):
        self.client = client
        self.forward_timeout = forward_timeout
        self.term_ahead_wait = term_ahead_wait
        # Threads start as forwards need them, up to ``workers``; then forwards queue.
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def forward(
        self, shard: int, route: ShardRoute, store: ShardStore, prev: int, rows: list[Row]
    ) -> list[str]:
        """Forward ``rows`` to all of ``route``'s replicas in parallel; returns the in-sync
        replicas that did not apply them (the write must not be acknowledged then)."""
        path = shard_path(shard, "replicate")
        in_sync = list(dict.fromkeys(route.in_sync))  # each once (post_many's rule)
        bootstrapping = [a for a in dict.fromkeys(route.bootstrapping) if a not in in_sync]
        calls = []
        if in_sync:
            payload = forward_payload(term=route.term, prev_lsn=prev, rows=rows, sync=True)
            calls += [(address, path, payload) for address in in_sync]
        if bootstrapping:
            payload = forward_payload(term=route.term, prev_lsn=0, rows=rows, sync=False)
            calls += [(address, path, payload) for address in bootstrapping]
        if not calls:
            return []
        replies = self.client.post_many(calls, timeout=self.forward_timeout)
        answers = dict(zip([address for address, _, _ in calls], replies, strict=True))
        for address in bootstrapping:
            _log_best_effort(shard, address, answers[address])
        failed: dict[str, BaseException] = {}
        follow_ups: dict[Future, str] = {}
        for address in in_sync:
            reply = answers[address]
            if isinstance(reply, PeerError):
                failed[address] = reply
            elif _term_ahead(reply) or _gap(reply):
                future = self._pool.submit(
                    self._forward_in_sync, address, shard, route.term, store, prev, rows, reply
                )
                follow_ups[future] = address
            elif reply.status != 200:
                failed[address] = PeerError(address, f"replicate: {reply.status} {reply.body}",
                                            reply.status)
        if follow_ups:
            timeout = self.forward_timeout * 3 + self.term_ahead_wait
            done, _ = wait(follow_ups, timeout=timeout)
            for future, address in follow_ups.items():
                error = future.exception() if future in done else TimeoutError("no answer in time")
                if error is not None:
                    failed[address] = error
        for address in sorted(failed):
            log.warning("shard %s: forward to in-sync replica %s failed: %s",
                        shard, address, failed[address])
        return sorted(failed)

    def _send(
        self, address: str, shard: int, term: int, prev: int, rows: list[Row], sync: bool
    ) -> Reply:
        """One forward; asked again, with backoff, while the replica answers term_ahead
        and ``term_ahead_wait`` has not passed. Returns the last answer."""
        deadline = time.monotonic() + self.term_ahead_wait
        pause = 0.005
        while True:
            reply = self.client.replicate(
                address, shard, term=term, prev_lsn=prev, rows=rows, sync=sync
            )
            left = deadline - time.monotonic()
            if not _term_ahead(reply) or left <= 0:
                return reply
            time.sleep(min(pause, left))  # a backoff, not a wait for an event we could see
            pause = min(pause * 2, 0.2)

    def _forward_in_sync(
        self, address: str, shard: int, term: int, store: ShardStore, prev: int, rows: list[Row],
        first: Reply,
    ) -> None:
        """Finish a forward whose ``first`` answer was term_ahead (ask again) or gap (push
        what the replica misses); raises unless the replica applied the rows."""
        reply = self._send(address, shard, term, prev, rows, sync=True) if _term_ahead(
            first) else first
        if _gap(reply):
            self._push_missing(address, shard, term, store, int(reply.body["sync_lsn"]))
        elif reply.status != 200:
            raise PeerError(address, f"replicate: {reply.status} {reply.body}", reply.status)

    def _push_missing(
        self, address: str, shard: int, term: int, store: ShardStore, cursor: int
    ) -> None:
        """Send a lagging in-sync replica every row after its ``sync_lsn``, in LSN order."""
        pushed = 0
        while page := store.rows_after(cursor, PUSH_PAGE_ROWS):
            pushed += len(page)
            if pushed > MAX_PUSH_ROWS:
                raise PeerError(address, f"more than {MAX_PUSH_ROWS} rows behind")
            reply = self._send(address, shard, term, cursor, page, sync=True)
            if reply.status != 200:
                raise PeerError(address, f"push: {reply.status} {reply.body}", reply.status)
            cursor = page[-1].lsn


def _gap(reply: Reply) -> bool:
    return reply.status == 409 and reply.body.get("error") == ErrorCode.GAP


def _log_best_effort(shard: int, address: str, reply: Reply | PeerError) -> None:
    # One try, even on term_ahead: what a bootstrapping replica misses is pushed to it
    # (gap) with the first forward after it joins the in-sync set, so asking again
    # would only hold the shard's write lock longer.
    if isinstance(reply, PeerError):
        log.debug("best-effort forward of shard %s to %s failed: %s", shard, address, reply)
    elif reply.status != 200:
        log.debug("best-effort forward of shard %s to %s refused: %s %s",
                  shard, address, reply.status, reply.body)
