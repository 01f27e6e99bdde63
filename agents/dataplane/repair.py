"""Copying and repairing a shard replica from its peers: what the KV handler's callbacks do.

- ``copy_shard``: bootstrap (a new replica copies the shard from a source: a shard of one
  small page by that page, a larger one by the store file image first, if it can have
  it, then the rows stream) and its resumption.
- ``repair_shard``: a replica brought into line with a new primary (after a failover, a
  demotion, or a catch-up), then caught up by streaming.
- ``catch_up_from_peers``: a replica about to be promoted pulls what it may have missed.

Compaction: a source that purged tombstones past the point a copy or a repair streams
from answers ``409 behind_horizon`` (the rows would lack deletes). The copy then takes
the source's whole store again as a file image, which carries the deletes as absent keys
and the horizon with it; a repair does the same from the primary, and stays in sync.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from agents.dataplane.transfer import CopyCancelled, fetch_snapshot
from agents.store import (
    META_BOOTSTRAP_CURSOR,
    META_IMAGE_TRIED,
    META_SYNC_LSN,
    ShardStore,
    StoreError,
    lsn_term,
    make_lsn,
)
from shardkeeper.peer import PeerClient, PeerError
from shardkeeper.wire import DEFAULT_PAGE_ROWS, ErrorCode, Row

log = logging.getLogger(__name__)

SCAN_ROWS = 2_000  # rows per query while a repair lists its suspects
# Copies of a whole store one copy may start over with, when its source compacts deletes
# past its cursor meanwhile (the horizon moves once per grace period: rarely twice).
MAX_RECOPIES = 2
# A fresh copy first asks for this many rows: a shard that fits (most shards of a new or
# lightly used cluster) is copied by that one page, without the file image's fixed cost
# (a checkpoint and a second connection at the source; a file written, prepared, swapped
# in and opened again at the copier). A larger shard costs this one page more than
# before, then goes the image's way.
PROBE_ROWS = 64


def behind_horizon(exc: PeerError) -> bool:
    """The source purged deletes past the point asked for: only a whole copy will do."""
    return exc.status == 409 and exc.body.get("error") == ErrorCode.BEHIND_HORIZON


@dataclass(frozen=True)
class CopyResult:
    shard: int
    lsn: int  # caught up to the source's synced LSN at the end of the copy
    rows_fetched: int
    pages: int
    image_bytes: int = 0  # the size of the file image installed first, if any


def copy_shard(
    store: ShardStore,
    shard: int,
    source: str,
    client: PeerClient,
    *,
    page_size: int = DEFAULT_PAGE_ROWS,
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
    image_path: Path | None = None,
) -> CopyResult:
    """Copy a shard's rows from ``source`` into ``store``, resuming from the stored cursor.

    With ``image_path`` (where a download may land), a copy that has not started yet
    (cursor 0) first asks for ``PROBE_ROWS`` rows; if that page holds the whole shard, it
    is the copy. Otherwise the page is set aside and the copy fetches the source's store
    file as a consistent image and installs it (``ShardStore.install_image``): the bytes
    of the file, not rows one by one. The cursor is then the source's ``sync_lsn`` at the
    image, and the rows stream below carries on from there. If the image cannot be had
    (the source is busy or older, the download fails) the copy streams rows instead; a
    failed download is not tried again, so a retried copy resumes from its cursor rather
    than starting over.

    Pages of rows after the cursor are applied last-writer-wins (so writes forwarded to this
    replica meanwhile interleave safely) together with the new cursor, in one transaction.
    The copy ends with the first page the source marks complete (it held every synced row
    after the cursor); the replica's ``sync_lsn`` then becomes the source's synced LSN.
    ``progress(cursor, rows_fetched)`` is called after each page. Raises PeerError when the
    source stays unreachable (bounded retries) and CopyCancelled when ``stop`` is set.
    """
    cursor = store.bootstrap_cursor()
    fetched = pages = image_bytes = recopies = 0
    probe = image_path is not None and cursor == 0 and not store.get_meta(META_IMAGE_TRIED)
    while True:
        if stop is not None and stop.is_set():
            raise CopyCancelled(f"shard {shard} copy stopped at LSN {cursor}")
        try:
            page = client.rows_after(source, shard, cursor,
                                     min(PROBE_ROWS, page_size) if probe else page_size)
        except PeerError as exc:
            if not behind_horizon(exc) or image_path is None:
                raise
            if probe:  # a source that purged deletes: its rows lack them, its image not
                probe = False
            elif recopies >= MAX_RECOPIES:
                raise
            else:
                recopies += 1
                log.info("shard %s: %s compacted deletes past LSN %d: copying its store"
                         " again", shard, source, cursor)
            cursor, size = _copy_image(store, shard, source, client, image_path, stop)
            image_bytes += size
            continue
        client.downloaded("rows", page.size)
        if probe and not page.complete:  # more than one page: the file image is cheaper
            assert image_path is not None
            probe = False
            cursor, image_bytes = _copy_image(store, shard, source, client, image_path, stop)
            continue
        probe = False
        if page.complete:
            # Every synced row up to max_lsn is here (LSNs of overwritten rows are gone).
            top = max(cursor, page.max_lsn)
            store.apply_entries_page(page.entries, top)
            cursor = top
        elif page.entries:
            cursor = page.last_lsn
            store.apply_entries_page(page.entries, cursor)
        else:
            raise PeerError(source, f"shard {shard}: an empty page that is not complete")
        fetched += len(page.entries)
        pages += 1
        if progress is not None:
            progress(cursor, fetched)
        if page.complete:
            break
    store.set_meta(META_SYNC_LSN, cursor)
    return CopyResult(shard, cursor, fetched, pages, image_bytes)


def _copy_image(
    store: ShardStore,
    shard: int,
    source: str,
    client: PeerClient,
    dest: Path,
    stop: threading.Event | None,
    *,
    keep_after: int = 0,
    synced: bool = False,
) -> tuple[int, int]:
    """Fetch and install the source's file image: (new cursor, image size); the cursor is
    unchanged and the size 0 if it fell back to the rows stream. ``keep_after`` and
    ``synced`` are ``ShardStore.install_image``'s."""
    store.set_meta(META_IMAGE_TRIED, 1)  # install_image clears it with the source's markers
    try:
        size = fetch_snapshot(source, shard, dest, token=client.token, timeout=client.timeout,
                              stop=stop)
        client.downloaded("snapshot", size)
        return store.install_image(dest, keep_after=keep_after, synced=synced), size
    except (PeerError, StoreError) as exc:
        log.info("shard %s: no file image from %s (%s); streaming rows", shard, source, exc)
        return store.bootstrap_cursor(), 0
    finally:
        dest.unlink(missing_ok=True)


