"""The built-in shard store: LWW by LSN, tombstones, paging, digests, persisted markers."""

from __future__ import annotations

import random

import pytest

from agents.store import (
    ShardStore,
    StoreBusy,
    StoreError,
    lsn_term,
    make_lsn,
    next_lsn,
)
from agents.storeset import StoreSet
from shardkeeper.wire import Row


@pytest.fixture
def store(tmp_path):
    s = ShardStore(tmp_path / "shard.sqlite3")
    yield s
    s.close()


def test_apply_keeps_the_highest_lsn(store):
    store.apply([Row(b"k", b"new", 5)])
    store.apply([Row(b"k", b"old", 3)])
    assert store.get(b"k") == Row(b"k", b"new", 5)
    assert store.apply([Row(b"k", b"newer", 6)]) == 1
    assert store.get(b"k").value == b"newer"


def test_reapplying_is_idempotent_and_order_insensitive(tmp_path):
    rng = random.Random(7)
    rows = [Row(f"k{rng.randrange(50)}".encode(), rng.randbytes(8), lsn) for lsn in range(1, 400)]
    rows += [Row(f"k{rng.randrange(50)}".encode(), None, lsn) for lsn in range(400, 450)]
    a = ShardStore(tmp_path / "a.sqlite3")
    b = ShardStore(tmp_path / "b.sqlite3")
    a.apply(rows)
    shuffled = rows * 2
    rng.shuffle(shuffled)
    for row in shuffled:
        b.apply([row])
    assert a.digest() == b.digest()
    assert a.max_lsn() == b.max_lsn() == 449


def test_delete_is_a_tombstone_that_streams_and_digests(store):
    store.apply([Row(b"k", b"v", 1)])
    before = store.digest()
    store.apply([Row(b"k", None, 2)])
    row = store.get(b"k")
    assert row.tombstone and row.lsn == 2
    assert store.rows_after(1, 10) == [Row(b"k", None, 2)]
    assert store.digest() != before
    assert store.count() == 1


def test_rows_after_pages_in_lsn_order(store):
    store.apply([Row(f"k{i:03d}".encode(), b"v", 1000 - i) for i in range(100)])
    seen, cursor = [], 0
    while page := store.rows_after(cursor, 7):
        seen.extend(page)
        cursor = page[-1].lsn
    assert [r.lsn for r in seen] == sorted(r.lsn for r in seen)
    assert len(seen) == 100
    rows, max_lsn = store.page_after(0, 1)
    assert len(rows) == 1 and max_lsn == 1000


def test_synced_page_stops_at_sync_lsn(store):
    store.apply_forward([Row(b"a", b"1", 1), Row(b"b", b"2", 2)], sync_lsn=2)
    store.apply_forward([Row(b"c", b"3", 4)], sync_lsn=None)  # best effort, after a gap
    assert store.synced_page(0, 10) == ([Row(b"a", b"1", 1), Row(b"b", b"2", 2)], 2)
    assert store.synced_page(2, 10) == ([], 2)


def test_an_in_sync_forward_applies_only_on_top_of_sync_lsn(store):
    assert store.apply_on_top([Row(b"a", b"1", 1), Row(b"b", b"2", 2)], prev=0) == (True, 2)
    before = store.digest()
    assert store.apply_on_top([Row(b"c", b"3", 5)], prev=4) == (False, 2), "a gap"
    assert store.apply_on_top([Row(b"a", b"x", 2)], prev=1) == (False, 2), "behind"
    assert store.digest() == before and store.sync_lsn() == 2
    assert store.apply_on_top([Row(b"c", b"3", 3)], prev=2) == (True, 3)
    assert store.get(b"c") == Row(b"c", b"3", 3) and store.sync_lsn() == 3


def test_digest_depends_on_content_not_history(tmp_path):
    a = ShardStore(tmp_path / "a.sqlite3")
    b = ShardStore(tmp_path / "b.sqlite3")
    a.apply([Row(b"x", b"1", 1), Row(b"y", b"2", 2)])
    b.apply([Row(b"y", b"2", 2)])
    assert a.digest() != b.digest()
    b.apply([Row(b"x", b"1", 1)])
    assert a.digest() == b.digest()
    b.apply([Row(b"x", b"1", 3)])
    assert a.digest() != b.digest(), "LSNs are part of the digest"


def test_markers_survive_reopen(tmp_path):
    path = tmp_path / "s.sqlite3"
    s = ShardStore(path)
    s.apply_page([Row(b"a", b"1", 10)], cursor=10)
    s.apply_forward([Row(b"b", b"2", 11)], sync_lsn=11)
    assert s.mark_promoted() == 11
    s.close()
    s = ShardStore(path)
    assert (s.bootstrap_cursor(), s.sync_lsn(), s.promotion_lsn()) == (10, 11, 11)
    assert s.get(b"b").value == b"2"
    s.close()


