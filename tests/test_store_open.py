"""Issue 14: an agent keeps at most ``max_open`` shard stores' SQLite connections open
(least recently used closed first) and reopens an idle store on its next use, with its
rows, markers and durability unchanged. Real SQLite files, real threads."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from agents.store import META_SYNC_LSN, ShardStore, StoreClosed, prepare_image
from agents.storeset import OpenStores, StoreSet
from shardkeeper.wire import Row


def idle(store: ShardStore) -> None:
    """Close the store's connection as the bound would (under its lock)."""
    with store._lock:
        store.close_idle()


def side_files(path: Path) -> list[Path]:
    return [p for p in (Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]


def open_connections(stores: StoreSet, shards: range) -> int:
    return sum(1 for s in shards if (store := stores.get(s)) is not None and store.connected)


def test_threads_using_many_stores_keep_at_most_the_bound_open(tmp_path):
    limit, shards, workers = 8, range(40), 6
    stores = StoreSet(tmp_path / "shards", max_open=limit)
    written: dict[int, dict[bytes, int]] = {s: {} for s in shards}
    errors: list[BaseException] = []
    seen: list[int] = []
    go = threading.Barrier(workers + 1)

    def work(n: int) -> None:
        rng = random.Random(n)
        go.wait()
        try:
            for i in range(150):
                shard = rng.choice(shards)
                store = stores.open(shard)
                key = f"w{n}-{i % 7}".encode()
                lsn = (n << 20) | i + 1
                store.apply_forward([Row(key, b"v%d" % lsn, lsn)], sync_lsn=None)
                assert store.get(key).lsn == lsn
                assert store.max_lsn() >= lsn
                store.count()
                store.rows_after(0, 5)
                written[shard][key] = lsn  # one writer per key: no race on the dict entry
                seen.append(len(stores.open_stores))
        except BaseException as exc:  # noqa: BLE001 - any failure is the bug
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    go.wait()
    for t in threads:
        t.join(60)
    assert not errors, f"a store call failed: {errors[0]!r}"
    # Stores in use are passed over: at most one per worker beyond the bound, briefly.
    assert max(seen) <= limit + workers, max(seen)
    assert len(stores.open_stores) <= limit
    assert open_connections(stores, shards) == len(stores.open_stores)
    assert sum(stores.get(s).connects for s in shards) > len(shards), "stores were reopened"
    assert len([s for s in shards if side_files(stores.path_for(s))]) <= limit
    for shard in shards:
        store = stores.get(shard)
        assert {k: store.get(k).lsn for k in written[shard]} == written[shard]
    stores.close_all()
    # What a restarted agent reads from the files: nothing was lost in the closes.
    again = StoreSet(tmp_path / "shards", max_open=limit)
    for shard in shards:
        store = again.open(shard)
        assert {k: store.get(k).lsn for k in written[shard]} == written[shard]
    again.close_all()


def test_an_idle_store_keeps_its_rows_and_markers_and_answers_them_without_opening(tmp_path):
    store = ShardStore(tmp_path / "s.sqlite3")
    store.apply_forward([Row(f"k{i}".encode(), b"v", i) for i in range(1, 11)], sync_lsn=10)
    store.apply_forward([Row(b"k1", None, 11)], sync_lsn=11)  # a delete
    store.apply_forward([Row(b"late", b"x", 20)], sync_lsn=None)  # past sync_lsn
    store.mark_promoted()
    assert store.compact(11) == 1
    before = (store.max_lsn(), store.sync_lsn(), store.horizon(), store.promotion_lsn(),
              store.was_primary(), store.count(), store.digest())
    assert before[:5] == (20, 20, 11, 20, True)

    idle(store)
    assert not store.connected and not store.closed
    assert side_files(store.path) == [], "the last close checkpointed and removed the WAL"
    connects = store.connects
    assert (store.max_lsn(), store.sync_lsn(), store.horizon(), store.promotion_lsn(),
            store.was_primary(), store.count()) == before[:6]
    assert store.compact(11) == 0
    assert store.connects == connects, "markers, max_lsn and count came from memory"

    assert store.digest() == before[6]
    assert store.connects == connects + 1, "reading rows opened it again"
    store.apply_forward([Row(b"new", b"y", 21)], sync_lsn=21)
    idle(store)
    assert (store.max_lsn(), store.sync_lsn(), store.count()) == (21, 21, 11)
    # A transaction that fails changes nothing, in memory either.
    with pytest.raises(RuntimeError), store._transaction():
        store._set_meta(META_SYNC_LSN, 99)
        raise RuntimeError("rolled back")
    assert store.sync_lsn() == 21
    store.close()
    fresh = ShardStore(tmp_path / "s.sqlite3")
    assert (fresh.max_lsn(), fresh.sync_lsn(), fresh.horizon(), fresh.count()) == (21, 21, 11, 11)
    fresh.close()


def test_a_copy_image_stays_the_image_while_its_store_is_closed_idle_and_written(tmp_path):
    source = ShardStore(tmp_path / "source.sqlite3")
    source.apply_forward([Row(f"k{i}".encode(), b"old", i) for i in range(1, 101)],
                         sync_lsn=100)
    expected = source.digest()
    image = source.open_image()
    try:
        for round_ in range(3):  # writes go on; the store is closed idle and reopened
            lsn = 100 + round_ * 100
            source.apply_forward([Row(f"k{i}".encode(), b"new", lsn + i) for i in range(1, 101)],
                                 sync_lsn=lsn + 100)
            idle(source)
        copy = tmp_path / "copy.sqlite3"
        copy.write_bytes(image.path.read_bytes()[:image.size])
    finally:
        image.close()
    assert image.sync_lsn == 100
    assert prepare_image(copy) == 100
    copied = ShardStore(copy)
    assert copied.digest() == expected and copied.count() == 100
    copied.close()
    # No write made while the image was open was lost, open or after a restart.
    assert source.sync_lsn() == 400 and source.get(b"k5").value == b"new"
    source.close()
    again = ShardStore(tmp_path / "source.sqlite3")
    assert again.sync_lsn() == 400 and again.count() == 100
    assert all(r.value == b"new" for r in again.iter_by_key())
    again.close()


def test_a_dropped_store_answers_store_closed_and_is_not_opened_again(tmp_path):
    stores = StoreSet(tmp_path / "shards", max_open=1)
    a = stores.open(1)
    a.apply_forward([Row(b"k", b"v", 1)], sync_lsn=1)
    a.count()
    stores.open(2).apply([Row(b"k", b"v", 1)])
    assert not a.connected and not a.closed, "idle beyond the bound"
    stores.drop(1)
    for call in (a.sync_lsn, a.max_lsn, a.count, a.horizon, lambda: a.get(b"k"),
                 lambda: a.compact(1), lambda: a.apply([Row(b"x", b"y", 2)])):
        with pytest.raises(StoreClosed):
            call()
    assert not stores.path_for(1).exists(), "a dropped store's file is not recreated"
    assert stores.get(1) is None
    stores.close_all()


def test_a_store_in_use_is_passed_over_and_closed_idle_once_free(tmp_path):
    """Another thread going over the bound never closes a store a call is inside."""
    stores = StoreSet(tmp_path / "shards", max_open=1)
    busy = stores.open(1)
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with busy._lock:
            busy.get(b"k")
            entered.set()
            release.wait(10)
            busy.apply([Row(b"k", b"v", 1)])  # its connection is still the one it had

    t = threading.Thread(target=hold)
    t.start()
    assert entered.wait(10)
    stores.open(2).get(b"k")
    assert busy.connected, "passed over while in use"
    release.set()
    t.join(10)
    assert busy.get(b"k").value == b"v"
    stores.open(2).get(b"k")
    assert len(stores.open_stores) == 1
    stores.close_all()


@pytest.mark.parametrize("limit", [0, -1, 100_001])
def test_the_bound_is_checked(limit):
    with pytest.raises(ValueError, match="between 1 and"):
        OpenStores(limit)


@pytest.mark.parametrize(("value", "expected"), [
    ("lots", "'lots' is not a valid integer"),
    ("0", "0 is not in the range 1<=x<=100000"),
    ("1e3", "'1e3' is not a valid integer"),
])
def test_agent_run_refuses_a_garbage_open_stores_variable(tmp_path, monkeypatch, value,
                                                          expected):
    from click.testing import CliRunner

    from shardkeeper.cli import main

    monkeypatch.setenv("SHARDKEEPER_OPEN_STORES", value)
    r = CliRunner().invoke(main, ["agent", "run", "--zk", "127.0.0.1:1", "--id", "a",
                                  "--listen", "127.0.0.1:1", "--data-dir", str(tmp_path)])
    assert r.exit_code == 2, r.output
    assert "--open-stores" in r.output and expected in r.output, r.output