@dataclass(frozen=True)
class RepairResult:
    shard: int
    promotion_lsn: int
    start_lsn: int  # rows after this were checked against the primary
    suspects: int
    replaced: int
    caught_up: CopyResult


def repair_shard(
    store: ShardStore,
    shard: int,
    primary: str,
    client: PeerClient,
    *,
    batch: int = 500,
) -> RepairResult:
    """Bring a replica into line with a newly promoted primary, then catch up.

    Rows after ``min(promotion point, own sync_lsn)`` may be writes the old primary never
    acknowledged. For each, the new primary's current row wins (or the row is removed if
    the primary never had the key), unless a newer forward replaced it meanwhile. Then the
    replica streams everything after that point from the primary.
    """
    info = client.shard_info(primary, shard)
    start = repair_start(info.promotion_lsn, store.sync_lsn())
    suspects = list(_all_rows_after(store, start))
    replaced = 0
    for chunk in _chunks(suspects, batch):
        theirs = client.repair_rows(primary, shard, [row.key for row in chunk])
        for row in chunk:
            wanted = theirs.get(row.key)
            if wanted != row and store.replace_if_unchanged(row.lsn, row.key, wanted):
                replaced += 1
    store.set_meta(META_BOOTSTRAP_CURSOR, start)
    try:
        caught_up = copy_shard(store, shard, primary, client)
    except PeerError as exc:
        if not behind_horizon(exc):
            raise
        # The primary purged deletes this replica may have missed: take its whole store.
        # Rows of the primary's own term that forwards brought meanwhile stay; anything
        # older past the image is an unacknowledged tail of an earlier primary.
        log.info("shard %s: %s compacted deletes past LSN %d: copying its store afresh",
                 shard, primary, start)
        cursor, size = _copy_image(store, shard, primary, client,
                                   Path(f"{store.path}.incoming"), None,
                                   keep_after=make_lsn(info.term, 0), synced=True)
        if not size:
            raise
        store.set_meta(META_BOOTSTRAP_CURSOR, cursor)
        caught_up = copy_shard(store, shard, primary, client)
    return RepairResult(shard, info.promotion_lsn, start, len(suspects), replaced, caught_up)


def repair_start(promotion_lsn: int, sync_lsn: int) -> int:
    """The LSN after which a replica's rows may disagree with a newly promoted primary.

    The new primary holds every LSN up to its promotion point, and the replica every LSN up
    to its ``sync_lsn``, of the stream they both followed. If the promotion point is from a
    later term than the replica's last one, the replica missed a whole primary and anything
    it got from its last one may be that primary's unacknowledged tail.
    """
    start = min(promotion_lsn, sync_lsn)
    if lsn_term(sync_lsn) < lsn_term(promotion_lsn):
        start = min(start, make_lsn(lsn_term(sync_lsn), 0))
    return start


def catch_up_from_peers(
    store: ShardStore,
    shard: int,
    peers: Sequence[str],
    client: PeerClient,
    *,
    page_size: int = DEFAULT_PAGE_ROWS,
) -> int:
    """Pull, last-writer-wins, every synced row after this replica's ``sync_lsn`` from each
    reachable peer; returns the rows fetched. Used by a replica about to become primary.

    A replica that joined the in-sync set got the writes acknowledged during its last
    moments of bootstrapping only as best-effort forwards; every such write is on every
    in-sync peer, so pulling from the peers closes that gap. A peer that fails is skipped:
    the plan names the live ones, and any one of them holds every acknowledged write.
    """
    start = store.sync_lsn()
    fetched = 0
    for peer in peers:
        cursor = start
        try:
            while True:
                page = client.rows_after(peer, shard, cursor, page_size)
                if page.entries:
                    store.apply(page.rows)
                    cursor = page.last_lsn
                    fetched += len(page.entries)
                if page.complete or not page.entries:
                    break
        except PeerError as exc:
            log.info("shard %s: catch-up from %s skipped: %s", shard, peer, exc)
    return fetched


def _all_rows_after(store: ShardStore, lsn: int) -> Iterator[Row]:
    while page := store.rows_after_unchecked(lsn, SCAN_ROWS):
        yield from page
        lsn = page[-1].lsn


def _chunks(items: list[Row], size: int) -> Iterator[list[Row]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