def test_replace_if_unchanged_is_a_compare_and_swap(store):
    store.apply([Row(b"k", b"old-primary", 9)])
    assert store.replace_if_unchanged(9, b"k", Row(b"k", b"new-primary", 4))
    assert store.get(b"k") == Row(b"k", b"new-primary", 4)
    assert not store.replace_if_unchanged(9, b"k", None), "changed meanwhile: keep it"
    assert store.replace_if_unchanged(4, b"k", None)
    assert store.get(b"k") is None


def test_a_failed_transaction_changes_nothing(store):
    store.apply([Row(b"a", b"1", 1)])
    with pytest.raises(Exception):  # noqa: B017 - whatever sqlite raises for a NULL key
        store.apply([Row(b"b", b"2", 2), Row(None, b"x", 3)])  # type: ignore[arg-type]
    assert store.get(b"b") is None and store.max_lsn() == 1


def test_lsn_encoding_orders_terms():
    old_max = make_lsn(3, 999_999)
    assert next_lsn(4, old_max) == make_lsn(4, 1) > old_max
    assert next_lsn(4, make_lsn(4, 7)) == make_lsn(4, 8)
    assert next_lsn(3, make_lsn(4, 7)) == make_lsn(4, 8), "never below the local max"
    assert lsn_term(make_lsn(12, 5)) == 12


def test_store_set_opens_lists_and_drops(tmp_path):
    stores = StoreSet(tmp_path / "data")
    stores.open(3).apply([Row(b"k", b"v", 1)])
    stores.open(17)
    assert stores.on_disk() == {3, 17}
    assert stores.get(3) is stores.open(3)
    stores.drop(3)
    assert stores.get(3) is None and stores.on_disk() == {17}
    stores.close_all()


def test_synced_entries_page_by_rows_and_bytes(store):
    store.apply_forward([Row(f"k{i}".encode(), b"v" * 100, i) for i in range(1, 11)], sync_lsn=10)
    entries, upto, complete = store.synced_entries(0, 100, max_bytes=1 << 20)
    assert (len(entries), upto, complete) == (10, 10, True)
    entries, _, complete = store.synced_entries(0, 4, max_bytes=1 << 20)
    assert [e[2] for e in entries] == [1, 2, 3, 4] and not complete
    entries, _, complete = store.synced_entries(0, 100, max_bytes=250)
    assert len(entries) == 3 and not complete, "stops once the byte budget is reached"
    assert store.synced_entries(10, 100, max_bytes=1)[1:] == (10, True)


