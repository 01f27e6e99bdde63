"""The client library: keys to shards to primaries, with the routing table cached behind a watch.

::

    with DataClient.connect(ZkTarget.parse("127.0.0.1:2181"), "prod") as kv:
        kv.put(b"user:1", b"alice")
        kv.get(b"user:1")            # b"alice"; None when absent

Routing: a key maps to a shard with ``shardkeeper.ring.shard_for_key`` (xxhash64 ring); the shard's
in-sync replicas, primary first, come from ``plan/routing``; agent ids become data-plane
addresses through ``members/<id>``. The table is read once and cached; a ZooKeeper watch on
``plan/meta`` (the plan's commit point) marks it stale, and it is read again on next use.

Failures: requests go to the primary; a redirect is followed (bounded, by ``PeerClient``).
No answer, 503 (fenced, failing over, a primary being handed off or promoted), a shard
the agent does not hold, or no primary at all: the cached table is marked stale and the
call is retried with jittered exponential backoff, from ``FIRST_RETRY`` seconds (a
primary hand-off takes a plan propagation, tens of milliseconds: a write that meets one
is retried at the new primary at once) up to ``MAX_RETRY_WAIT``, until ``deadline``
seconds have passed (a bounded tenacity policy), then raises ``Unavailable``. While
ZooKeeper is unreachable (the client's session suspended: quorum loss, a partition) the
table is not read again, since kazoo would hold the read until ZooKeeper answers and the
deadline would mean nothing: the cached table serves (the agents still serve their last
plan, and redirect or refuse what they no longer hold), and with no table cached the
call is retried until the deadline. A 4xx answer (bad token, malformed or oversized
request) is not retried: it raises ``RequestError`` at once. A write that timed out may
still have been applied; a retried put writes the same value again, which is harmless.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException
from tenacity import (
    RetryError,
    retry,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from shardkeeper import cluster as clusterstate
from shardkeeper.layout import Paths, RoutingChunk
from shardkeeper.peer import NotPrimary, PeerClient, PeerError, PeerUnavailable, ShardInfo
from shardkeeper.ring import shard_for_key
from shardkeeper.token import follow_token, require_token
from shardkeeper.vocab import ShardkeeperError
from shardkeeper.zk import ZkTarget, close, connect

log = logging.getLogger(__name__)
T = TypeVar("T")
Item = tuple[bytes, bytes]
# Retries after a routing-type failure: 10, 20, 40 ... ms (plus up to 10 ms of jitter, so
# that clients failed by the same hand-off do not come back in step), at most 1 s apart.
FIRST_RETRY, MAX_RETRY_WAIT = 0.01, 1.0


class DataError(ShardkeeperError):
    """A data operation failed; the message says why."""


class Unavailable(DataError):
    """The shard could not be reached within the deadline."""


class RequestError(DataError):
    """The cluster refused the request itself (4xx): retrying would not help."""


class _Retry(Exception):
    """Internal: this attempt failed in a way a fresh routing table may fix."""


class ZooKeeperUnreachable(Unavailable):
    """No routing table is cached and ZooKeeper cannot be read now."""


@dataclass(frozen=True)
class Routing:
    """One consistent read of the routing table."""

    generation: int
    replicas: tuple[tuple[str, ...], ...]  # shard -> in-sync agent ids, primary first
    addresses: dict[str, str] = field(default_factory=dict)  # agent id -> data-plane address

    @property
    def shards(self) -> int:
        return len(self.replicas)

    def primary_address(self, shard: int) -> str | None:
        agents = self.replicas[shard] if shard < len(self.replicas) else ()
        return self.addresses.get(agents[0]) if agents else None


def read_routing(client: KazooClient, paths: Paths) -> Routing:
    meta = clusterstate.read_plan_meta(client, paths)
    if meta is None:
        raise DataError(f"cluster {paths.cluster!r} has no plan yet: start a coordinator")
    chunks = clusterstate.read_many(client, paths.routing, RoutingChunk.decode)
    clusterstate.check_chunks(paths, meta, chunks)
    rows: list[tuple[str, ...]] = []
    for name in sorted(chunks):
        rows.extend(chunks[name].replicas)
    members = clusterstate.read_members(client, paths, skip_corrupt=True)
    return Routing(meta.generation, tuple(rows), {m: i.address for m, i in members.items()})


class DataClient:
    """Get, put and delete keys in a running cluster. Thread-safe."""

    def __init__(
        self,
        zk: KazooClient,
        paths: Paths,
        token: str | None = None,
        *,
        timeout: float = 2.0,
        deadline: float = 20.0,
    ):
        self.zk = zk
        self.paths = paths
        self.token = token or require_token(zk, paths)
        self.deadline = deadline
        self.peers = PeerClient(self.token, timeout=timeout, attempts=2)
        if token is None:  # read from the cluster: follow its rotations (token.py)
            follow_token(zk, paths, self._use_token)
        self._lock = threading.Lock()
        self._routing: Routing | None = None
        self._stale = True
        zk.DataWatch(paths.plan_meta, self._on_meta)

    @classmethod
    @contextmanager
    def connect(cls, target: ZkTarget, cluster: str, **kwargs: Any) -> Iterator[DataClient]:
        paths = Paths(cluster)
        zk = connect(target, root=paths.root)
        try:
            yield cls(zk, paths, **kwargs)
        finally:
            close(zk)

    def _on_meta(self, _data: bytes | None, _stat: object) -> None:
        self._stale = True

    def _use_token(self, token: str) -> None:
        self.token = self.peers.token = token

    # -- routing ------------------------------------------------------------------------
    def routing(self) -> Routing:
        """The cached routing table, read again if the plan changed since and ZooKeeper
        can be read (else the cached one; ``ZooKeeperUnreachable`` if there is none)."""
        with self._lock:
            if self._routing is not None and not (self._stale and self.zk.connected):
                return self._routing
            if not self.zk.connected:
                raise ZooKeeperUnreachable(f"cluster {self.paths.cluster!r}: ZooKeeper is"
                                           " unreachable and no routing table is cached")
            self._stale = False
            try:
                self._routing = read_routing(self.zk, self.paths)
            except KazooException:  # lost meanwhile: the cached table, or retry
                self._stale = True
                if self._routing is None:
                    raise
            return self._routing

    def invalidate(self) -> None:
        self._stale = True

    def shard_of(self, key: bytes) -> int:
        return shard_for_key(key, self.routing().shards)

    def _primary(self, shard: int) -> str:
        address = self.routing().primary_address(shard)
        if address is None:
            raise _Retry(f"shard {shard} has no primary now")
        return address

    def _attempts(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, refreshing the routing table and retrying on routing-type failures."""

        def once() -> T:
            try:
                return fn()
            except (ZooKeeperUnreachable, KazooException) as exc:
                raise _Retry(str(exc) or type(exc).__name__) from exc
            except (PeerUnavailable, NotPrimary) as exc:
                self.invalidate()
                raise _Retry(str(exc)) from exc
            except PeerError as exc:
                if exc.status == 404 and exc.body.get("error") == "unknown_shard":
                    self.invalidate()  # the shard moved away from that agent
                    raise _Retry(str(exc)) from exc
                if exc.status is not None and 400 <= exc.status < 500:
                    detail = exc.body.get("detail") or exc.body.get("error") or exc.status
                    raise RequestError(f"{what}: refused ({exc.status}): {detail}") from None
                self.invalidate()
                raise _Retry(str(exc)) from exc

        def log_retry(state: Any) -> None:
            log.debug("%s: attempt %d failed (%s); retrying in %.3fs", what,
                      state.attempt_number, state.outcome.exception(), state.next_action.sleep)

        policy = retry(
            retry=retry_if_exception_type(_Retry),
            stop=stop_after_delay(self.deadline),
            wait=wait_exponential(multiplier=FIRST_RETRY, max=MAX_RETRY_WAIT)
            + wait_random(0, FIRST_RETRY),
            before_sleep=log_retry,
        )
        try:
            return policy(once)()
        except RetryError as exc:
            last = exc.last_attempt.exception()
            raise Unavailable(f"{what}: gave up after {self.deadline:g}s: {last}") from None

    # -- operations ---------------------------------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        """The key's value, or None if it is absent."""

        def once() -> bytes | None:
            shard = self.shard_of(key)
            row = self.peers.get(self._primary(shard), shard, key)
            return None if row is None else row.value

        return self._attempts(f"get {key!r}", once)

    def put(self, key: bytes, value: bytes) -> int:
        """Store ``value``; returns its LSN once every in-sync replica applied it."""

        def once() -> int:
            shard = self.shard_of(key)
            return self.peers.put(self._primary(shard), shard, key, value)

        return self._attempts(f"put {key!r}", once)

    def delete(self, key: bytes) -> int:
        def once() -> int:
            shard = self.shard_of(key)
            return self.peers.delete(self._primary(shard), shard, key)

        return self._attempts(f"delete {key!r}", once)

    def put_batch(self, shard: int, items: Sequence[tuple[bytes, bytes]]) -> list[int]:
        """Store items that all belong to ``shard`` in one request (one LSN each)."""
        return self._attempts(
            f"batch of {len(items)} to shard {shard}",
            lambda: self.peers.batch_put(self._primary(shard), shard, items),
        )

    def by_shard(self, items: Iterable[Item]) -> dict[int, list[Item]]:
        """Group (key, value) items by the shard that owns each key."""
        groups: dict[int, list[Item]] = defaultdict(list)
        shards = self.routing().shards
        for key, value in items:
            groups[shard_for_key(key, shards)].append((key, value))
        return dict(groups)

    def shard_infos(self, shard: int) -> dict[str, ShardInfo | str]:
        """Each in-sync replica's digest info (or the error that prevented reading it)."""
        return replica_infos(self.peers, self.routing(), shard)


