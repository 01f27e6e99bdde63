"""The shard handler: the extension point that gives shards their data.

The agent runtime runs the shard state machine (``agents.shardsm``) and, for each action it
returns, calls one handler callback (``perform`` does the mapping). The built-in
``KVShardHandler`` keeps a replicated key-value store per shard; another application can
hold its own data instead by implementing ``ShardHandler``::

    class FileShards(ShardHandler):
        '''Each shard is a directory of files, copied from a peer over rsync.'''

        def __init__(self, root: Path):
            self.root = root

        def on_bootstrap(self, shard, source_address, stop):
            rsync(f"{source_address}:shards/{shard}/", self.root / str(shard), stop=stop)
            return 0  # no LSNs here: report 0

        def on_become_replica(self, shard, term, primary_address):
            (self.root / str(shard)).mkdir(exist_ok=True)

        def on_become_primary(self, shard, term):
            return 0

        def on_new_primary(self, shard, primary_address, term):
            pass  # files are immutable here: nothing to repair

        def on_catch_up(self, shard, source_address, primary_address, stop):
            return self.on_bootstrap(shard, source_address, stop)  # rsync sends only changes

        def on_drop(self, shard):
            shutil.rmtree(self.root / str(shard), ignore_errors=True)

Callbacks run on the runtime's worker threads, one at a time per shard; they may block.
``on_bootstrap`` and ``on_catch_up`` must watch ``stop`` (set when the shard is dropped
mid-copy) and raise on failure; the state machine retries a bounded number of times, then
marks the shard ERROR (a failed catch-up: drops the data and copies afresh). A replica
counts as in sync only once its callback (``on_become_replica``, ``on_new_primary`` or
``on_catch_up``) has returned. Routing and fencing (the data plane's ``ShardTable``) stay
the runtime's job.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

from agents.dataplane import catch_up_from_peers, copy_shard, repair_shard
from agents.shardsm import (
    BecomeReplica,
    CatchUp,
    CopyDone,
    CopyFailed,
    Demote,
    DropDone,
    DropFailed,
    Promote,
    Promoted,
    Repair,
    ShardAction,
    ShardEvent,
    StartBootstrap,
    Synced,
)
from agents.storeset import StoreSet
from shardkeeper.peer import PeerClient
from shardkeeper.wire import DEFAULT_PAGE_ROWS


class ShardHandler(ABC):
    """One callback per shard transition. Implementations own the shard's local data."""

    @abstractmethod
    def on_bootstrap(self, shard: int, source_address: str, stop: threading.Event) -> int:
        """Copy the shard from the agent at ``source_address``; return the caught-up LSN.

        Called again after a failure or restart: resume rather than start over if you can.
        """

    @abstractmethod
    def on_become_replica(self, shard: int, term: int, primary_address: str | None) -> None:
        """Serve the shard as a replica (after a copy, after a demotion, or new and empty)."""

    @abstractmethod
    def on_become_primary(self, shard: int, term: int) -> int:
        """Take writes for the shard from now on, as primary of ``term`` (the plan generation
        that made it primary); return the promotion point (an LSN)."""

    @abstractmethod
    def on_new_primary(self, shard: int, primary_address: str, term: int) -> None:
        """Another agent became the shard's primary, of ``term``: reconcile local data."""

    @abstractmethod
    def on_drop(self, shard: int) -> None:
        """The plan no longer places the shard here: put its local data aside (the KV
        handler moves it to the agent's trash) or delete it."""

    def on_catch_up(
        self,
        shard: int,
        source_address: str | None,
        primary_address: str | None,
        stop: threading.Event,
    ) -> int:
        """This agent holds the shard but missed writes (its session was lost, or a repair
        failed): bring it into line with the primary (or the source) and return the LSN it
        caught up to. Default: ``on_bootstrap`` from the source, which should resume."""
        address = source_address or primary_address
        return self.on_bootstrap(shard, address, stop) if address else 0

    def held(self) -> set[int]:
        """Shards with local data (found again after a restart). Default: none."""
        return set()

    def catch_up(self, shard: int, peer_addresses: tuple[str, ...]) -> None:  # noqa: B027
        """Called just before ``on_become_primary``: take from the in-sync peers whatever
        they hold that this replica may have missed. Best effort; default: nothing."""


