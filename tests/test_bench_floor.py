"""bench.dataplane_floor: the floor it measures is a real replicated put: every put the
client got its answer for is committed by the primary and by each replica, in order."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bench.dataplane_floor import floor_rate

PUTS = 200


def rows(path: Path) -> list[tuple[bytes, int]]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT key, lsn FROM rows ORDER BY lsn").fetchall()
    finally:
        db.close()


def run_puts(op) -> float:
    return float(sum(op(i) for i in range(PUTS)))


@pytest.mark.parametrize("overlap", [False, True])
def test_every_acknowledged_floor_put_is_on_the_primary_and_both_replicas(
    tmp_path: Path, overlap: bool
) -> None:
    assert floor_rate(tmp_path, "f", 3, overlap, run_puts) == PUTS
    files = sorted(tmp_path.glob("f-*.sqlite3"))
    assert [f.name for f in files] == ["f-p.sqlite3", "f-r0.sqlite3", "f-r1.sqlite3"]
    expected = [(b"k%015d" % i, i + 1) for i in range(PUTS)]
    for path in files:
        assert rows(path) == expected, path.name


def test_an_r1_floor_primary_commits_alone(tmp_path: Path) -> None:
    assert floor_rate(tmp_path, "solo", 1, False, run_puts) == PUTS
    assert [f.name for f in tmp_path.glob("solo-*.sqlite3")] == ["solo-p.sqlite3"]
    assert len(rows(tmp_path / "solo-p.sqlite3")) == PUTS
