"""The agent's trash (agents.trash): dropped shard files are kept, listed, restored and
purged, on a real filesystem with real SQLite files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agents.trash import Trash, TrashError


def make_store(path: Path, rows: int) -> None:
    db = sqlite3.connect(path)
    db.execute("pragma synchronous=off")  # test data: no need to wait for the disk
    db.execute("create table t (k integer primary key, v text)")
    db.executemany("insert into t values (?, ?)", [(i, f"v{i}") for i in range(rows)])
    db.commit()
    db.close()


def test_a_dropped_store_is_kept_listed_and_restored_intact(tmp_path: Path) -> None:
    store = tmp_path / "shard-000007.sqlite3"
    make_store(store, 100)
    trash = Trash(tmp_path / "trash")
    entry = trash.keep(7, [store, Path(f"{store}-wal")], "plan generation 9 drops it", now=50.0)
    assert entry is not None and entry.shard == 7 and entry.bytes > 0
    assert not store.exists()
    assert [e.name for e in trash.entries()] == [entry.name]
    assert trash.entries()[0].reason == "plan generation 9 drops it"
    restored = trash.restore(entry.name, store)
    assert restored.shard == 7 and trash.entries() == []
    assert sqlite3.connect(store).execute("select count(*) from t").fetchone()[0] == 100


def test_restore_refuses_to_overwrite_and_unknown_names(tmp_path: Path) -> None:
    store = tmp_path / "shard-000001.sqlite3"
    make_store(store, 3)
    trash = Trash(tmp_path / "trash")
    entry = trash.keep(1, [store], "x", now=1.0)
    make_store(store, 5)  # the shard came back meanwhile
    with pytest.raises(TrashError, match="exists"):
        trash.restore(entry.name, store)
    with pytest.raises(TrashError, match="no trash entry"):
        trash.restore("nope", store)
    assert len(trash.entries()) == 1


def test_purge_removes_only_what_is_past_the_keep_time(tmp_path: Path) -> None:
    trash = Trash(tmp_path / "trash", keep_seconds=100)
    for shard, when in ((1, 0.0), (2, 50.0), (3, 99.0)):
        f = tmp_path / f"shard-{shard:06d}.sqlite3"
        make_store(f, 1)
        trash.keep(shard, [f], "x", now=when)
    names = [e.name for e in trash.entries()]
    assert trash.purge(now=150.0) == names[:2]
    assert [e.shard for e in trash.entries()] == [3]
    assert trash.purge(older_than=0, now=150.0)
    assert trash.entries() == []


def test_two_drops_of_one_shard_in_the_same_millisecond_both_stay(tmp_path: Path) -> None:
    trash = Trash(tmp_path / "trash")
    for rows in (1, 2):
        f = tmp_path / "shard-000004.sqlite3"
        make_store(f, rows)
        trash.keep(4, [f], "x", now=10.0)
    assert [e.shard for e in trash.entries()] == [4, 4]


def test_keep_zero_deletes_and_nothing_to_keep_is_no_entry(tmp_path: Path) -> None:
    f = tmp_path / "shard-000002.sqlite3"
    make_store(f, 1)
    assert Trash(tmp_path / "trash", keep_seconds=0).keep(2, [f], "x") is None
    assert not f.exists()
    assert Trash(tmp_path / "trash").keep(2, [f], "x") is None


def test_a_damaged_entry_is_listed_not_fatal(tmp_path: Path) -> None:
    trash = Trash(tmp_path / "trash")
    f = tmp_path / "shard-000003.sqlite3"
    make_store(f, 1)
    entry = trash.keep(3, [f], "x", now=5.0)
    (trash.root / entry.name / "entry.json").write_text("{not json")
    [listed] = trash.entries()
    assert listed.shard == -1 and listed.reason == "unreadable entry"