# -- verification: one routing read per pass, shards in parallel -------------------------

Infos = dict[str, ShardInfo | str]


def replica_infos(peers: PeerClient, routing: Routing, shard: int) -> Infos:
    """Each in-sync replica's digest info for ``shard`` by ``routing`` (or why it could
    not be read), without reading the routing table again."""
    out: Infos = {}
    for agent in routing.replicas[shard]:
        address = routing.addresses.get(agent)
        if address is None:
            out[agent] = "not a member"
            continue
        try:
            out[agent] = peers.shard_info(address, shard)
        except PeerError as exc:
            out[agent] = str(exc)
    return out


def agree(infos: Infos) -> bool:
    """True when the shard has in-sync replicas, all readable, with one digest."""
    return bool(infos) and all(isinstance(i, ShardInfo) for i in infos.values()) and len(
        {i.digest for i in infos.values() if isinstance(i, ShardInfo)}) == 1


def check_shards(peers: PeerClient, routing: Routing, shards: Sequence[int], parallel: int,
                 done: Callable[[int], None] | None = None) -> dict[int, Infos]:
    """Every listed shard's replica infos, ``parallel`` shards at a time (``peers`` keeps
    its connections per thread); ``done(shard)`` is called, in the caller's thread, as
    each finishes."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    out: dict[int, Infos] = {}
    pool = ThreadPoolExecutor(max(1, parallel), thread_name_prefix="verify")
    try:
        futures = {pool.submit(replica_infos, peers, routing, s): s for s in shards}
        for future in as_completed(futures):
            shard = futures[future]
            out[shard] = future.result()
            if done is not None:
                done(shard)
    finally:
        # On Ctrl-C, drop the shards not started rather than check them all first.
        pool.shutdown(wait=True, cancel_futures=True)
    return out