def test_a_version_1_file_is_migrated_in_place(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(str(path))
    db.executescript(
        "CREATE TABLE rows (key BLOB PRIMARY KEY, value BLOB, lsn INTEGER NOT NULL,"
        " tombstone INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;"
        "CREATE INDEX rows_by_lsn ON rows (lsn);"
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
        "INSERT INTO rows VALUES (x'61', x'31', 5, 0), (x'62', NULL, 6, 1);"
        "INSERT INTO meta VALUES ('sync_lsn', 6);"
    )
    db.commit()
    db.close()
    s = ShardStore(path)
    assert s.get(b"a") == Row(b"a", b"1", 5) and s.get(b"b") == Row(b"b", None, 6)
    assert s.sync_lsn() == 6
    s.apply([Row(b"a", b"2", 7)])
    assert s.rows_after(0, 10) == [Row(b"b", None, 6), Row(b"a", b"2", 7)]
    s.close()
    assert ShardStore(path).count() == 2


def test_a_file_image_stays_the_state_it_was_opened_in(tmp_path):
    import shutil

    source = ShardStore(tmp_path / "source.sqlite3")
    source.apply_forward([Row(b"a", b"1", 1), Row(b"b", b"2", 2)], sync_lsn=2)
    source.apply_forward([Row(b"late", b"x", 9)], sync_lsn=None)  # best effort, past a gap
    source.mark_promoted()
    image = source.open_image()
    try:
        with pytest.raises(StoreBusy):
            source.open_image()
        source.apply_forward([Row(f"w{i}".encode(), b"v" * 3000, 100 + i) for i in range(3000)],
                             sync_lsn=3099)  # enough to trigger checkpoints meanwhile
        shutil.copyfile(image.path, tmp_path / "copy.sqlite3")
    finally:
        image.close()
    assert image.sync_lsn == 9, "mark_promoted set sync_lsn to the max"
    target = ShardStore(tmp_path / "target.sqlite3")
    target.apply([Row(b"a", b"forwarded", 50)])  # a forward that arrived during the copy
    assert target.install_image(tmp_path / "copy.sqlite3") == 9
    assert target.get(b"a") == Row(b"a", b"forwarded", 50)
    assert target.get(b"late") == Row(b"late", b"x", 9)
    assert target.get(b"w0") is None, "written after the image was opened"
    assert (target.bootstrap_cursor(), target.sync_lsn(), target.was_primary()) == (9, 0, False)
    assert source.open_image().size > 0, "closing an image frees the store for the next"


def test_an_image_drops_rows_past_the_source_sync_point(tmp_path):
    import shutil

    source = ShardStore(tmp_path / "source.sqlite3")
    source.apply_forward([Row(b"a", b"1", 1)], sync_lsn=1)
    source.apply_forward([Row(b"gap", b"x", 7)], sync_lsn=None)
    image = source.open_image()
    shutil.copyfile(image.path, tmp_path / "copy.sqlite3")
    image.close()
    target = ShardStore(tmp_path / "target.sqlite3")
    assert target.install_image(tmp_path / "copy.sqlite3") == 1
    assert target.rows_after(0, 10) == [Row(b"a", b"1", 1)]
    (tmp_path / "junk").write_bytes(b"not a database at all" * 10)
    with pytest.raises(StoreError):
        target.install_image(tmp_path / "junk")
    assert target.count() == 1


def test_an_image_whose_edits_stay_in_a_wal_is_refused(tmp_path):
    import shutil
    import sqlite3

    source = ShardStore(tmp_path / "source.sqlite3")
    source.apply_forward([Row(b"a", b"1", 1)], sync_lsn=1)
    source.mark_promoted()
    image = source.open_image()
    shutil.copyfile(image.path, tmp_path / "copy.sqlite3")
    image.close()
    # Another connection on the image keeps its WAL from being checkpointed and removed.
    squatter = sqlite3.connect(str(tmp_path / "copy.sqlite3"))
    squatter.execute("SELECT count(*) FROM rows").fetchone()
    target = ShardStore(tmp_path / "target.sqlite3")
    try:
        with pytest.raises(StoreError, match="not checkpointed"):
            target.install_image(tmp_path / "copy.sqlite3")
    finally:
        squatter.close()
    assert target.count() == 0 and not target.was_primary(), "nothing of the image installed"


def _image_of(source: ShardStore, dest):
    import shutil

    image = source.open_image()
    try:
        shutil.copyfile(image.path, dest)
    finally:
        image.close()
    return dest


def test_forwards_racing_image_swaps_never_meet_a_closed_connection(tmp_path):
    """Issue 13: a forward to a replica still copying raced install_image, which closes and
    replaces the connection; _transaction took the connection before the lock and failed
    with sqlite3.ProgrammingError ("Cannot operate on a closed database")."""
    import threading

    source = ShardStore(tmp_path / "source.sqlite3")
    source.apply_forward([Row(f"s{i}".encode(), b"x" * 100, i + 1) for i in range(200)],
                         sync_lsn=200)
    target = ShardStore(tmp_path / "target.sqlite3")
    errors: list[BaseException] = []
    stop = threading.Event()

    def forward() -> None:
        lsn = 1000
        while not stop.is_set():
            lsn += 1
            try:
                target.apply_forward([Row(b"f", str(lsn).encode(), lsn)], sync_lsn=None)
                target.max_lsn()
                target.get(b"f")
            except BaseException as exc:  # noqa: BLE001 - any failure is the bug
                errors.append(exc)
                return

    threads = [threading.Thread(target=forward) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(40):
            target.install_image(_image_of(source, tmp_path / f"image-{i}.sqlite3"))
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, f"a forward failed during an image swap: {errors[0]!r}"
    assert target.get(b"f").lsn > 1000, "forwards kept landing across the swaps"
    assert target.count() == 201


def test_a_store_closed_under_requests_fails_them_cleanly(tmp_path):
    """StoreSet.drop closes a store that requests may still hold: they get StoreClosed (a
    StoreError the data plane answers as such), never sqlite3.ProgrammingError."""
    import threading

    from agents.store import StoreClosed

    stores = StoreSet(tmp_path / "shards")
    store = stores.open(3)
    store.apply([Row(b"k", b"v", 1)])
    outcomes: list[BaseException | None] = []
    go = threading.Barrier(5)

    def request() -> None:
        go.wait()
        try:
            for lsn in range(2, 400):
                store.apply_forward([Row(b"k", b"v", lsn)], sync_lsn=lsn)
                store.rows_after(0, 10)
            outcomes.append(None)
        except BaseException as exc:  # noqa: BLE001 - classified below
            outcomes.append(exc)

    threads = [threading.Thread(target=request) for _ in range(4)]
    for t in threads:
        t.start()
    go.wait()
    stores.drop(3)
    for t in threads:
        t.join(10)
    assert store.closed
    wrong = [o for o in outcomes if o is not None and not isinstance(o, StoreClosed)]
    assert not wrong, f"not a clean StoreClosed: {wrong[0]!r}"
    with pytest.raises(StoreClosed):
        store.get(b"k")