class KVShardHandler(ShardHandler):
    """The built-in handler: one SQLite store per shard, replicated by the data plane."""

    def __init__(
        self,
        stores: StoreSet,
        client: PeerClient,
        *,
        page_size: int = DEFAULT_PAGE_ROWS,
        quick_client: PeerClient | None = None,
    ):
        self.stores = stores
        self.client = client
        self.page_size = page_size
        # Catch-up before a promotion must not wait long on a peer that just died.
        self.quick_client = quick_client or client

    def on_bootstrap(self, shard: int, source_address: str, stop: threading.Event) -> int:
        store = self.stores.open(shard)
        result = copy_shard(
            store, shard, source_address, self.client, page_size=self.page_size, stop=stop,
            image_path=self.stores.incoming_path(shard),
        )
        return result.lsn

    def on_become_replica(self, shard: int, term: int, primary_address: str | None) -> None:
        store = self.stores.open(shard)
        # A demoted primary may hold writes it never got acknowledged: repair them away.
        if primary_address is not None and store.was_primary():
            repair_shard(store, shard, primary_address, self.client)
            store.mark_demoted()

    def on_become_primary(self, shard: int, term: int) -> int:
        return self.stores.open(shard).mark_promoted()

    def on_new_primary(self, shard: int, primary_address: str, term: int) -> None:
        repair_shard(self.stores.open(shard), shard, primary_address, self.client)

    def on_catch_up(
        self,
        shard: int,
        source_address: str | None,
        primary_address: str | None,
        stop: threading.Event,
    ) -> int:
        # Against the primary: rows it holds that this replica got from an earlier primary
        # (never acknowledged) are repaired away before the missing rows stream in.
        store = self.stores.open(shard)
        if primary_address is None:
            if source_address is None:
                return store.sync_lsn()
            return copy_shard(store, shard, source_address, self.client, stop=stop).lsn
        result = repair_shard(store, shard, primary_address, self.client)
        if store.was_primary():
            store.mark_demoted()
        return result.caught_up.lsn

    def on_drop(self, shard: int) -> None:
        self.stores.drop(shard, "the plan no longer places it here")

    def catch_up(self, shard: int, peer_addresses: tuple[str, ...]) -> None:
        catch_up_from_peers(self.stores.open(shard), shard, peer_addresses, self.quick_client)

    def held(self) -> set[int]:
        return self.stores.on_disk()


def perform(handler: ShardHandler, action: ShardAction, stop: threading.Event) -> ShardEvent:
    """Carry out one shard action through ``handler``; return the event to feed back,
    carrying the action's work number.

    A copy returns CopyDone or CopyFailed; a drop DropDone or DropFailed; a promotion
    Promoted; a repair, demotion or catch-up Synced (and raises on failure: the runtime
    retries, then reports SyncFailed, or PromoteFailed for a promotion). ``stop`` is the
    shard's cancel flag.
    """
    shard, work = action.shard, action.work
    if isinstance(action, StartBootstrap):
        try:
            return CopyDone(shard, handler.on_bootstrap(shard, action.source, stop), work)
        except Exception as exc:  # any failure is a failed copy; the machine bounds retries
            return CopyFailed(shard, f"{type(exc).__name__}: {exc}", work)
    if isinstance(action, BecomeReplica | Demote):
        handler.on_become_replica(shard, action.term, action.primary)
        return Synced(shard, 0, work)
    if isinstance(action, Repair):
        handler.on_new_primary(shard, action.primary, action.term)
        return Synced(shard, 0, work)
    if isinstance(action, CatchUp):
        lsn = handler.on_catch_up(shard, action.source, action.primary, stop)
        return Synced(shard, lsn or 0, work)
    if isinstance(action, Promote):
        # Writes acknowledged while this replica was joining may have reached it only
        # best effort: take them from the in-sync peers before taking writes.
        handler.catch_up(shard, action.peers)
        return Promoted(shard, handler.on_become_primary(shard, action.term) or 0, work)
    try:
        handler.on_drop(shard)
    except Exception as exc:  # retried by the machine (DropFailed), with backoff
        return DropFailed(shard, f"{type(exc).__name__}: {exc}", work)
    return DropDone(shard, work)
