"""The built-in shard store: one SQLite file per shard replica.

Each key holds one row ``(key, value, lsn, tombstone)``. A delete is a tombstone row, so a
delete replicates, streams and digests like any other write. Rows are applied
last-writer-wins by LSN: a row replaces the stored one only if its LSN is higher, which
makes re-applying a row, or applying rows out of order, harmless. That is what lets a
bootstrap stream and forwarded writes interleave on a new replica.

A small ``meta`` table keeps the replica's progress markers, so they survive a crash:

- ``bootstrap_cursor``: the highest source LSN copied so far; a restarted bootstrap
  resumes after it instead of from 0.
- ``sync_lsn``: the replica matches its primary's stream up to this LSN; the primary
  sends the next forward with ``prev_lsn`` and a replica that disagrees reports a gap.
- ``promotion_lsn``: this replica's ``max_lsn`` when it was promoted to primary; replicas
  repair their rows after that point against it.
- ``is_primary``: 1 from promotion until demotion; a demoted primary must repair first.
- ``image_tried``: 1 once a bootstrap asked for its source's file image (``open_image``);
  a retry then streams rows, which resume, instead of downloading the file again.
- ``horizon``: tombstones at or below this LSN have been purged (``compact``).

**Tombstone compaction.** A delete must stay a tombstone while some replica may still
need it: one that streams the rows after its cursor would otherwise never learn the key
was deleted, and keep (or later serve) the value the delete removed. ``compact(h)``
purges the tombstones at or below ``h`` and records ``h`` as the store's horizon; the
caller picks an ``h`` every in-sync replica has passed (``agents.dataplane.compaction``).
From then on every read of "the rows after X" with X below the horizon raises
BehindHorizon instead of answering with rows that silently lack those deletes: a copier
or a repair that meets it must copy the whole store again (a file image, which carries
the horizon with it). Digests leave tombstones out: a purged tombstone and a kept one
mean the same thing, an absent key.

LSNs are ``(term << 32) | seq``: a primary of term ``t`` (the plan generation that made it
primary) issues LSNs above ``t << 32``, hence above every LSN of a primary of an older term.
Rows, their limits and checks are the wire's (``shardkeeper.wire``): what a client may send
is what the store keeps.

**Open connections.** SQLite accounts ~130 KiB per open connection, and its WAL index
(``-shm``, 32 KiB) is mapped while one is open: an agent holding 600 replicas would spend
most of its memory on connections that sit idle. A ``StoreSet`` keeps at most
``max_open`` of them open, least recently used first to close (``agents.storeset``); a store
whose connection was closed so is *idle*, not closed: its next call opens it again under
the store lock, transparently. Its markers (the ``meta`` table), ``max_lsn`` and row
count are kept in memory, so reading them (the compactor's markers, every round) needs no
connection. Only ``close()`` (the shard dropped, the agent stopping) makes a store answer
StoreClosed. Closing the last connection checkpoints the WAL into the file and removes
it: every committed transaction is in the file by then, so nothing is lost.

Durability: WAL mode with ``synchronous=NORMAL`` survives a process crash (SIGKILL) without
losing a committed transaction; a power loss may lose the last ones. Replication to R
replicas, not fsync, is what protects acknowledged writes.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from shardkeeper.wire import Entry, Row, entry_to_row

if TYPE_CHECKING:
    from agents.storeset import OpenStores

TERM_SHIFT = 32
SEQ_MASK = (1 << TERM_SHIFT) - 1

META_BOOTSTRAP_CURSOR = "bootstrap_cursor"
META_SYNC_LSN = "sync_lsn"
META_PROMOTION_LSN = "promotion_lsn"
META_IS_PRIMARY = "is_primary"
META_IMAGE_TRIED = "image_tried"
META_HORIZON = "horizon"

SCHEMA_VERSION = 2
# A rowid table keeps each row's value inline in the table b-tree (up to ~page size); the
# WITHOUT ROWID layout of version 1 spilled every value over ~1 KB to an overflow page of
# its own, about 4x the data on disk. The key's uniqueness moves to an index.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (
    id INTEGER PRIMARY KEY,
    key BLOB NOT NULL UNIQUE,
    value BLOB,
    lsn INTEGER NOT NULL,
    tombstone INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS rows_by_lsn ON rows (lsn);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

_MIGRATE_FROM_V1 = """
ALTER TABLE rows RENAME TO rows_v1;
DROP INDEX IF EXISTS rows_by_lsn;
""" + _SCHEMA + """
INSERT INTO rows (key, value, lsn, tombstone) SELECT key, value, lsn, tombstone FROM rows_v1;
DROP TABLE rows_v1;
"""

PAGE_SIZE = 8192  # new files only; fewer b-tree pages and less slack for ~1 KB values
# SQLite's own page cache per shard (default 2 MiB): an agent holds hundreds of shards, and
# the kernel's page cache keeps the files warm anyway. 600 open shards of 300 KB each, once
# written and digested: 284 MB of RSS with the default cache, 133 MB with this (of which
# ~180 KB per shard is the connection, its WAL index and statements, whatever the cache).
CACHE_KIB = 64

_UPSERT_NEWER = """
INSERT INTO rows (key, value, lsn, tombstone) VALUES (?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET
    value = excluded.value, lsn = excluded.lsn, tombstone = excluded.tombstone
WHERE excluded.lsn > rows.lsn
"""

_UPSERT_ANY = """
INSERT INTO rows (key, value, lsn, tombstone) VALUES (?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET
    value = excluded.value, lsn = excluded.lsn, tombstone = excluded.tombstone
"""


class StoreError(Exception):
    """A shard store could not do what was asked."""


class StoreBusy(StoreError):
    """The store cannot hand out a file image now."""


class BehindHorizon(StoreError):
    """Rows after ``after`` were asked for, but tombstones up to ``horizon`` (above it)
    are purged: the answer would lack deletes. The asker must copy the store afresh."""

    def __init__(self, name: str, after: int, horizon: int):
        super().__init__(f"{name}: rows after LSN {after} asked for, but tombstones up to"
                         f" LSN {horizon} are compacted away")
        self.after = after
        self.horizon = horizon


class StoreClosed(StoreError):
    """The store was closed (its shard dropped, the agent stopping) or could not be
    opened again after an image swap: the request that met it changes nothing."""


@dataclass(frozen=True)
class FileImage:
    """A store file frozen as a consistent image (see ``ShardStore.open_image``)."""

    path: Path
    size: int
    sync_lsn: int
    close: Callable[[], None]


def make_lsn(term: int, seq: int) -> int:
    """The LSN of write number ``seq`` of a primary of ``term``."""
    return (term << TERM_SHIFT) | (seq & SEQ_MASK)


def lsn_term(lsn: int) -> int:
    """The term of the primary that issued ``lsn``."""
    return lsn >> TERM_SHIFT


def next_lsn(term: int, max_lsn: int) -> int:
    """The next LSN a primary of ``term`` issues, given the shard's local ``max_lsn``.

    It exceeds ``max_lsn`` (monotonic on this replica) and every LSN of older terms.
    """
    return max(max_lsn + 1, make_lsn(term, 1))


def _params(row: Row) -> Entry:
    return (row.key, row.value, row.lsn, 1 if row.tombstone else 0)


def _digest_bytes(row: Row) -> bytes:
    # Length prefixes keep ("ab","c") and ("a","bc") from hashing alike.
    value = row.value or b""
    return b"".join(
        (
            len(row.key).to_bytes(4, "big"),
            row.key,
            row.lsn.to_bytes(8, "big"),
            b"\x01" if row.tombstone else b"\x00",
            len(value).to_bytes(4, "big"),
            value,
        )
    )


def digest_rows(rows: Iterable[Row]) -> str:
    """A stable hash of the live rows among ``rows`` (given in key order): a tombstone and
    no row at all both mean "absent", and replicas purge tombstones at their own pace."""
    h = xxhash.xxh3_128()
    for row in rows:
        if not row.tombstone:
            h.update(_digest_bytes(row))
    return h.hexdigest()


class ShardStore:
    """One shard replica's rows in one SQLite file. Thread-safe (at most one connection,
    one lock). ``open_stores``: the bound on open connections it counts against."""

    def __init__(self, path: str | os.PathLike[str], open_stores: OpenStores | None = None):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._images = 0  # file images handed out and not yet closed
        # The connection; None while idle or once closed. Only ever read or replaced under
        # _lock: install_image swaps it, StoreSet.drop and OpenStores close it while
        # requests are in flight.
        self._conn: sqlite3.Connection | None = None
        self._closed = False  # for good: every later call raises StoreClosed
        self._open_stores = open_stores
        # The meta table as committed (loaded on every connect, updated on commit), and
        # what the transaction in progress set; None outside a transaction.
        self._meta: dict[str, int] = {}
        self._pending: dict[str, int] | None = None
        # MAX(lsn) and COUNT(*) of the rows; None until read after a change.
        self._max_row_lsn: int | None = None
        self._rows: int | None = None
        self.connects = 0  # times the file was opened (for tests and logs)
        self._connect()
        if open_stores is not None:
            open_stores.opened(self)

    def _connect(self) -> None:
        """Open the file (creating it) as the store's connection. A file that cannot be
        opened or set up (a full disk, a damaged file) raises StoreError, so that callers
        tell a store that failed from a bug."""
        try:
            db = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path.name}: {exc}") from exc
        try:
            db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # ignored once the file has data
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self._conn = db
            self._create_or_migrate()
            self._meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
        except BaseException as exc:
            self._conn = None
            db.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot open {self.path.name}: {exc}") from exc
            raise
        self.connects += 1

    def _reopen(self) -> sqlite3.Connection:
        """Open an idle store's file again (under ``_lock``) and count it as open; close
        the least recently used ones beyond the bound."""
        self._connect()
        db = self._conn
        assert db is not None
        if self._open_stores is not None:
            self._open_stores.opened(self)
            self._open_stores.shed(keep=self)
        return db

    @property
    def _db(self) -> sqlite3.Connection:
        """The connection, opened again if it was idle; callers hold ``_lock``. Raises
        StoreClosed after close()."""
        self._check_open()
        db = self._conn
        if db is None:
            return self._reopen()
        if self._open_stores is not None:
            self._open_stores.used(self)
        return db

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"{self.path.name} is closed")

    def _create_or_migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        old = self._db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'rows'"
        ).fetchone()
        script = _MIGRATE_FROM_V1 if old and "WITHOUT ROWID" in old[0].upper() else _SCHEMA
        self._db.executescript(
            f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        )

    def close(self) -> None:
        """Close the connection; every later call raises StoreClosed. Waits for the call
        in progress (they hold the lock), so none of them meets a closed connection."""
        with self._lock:
            self._closed = True
            self._drop_connection()

    def close_idle(self) -> bool:
        """Close the connection but keep the store usable: its next call opens the file
        again. Callers hold ``_lock``. Returns whether a connection was closed (not in the
        middle of a transaction)."""
        db = self._conn
        if db is None or self._pending is not None:
            return False
        if self._max_row_lsn is None:  # keep it known while idle: writes read it first
            self._max_row_lsn = db.execute("SELECT COALESCE(MAX(lsn), 0) FROM rows").fetchone()[0]
        self._drop_connection()
        return True

    def _drop_connection(self) -> None:
        db, self._conn = self._conn, None
        if self._open_stores is not None:
            self._open_stores.closed(self)
        if db is not None:
            db.close()  # the last one checkpoints the WAL into the file and removes it

    @property
    def closed(self) -> bool:
        """Closed for good (not merely idle)."""
        return self._closed

    @property
    def connected(self) -> bool:
        """Whether the store holds an open connection now."""
        return self._conn is not None

    def _transaction(self) -> _Transaction:
        return _Transaction(self)

    # -- rows ----------------------------------------------------------------------------

    def get(self, key: bytes) -> Row | None:
        """The stored row for ``key`` (possibly a tombstone), or None if never written."""
        with self._lock:
            found = self._db.execute(
                "SELECT key, value, lsn, tombstone FROM rows WHERE key = ?", (key,)
            ).fetchone()
        return entry_to_row(found) if found else None

    def get_many(self, keys: Iterable[bytes]) -> dict[bytes, Row]:
        with self._lock:
            return {key: row for key in keys if (row := self.get(key)) is not None}

    def apply(self, rows: Iterable[Row]) -> int:
        """Apply rows last-writer-wins by LSN, atomically; returns how many replaced data."""
        with self._transaction():
            return self._apply_newer(rows)

    def apply_page(self, rows: Iterable[Row], cursor: int) -> int:
        """Apply a bootstrap page and persist its cursor in the same transaction."""
        with self._transaction():
            applied = self._apply_newer(rows)
            self._set_meta(META_BOOTSTRAP_CURSOR, cursor)
            return applied

    def apply_entries_page(self, entries: Sequence[Entry], cursor: int) -> int:
        """``apply_page`` for rows already in stored form (what the rows stream decodes to)."""
        with self._transaction():
            before = self._db.total_changes
            self._db.executemany(_UPSERT_NEWER, entries)
            self._set_meta(META_BOOTSTRAP_CURSOR, cursor)
            return self._db.total_changes - before

    def apply_forward(self, rows: Iterable[Row], sync_lsn: int | None) -> int:
        """Apply forwarded rows and, for an in-sync forward, advance ``sync_lsn`` atomically."""
        with self._transaction():
            applied = self._apply_newer(rows)
            if sync_lsn is not None:
                self._set_meta(META_SYNC_LSN, sync_lsn)
            return applied

    def apply_on_top(self, rows: Sequence[Row], prev: int) -> tuple[bool, int]:
        """An in-sync forward: if ``sync_lsn`` is ``prev``, apply ``rows`` and move
        ``sync_lsn`` to the last one's LSN, in one transaction. Returns whether it applied,
        and ``sync_lsn`` after (unchanged when it was not ``prev``)."""
        with self._transaction():
            have = self._get_meta(META_SYNC_LSN)
            if have != prev:
                return False, have
            self._apply_newer(rows)
            self._set_meta(META_SYNC_LSN, rows[-1].lsn)
            return True, rows[-1].lsn

    def replace_if_unchanged(self, expected_lsn: int, key: bytes, row: Row | None) -> bool:
        """Overwrite ``key`` with ``row`` (None: remove it) if it still has ``expected_lsn``.

        Used by failover repair: the primary's version wins even with a lower LSN, but a
        newer write forwarded meanwhile must not be clobbered.
        """
        with self._transaction():
            current = self._db.execute("SELECT lsn FROM rows WHERE key = ?", (key,)).fetchone()
            if current is None or current[0] != expected_lsn:
                return False
            if row is None:
                self._db.execute("DELETE FROM rows WHERE key = ?", (key,))
            else:
                self._db.execute(_UPSERT_ANY, _params(row))
            return True

    def _apply_newer(self, rows: Iterable[Row]) -> int:
        before = self._db.total_changes
        self._db.executemany(_UPSERT_NEWER, (_params(row) for row in rows))
        return self._db.total_changes - before

    def max_lsn(self) -> int:
        """The highest LSN this store has held, purged tombstones included: a primary
        numbers its next write above it, and must never reuse a purged delete's LSN (its
        replicas, which may still hold that tombstone, would see no gap)."""
        with self._lock:
            return self._max_lsn()

    def _max_lsn(self) -> int:
        found = self._max_row_lsn
        if found is None or self._pending is not None:  # a transaction may have written
            found = self._db.execute("SELECT COALESCE(MAX(lsn), 0) FROM rows").fetchone()[0]
            if self._pending is None:
                self._max_row_lsn = found
        else:
            self._check_open()
        return max(found, self._get_meta(META_HORIZON))

    def _check_horizon(self, after: int) -> None:
        """Raise BehindHorizon if the rows after ``after`` may lack purged deletes."""
        horizon = self.horizon()
        if after < horizon:
            raise BehindHorizon(self.path.name, after, horizon)

    def rows_after(self, lsn: int, limit: int) -> list[Row]:
        """Up to ``limit`` rows with LSN above ``lsn``, in LSN order (for paged streaming).
        BehindHorizon if ``lsn`` is below the compaction horizon."""
        with self._lock:
            self._check_horizon(lsn)
            found = self._db.execute(
                "SELECT key, value, lsn, tombstone FROM rows WHERE lsn > ? ORDER BY lsn LIMIT ?",
                (lsn, limit),
            ).fetchall()
        return [entry_to_row(r) for r in found]

    def page_after(self, lsn: int, limit: int) -> tuple[list[Row], int]:
        """``rows_after`` plus ``max_lsn`` read consistently under one lock."""
        with self._lock:
            return self.rows_after(lsn, limit), self.max_lsn()

    def synced_page(self, lsn: int, limit: int) -> tuple[list[Row], int]:
        """Rows in ``(lsn, sync_lsn]`` in LSN order, plus ``sync_lsn``: what a source streams.

        A replica may hold best-effort forwards beyond a gap; streaming only the synced
        prefix keeps a copier's cursor a point it can truly resume from.
        """
        with self._lock:
            self._check_horizon(lsn)
            upto = self.sync_lsn()
            found = self._db.execute(
                "SELECT key, value, lsn, tombstone FROM rows WHERE lsn > ? AND lsn <= ?"
                " ORDER BY lsn LIMIT ?",
                (lsn, upto, limit),
            ).fetchall()
        return [entry_to_row(r) for r in found], upto

    def synced_entries(
        self, lsn: int, limit: int, max_bytes: int
    ) -> tuple[list[Entry], int, bool]:
        """What a source streams, without building Rows: ``(entries, sync_lsn, complete)``.

        Entries are rows in ``(lsn, sync_lsn]`` in LSN order, at most ``limit`` of them and
        about ``max_bytes`` of keys and values (at least one row). ``complete`` is True when
        they are every such row, so a copier that applied them has reached ``sync_lsn``.
        """
        entries: list[Entry] = []
        size = 0
        with self._lock:
            self._check_horizon(lsn)
            upto = self.sync_lsn()
            cursor = self._db.execute(
                "SELECT key, value, lsn, tombstone FROM rows WHERE lsn > ? AND lsn <= ?"
                " ORDER BY lsn LIMIT ?",
                (lsn, upto, limit),
            )
            for entry in cursor:
                entries.append(entry)
                size += len(entry[0]) + len(entry[1] or b"")
                if size >= max_bytes:
                    cursor.close()
                    return entries, upto, False
        return entries, upto, len(entries) < limit

    def rows_after_unchecked(self, lsn: int, limit: int) -> list[Row]:
        """``rows_after`` for this store's own use (listing its suspects in a repair):
        what it lacks below its horizon it purged itself, so nothing is hidden from it."""
        with self._lock:
            found = self._db.execute(
                "SELECT key, value, lsn, tombstone FROM rows WHERE lsn > ? ORDER BY lsn LIMIT ?",
                (lsn, limit),
            ).fetchall()
        return [entry_to_row(r) for r in found]

    def compact(self, upto: int) -> int:
        """Purge the tombstones at or below ``min(upto, sync_lsn)`` and make that the
        horizon (it never moves back); returns how many were purged.

        The caller vouches that every in-sync replica has passed ``upto``: each of them
        then holds every delete up to there, and needs no tombstone to learn it again.
        A horizon that would not move is seen from the markers in memory, without a
        connection: an idle store, compacted once, is not opened again by every round.
        """
        with self._lock:
            if min(upto, self.sync_lsn()) <= self.horizon():
                return 0
        with self._transaction():
            sync = self._get_meta(META_SYNC_LSN)
            horizon = min(upto, sync)
            if horizon <= self._get_meta(META_HORIZON):
                return 0
            purged = self._db.execute(
                "DELETE FROM rows WHERE tombstone = 1 AND lsn <= ?", (horizon,)
            ).rowcount
            self._set_meta(META_HORIZON, horizon)
            return purged

    def tombstones(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM rows WHERE tombstone = 1").fetchone()[0]

    def count(self) -> int:
        """Number of rows, tombstones included (kept from the last count until a write)."""
        with self._lock:
            if self._rows is None:
                self._rows = self._db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
            else:
                self._check_open()
            return self._rows

    def iter_by_key(self) -> Iterator[Row]:
        """All rows in key order; materialised under the lock so writers are not blocked long."""
        with self._lock:
            found = self._db.execute(
                "SELECT key, value, lsn, tombstone FROM rows ORDER BY key"
            ).fetchall()
        return (entry_to_row(r) for r in found)

    def digest(self) -> str:
        """A stable hash of the live state, tombstones and LSNs included, in key order."""
        return digest_rows(self.iter_by_key())

    # -- meta ----------------------------------------------------------------------------

    def get_meta(self, name: str, default: int = 0) -> int:
        with self._lock:
            return self._get_meta(name, default)

    def _get_meta(self, name: str, default: int = 0) -> int:
        """From memory: the committed value, or the one the transaction in progress set."""
        self._check_open()
        if self._pending is not None and name in self._pending:
            return self._pending[name]
        return self._meta.get(name, default)

    def set_meta(self, name: str, value: int) -> None:
        with self._transaction():
            self._set_meta(name, value)

    def _set_meta(self, name: str, value: int) -> None:
        """Within a transaction; the value is kept in memory once it commits."""
        assert self._pending is not None, "meta is set within a transaction"
        self._db.execute(
            "INSERT INTO meta (name, value) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name, value),
        )
        self._pending[name] = value

    # -- file images (snapshot copies) ---------------------------------------------------

    def open_image(self) -> FileImage:
        """Freeze this store's file as a consistent image until ``FileImage.close()``.

        Under the store lock the WAL is checkpointed into the file and truncated, then a
        read transaction starts on a second connection. A reader that starts on an empty
        WAL reads the database file alone, so SQLite backfills no checkpoint into the file
        while it is open: writes go on, into the WAL, and the file's bytes stay the image
        of that moment. Raises StoreBusy if another image is open or the checkpoint could
        not empty the WAL; the caller streams rows instead.
        """
        reader = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:
            with self._lock:
                if self._images:
                    raise StoreBusy(f"{self.path.name}: another image is open")
                busy = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                wal = Path(f"{self.path}-wal")
                if busy or (wal.exists() and wal.stat().st_size > 0):
                    raise StoreBusy(f"{self.path.name}: the WAL could not be emptied")
                reader.execute("BEGIN")
                found = reader.execute(
                    "SELECT value FROM meta WHERE name = ?", (META_SYNC_LSN,)
                ).fetchone()
                self._images += 1
        except BaseException:
            reader.close()
            raise
        return FileImage(self.path, self.path.stat().st_size, found[0] if found else 0,
                         lambda: self._close_image(reader))

    def _close_image(self, reader: sqlite3.Connection) -> None:
        reader.close()  # ends the read transaction: checkpoints may write the file again
        with self._lock:
            self._images -= 1

    def install_image(self, image: Path, *, keep_after: int = 0, synced: bool = False) -> int:
        """Replace this store's rows by a copied file image of another replica's store.

        The image keeps the rows up to the source's ``sync_lsn`` (its later, best-effort
        rows and its markers are the source's, not ours) and its compaction horizon; the
        rows this store already holds past that ``sync_lsn`` and past ``keep_after``
        (forwards received while copying) are applied over it last-writer-wins, and the
        bootstrap cursor becomes that ``sync_lsn``, which is returned. Rows at or below it
        are the image's business: a delete of one of them may be compacted away there.
        ``synced``: the store follows the image's stream from its ``sync_lsn`` on (a
        replica copied afresh while it stays in the in-sync set). The image is prepared
        before it replaces the file, so a crash leaves one or the other.
        """
        sync = prepare_image(image)
        with self._lock:
            mine = self._db.execute(
                "SELECT key, value, lsn, tombstone FROM rows WHERE lsn > ?",
                (max(sync, keep_after),),
            ).fetchall()
            self._drop_connection()  # the last connection: its WAL is checkpointed, removed
            self._max_row_lsn = self._rows = None  # the file's rows are the image's now
            try:
                for suffix in ("-wal", "-shm"):
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
                os.replace(image, self.path)
            finally:
                # The image, or the old file if the swap failed; if even that cannot be
                # opened (a full disk), the store stays closed and says so (StoreClosed).
                try:
                    self._reopen()
                except StoreError:
                    self._closed = True
                    raise
            with self._transaction():
                self._db.executemany(_UPSERT_NEWER, mine)
                if synced:
                    self._set_meta(META_SYNC_LSN, sync)
        return sync

    def bootstrap_cursor(self) -> int:
        return self.get_meta(META_BOOTSTRAP_CURSOR)

    def sync_lsn(self) -> int:
        return self.get_meta(META_SYNC_LSN)

    def horizon(self) -> int:
        """Tombstones at or below this LSN are purged (0: none ever were)."""
        return self.get_meta(META_HORIZON)

    def promotion_lsn(self) -> int:
        return self.get_meta(META_PROMOTION_LSN)

    def mark_promoted(self) -> int:
        """Record the promotion point (this replica's ``max_lsn`` now) and return it."""
        with self._transaction():
            point = self._max_lsn()
            self._set_meta(META_PROMOTION_LSN, point)
            self._set_meta(META_SYNC_LSN, point)
            self._set_meta(META_IS_PRIMARY, 1)
            return point

    def was_primary(self) -> bool:
        """Promoted and not yet demoted: may hold writes no replica acknowledged."""
        return self.get_meta(META_IS_PRIMARY) == 1

    def mark_demoted(self) -> None:
        self.set_meta(META_IS_PRIMARY, 0)


def prepare_image(path: Path) -> int:
    """Turn a copied store file into a fresh replica's: drop the rows after the source's
    ``sync_lsn`` and its markers (but its compaction horizon: the image lacks the deletes
    purged below it, and must say so to whoever copies from it next), set the bootstrap
    cursor there; returns that LSN."""
    with path.open("rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            raise StoreError(f"{path.name} is not an SQLite file")
    db = sqlite3.connect(str(path), isolation_level=None)
    try:
        if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            raise StoreError(f"{path.name} has another schema version")
        found = db.execute("SELECT value FROM meta WHERE name = ?", (META_SYNC_LSN,)).fetchone()
        sync = found[0] if found else 0
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM rows WHERE lsn > ?", (sync,))
        db.execute("DELETE FROM meta WHERE name != ?", (META_HORIZON,))
        db.execute("INSERT INTO meta (name, value) VALUES (?, ?)", (META_BOOTSTRAP_CURSOR, sync))
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StoreError(f"{path.name} is not a usable shard store: {exc}") from exc
    finally:
        db.close()  # the last connection: checkpoints the edits into the file
    # Only the file is installed: edits left in a WAL beside it would be lost, and the image
    # would keep the source's markers (its primary flag, its cursors).
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise StoreError(f"{path.name}: the image's edits were not checkpointed")
    return sync


class _Transaction:
    """``BEGIN IMMEDIATE`` .. ``COMMIT`` under the store lock; rolls back on error.

    The connection is looked up only once the lock is held: an image swap or a close
    replaces it under that lock, and one taken before would be a closed connection.
    What the store keeps in memory (markers, ``max_lsn``, row count) changes only once
    the transaction commits."""

    def __init__(self, store: ShardStore):
        self._store = store
        self._db: sqlite3.Connection | None = None
        self._before = 0

    def __enter__(self) -> None:
        store = self._store
        store._lock.acquire()
        try:
            self._db = store._db
            self._db.execute("BEGIN IMMEDIATE")
            self._before = self._db.total_changes
            store._pending = {}
        except BaseException:
            store._lock.release()
            raise

    def __exit__(self, exc_type: object, *_rest: object) -> None:
        store = self._store
        try:
            assert self._db is not None and store._pending is not None
            if exc_type:
                self._db.execute("ROLLBACK")
                return
            changed = self._db.total_changes != self._before
            try:
                self._db.execute("COMMIT")
            except BaseException:
                # Whether it committed is unknown: reading the file again will tell.
                store._max_row_lsn = store._rows = None
                store._drop_connection()
                raise
            if changed or store._pending:
                store._meta.update(store._pending)
                store._max_row_lsn = store._rows = None
        finally:
            store._pending = None
            store._lock.release()
