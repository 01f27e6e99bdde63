"""The shard stores of one agent (``StoreSet``), and the bound on how many of them hold an
open SQLite connection at once (``OpenStores``; see "Open connections" in agents.store)."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from agents.store import ShardStore
from agents.trash import Trash

DEFAULT_OPEN_STORES = 64
MAX_OPEN_STORES = 100_000


class OpenStores:
    """The stores holding an open connection, least recently used first: at most
    ``limit`` of them (see "Open connections" in agents.store).

    A store reports each use under its own lock (``used``, ``opened``), and the thread
    whose store call finds the bound exceeded closes the least recently used stores idle.
    Lock order: a store's lock, then this one's. Another store's lock is only ever tried,
    never waited for, so two threads shedding at once cannot deadlock; a store in use (its
    lock held) is passed over, which lets the bound be exceeded only while more than
    ``limit`` stores are in use at once, and until the next store call.
    """

    def __init__(self, limit: int = DEFAULT_OPEN_STORES):
        if not 1 <= limit <= MAX_OPEN_STORES:
            raise ValueError(f"open stores must be between 1 and {MAX_OPEN_STORES}, not {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._order: OrderedDict[ShardStore, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def used(self, store: ShardStore) -> None:
        with self._lock:
            if store in self._order:
                self._order.move_to_end(store)
            over = len(self._order) > self.limit
        if over:  # stores newly opened, or passed over while in use
            self.shed(keep=store)

    def opened(self, store: ShardStore) -> None:
        with self._lock:
            self._order[store] = None
            self._order.move_to_end(store)

    def closed(self, store: ShardStore) -> None:
        with self._lock:
            self._order.pop(store, None)

    def shed(self, keep: ShardStore | None = None) -> int:
        """Close the least recently used stores idle (not ``keep``, nor one in use) until
        at most ``limit`` are open; returns how many were closed."""
        with self._lock:
            if len(self._order) <= self.limit:
                return 0
            candidates = list(self._order)
        shed = 0
        for store in candidates:
            if len(self._order) <= self.limit:
                break
            # _is_owned: this thread may itself be inside that store's call further up
            # the stack, where a reentrant acquire would succeed.
            if store is keep or store._lock._is_owned():  # type: ignore[attr-defined]
                continue
            if not store._lock.acquire(blocking=False):
                continue  # in use now: the most recently used, in effect
            try:
                shed += store.close_idle()
            finally:
                store._lock.release()
        return shed


class StoreSet:
    """The shard stores of one agent, one file each under ``data_dir``. Thread-safe.

    A dropped store is not deleted but put in ``trash`` (if given), so that no single
    plan, right or wrong, destroys a shard's data at once (see agents.trash). At most
    ``max_open`` of the stores hold an open SQLite connection at once (``OpenStores``).
    """

    def __init__(self, data_dir: str | os.PathLike[str], trash: Trash | None = None, *,
                 max_open: int = DEFAULT_OPEN_STORES):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.trash = trash
        self.open_stores = OpenStores(max_open)
        self._lock = threading.Lock()
        self._open: dict[int, ShardStore] = {}

    def path_for(self, shard: int) -> Path:
        return self.data_dir / f"shard-{shard:06d}.sqlite3"

    def incoming_path(self, shard: int) -> Path:
        """Where a file image being copied in lands (not a store until installed)."""
        return self.data_dir / f"shard-{shard:06d}.sqlite3.incoming"

    def on_disk(self) -> set[int]:
        """Shards with a store file, open or not (what survives an agent restart)."""
        found = set()
        for path in self.data_dir.glob("shard-*.sqlite3"):
            digits = path.stem.removeprefix("shard-")
            if digits.isdigit():
                found.add(int(digits))
        return found

    def open(self, shard: int) -> ShardStore:
        """The shard's store, created empty if it has none yet."""
        with self._lock:
            store = self._open.get(shard)
            if store is not None:
                return store
            # Counted as open; the ones beyond the bound are closed at the next store
            # call, not here: the agent's main loop opens stores, and must not wait for
            # another store's WAL checkpoint.
            store = self._open[shard] = ShardStore(self.path_for(shard), self.open_stores)
        return store

    def get(self, shard: int) -> ShardStore | None:
        """The shard's store if it is open, else None (the shard is not held here)."""
        with self._lock:
            return self._open.get(shard)

    def drop(self, shard: int, reason: str = "dropped") -> None:
        """Close the shard's store and put its files in the trash (delete them if there is
        no trash). A partial image being copied in is deleted: it holds nothing yet."""
        with self._lock:
            store = self._open.pop(shard, None)
        if store is not None:
            store.close()
        base = self.path_for(shard)
        for suffix in (".incoming", ".incoming-wal", ".incoming-shm"):
            Path(f"{base}{suffix}").unlink(missing_ok=True)
        files = [Path(f"{base}{suffix}") for suffix in ("", "-wal", "-shm")]
        if self.trash is not None:
            self.trash.keep(shard, files, reason)
        for f in files:
            f.unlink(missing_ok=True)

    def close_all(self) -> None:
        with self._lock:
            stores, self._open = list(self._open.values()), {}
        for store in stores:
            store.close()
