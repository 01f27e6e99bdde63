"""Tombstone compaction (issue 13): a horizon every in-sync replica has passed, purges on
every replica, and a whole copy for anyone who would stream from below it, so that a
deleted key never comes back. Real SQLite files, real HTTP on 127.0.0.1."""

from __future__ import annotations

import shutil

import pytest

from agents.dataplane.compaction import Candidate, Compactor, Horizons
from agents.dataplane.repair import copy_shard, repair_shard
from agents.store import (
    META_BOOTSTRAP_CURSOR,
    META_IMAGE_TRIED,
    BehindHorizon,
    ShardStore,
    next_lsn,
)
from shardkeeper.peer import PeerError
from shardkeeper.wire import Row
from tests import test_dataplane as dataplane
from tests.dataplane_support import PEER_TOKEN
from tests.test_dataplane import SHARD, digests, lead, load

# The in-process cluster of test_dataplane: a primary and two replicas on real HTTP.
cluster = dataplane.cluster
trio = dataplane.trio

# -- the store -----------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    s = ShardStore(tmp_path / "s.sqlite3")
    yield s
    s.close()


def deleted(store: ShardStore, keys: list[bytes], first_lsn: int) -> int:
    """Write then delete ``keys`` in sync (as a replica would); returns the last LSN."""
    lsn = first_lsn
    for key in keys:
        store.apply_forward([Row(key, b"v", lsn)], sync_lsn=lsn)
        lsn += 1
    for key in keys:
        store.apply_forward([Row(key, None, lsn)], sync_lsn=lsn)
        lsn += 1
    return lsn - 1


def test_compact_purges_tombstones_up_to_the_horizon_and_never_past_sync(store):
    last = deleted(store, [b"a", b"b", b"c"], 1)  # tombstones at 4, 5, 6
    store.apply_forward([Row(b"live", b"x", 7)], sync_lsn=7)
    store.apply_forward([Row(b"late", None, 9)], sync_lsn=None)  # past sync_lsn
    assert store.tombstones() == 4
    assert store.compact(5) == 2 and store.horizon() == 5
    assert store.compact(4) == 0 and store.horizon() == 5, "the horizon never moves back"
    assert store.compact(100) == 1 and store.horizon() == 7, "capped at sync_lsn"
    assert store.get(b"late").tombstone, "a tombstone past sync_lsn stays"
    assert store.get(b"live").value == b"x" and store.get(b"a") is None
    assert last == 6


def test_a_purged_delete_keeps_its_lsn_taken(store):
    """A primary numbers a write above ``max_lsn``: had the purge of the last delete
    lowered it, the next write would reuse that LSN and a replica missing the delete
    would see no gap (its sync_lsn matches the new prev_lsn)."""
    last = deleted(store, [b"a"], 1)
    store.compact(last)
    assert store.max_lsn() == last and store.count() == 0
    assert next_lsn(0, store.max_lsn()) == last + 1
    assert store.mark_promoted() == last


def test_reading_rows_below_the_horizon_is_refused(store):
    deleted(store, [b"a", b"b"], 1)
    store.compact(3)
    for read in (lambda: store.rows_after(2, 10), lambda: store.synced_entries(0, 10, 1 << 20),
                 lambda: store.synced_page(1, 10)):
        with pytest.raises(BehindHorizon) as info:
            read()
        assert info.value.horizon == 3
    assert [r.lsn for r in store.rows_after(3, 10)] == [4]
    assert [r.lsn for r in store.rows_after_unchecked(0, 10)] == [4], "its own scan"


def test_digests_leave_tombstones_out(tmp_path):
    a, b = ShardStore(tmp_path / "a"), ShardStore(tmp_path / "b")
    for s in (a, b):
        deleted(s, [b"gone"], 1)
        s.apply_forward([Row(b"kept", b"1", 3)], sync_lsn=3)
    a.compact(3)
    assert a.tombstones() == 0 and b.tombstones() == 1
    assert a.digest() == b.digest(), "a purged delete and a kept one mean the same"


def test_an_image_carries_its_horizon_and_only_newer_own_rows_survive_it(tmp_path):
    source = ShardStore(tmp_path / "source")
    deleted(source, [b"x", b"y"], 1)  # x@1 y@2, deletes x@3 y@4
    source.apply_forward([Row(b"z", b"1", 5)], sync_lsn=5)
    source.compact(4)
    image = source.open_image()
    shutil.copyfile(image.path, tmp_path / "image")
    image.close()
    copier = ShardStore(tmp_path / "copier")
    copier.apply([Row(b"x", b"v", 1)])  # a forward it got before x was deleted
    copier.apply([Row(b"w", b"new", 6)])  # a forward past the image
    assert copier.install_image(tmp_path / "image") == 5
    assert copier.get(b"x") is None, "a purged delete must not let an old forward back"
    assert copier.get(b"w").value == b"new" and copier.horizon() == 4
    with pytest.raises(BehindHorizon):
        copier.rows_after(0, 10)
    again = ShardStore(tmp_path / "again")
    shutil.copyfile(tmp_path / "source", tmp_path / "image2")  # checkpointed by open_image
    assert again.install_image(tmp_path / "image2", synced=True) == 5
    assert again.sync_lsn() == 5


# -- the horizon -----------------------------------------------------------------------------


def test_a_candidate_becomes_the_horizon_after_the_grace_under_the_same_set():
    h = Horizons(grace=10)
    peers = frozenset({"r1", "r2"})
    assert h.offer(1, Candidate(100, 0, 1, peers), now=0) is None
    assert h.offer(1, Candidate(150, 5, 1, peers), now=5) is None
    assert h.offer(1, Candidate(200, 10, 1, peers), now=10) == 100
    assert h.offer(1, Candidate(210, 16, 1, peers), now=16) == 150
    # A new replica in the set (or a new term) starts the measure afresh.
    assert h.offer(1, Candidate(300, 20, 1, peers | {"r3"}), now=20) is None
    assert h.offer(1, Candidate(310, 29, 2, peers | {"r3"}), now=29) is None
    assert h.offer(1, Candidate(320, 40, 2, peers | {"r3"}), now=40) == 310


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def compactor(node, clock: Clock, grace: float = 10.0) -> Compactor:
    return Compactor(node.stores, node.table, lambda: PEER_TOKEN, grace, clock=clock)


def with_every_third_deleted(cluster, trio, keys: int) -> tuple[Clock, list[Compactor]]:
    """``keys`` written through the primary, every third deleted; a clock and a
    compactor per node of ``trio``."""
    primary = trio[0]
    load(cluster.client, primary, keys)
    for i in range(0, keys, 3):
        cluster.client.delete(primary.address, SHARD, f"k{i:06d}".encode())
    clock = Clock()
    return clock, [compactor(n, clock) for n in trio]


def test_primary_and_replicas_purge_deletes_all_of_them_had(cluster, trio):
    p, r1, r2 = trio
    clock, compactors = with_every_third_deleted(cluster, trio, 300)
    compactors[0].round()  # measures: every replica acked every write
    assert p.store.horizon() == 0, "not before the grace"
    clock.now = 11
    compactors[0].round()
    for c in compactors[1:]:
        c.round()
    assert {n.store.horizon() for n in trio} == {p.store.sync_lsn()}
    assert all(n.store.tombstones() == 0 for n in trio)
    assert compactors[0].purged == 100
    assert len(digests(*trio)) == 1
    assert cluster.client.get(p.address, SHARD, b"k000000") is None
    assert cluster.client.get(p.address, SHARD, b"k000001").value == b"v1"


def test_rounds_over_idle_shards_open_no_store_until_a_write(cluster, trio):
    """Issue 14: an agent keeps few stores open, and compaction visits every shard every
    round; a shard compacted to its horizon with nothing written since needs no work, and
    its markers come from memory, so a round opens none of its stores again."""
    p, r1, r2 = trio
    clock, compactors = with_every_third_deleted(cluster, trio, 30)

    def rounds() -> None:
        for c in compactors:
            c.round()

    rounds()
    clock.now = 11
    rounds()
    rounds()  # the row counts changed by the purge are read once more
    assert {n.store.horizon() for n in trio} == {p.store.sync_lsn()}
    for n in trio:
        with n.store._lock:
            n.store.close_idle()
    connects = [n.store.connects for n in trio]
    for _ in range(3):
        clock.now += 11
        rounds()
    assert [n.store.connects for n in trio] == connects, "a round opened an idle store"
    assert not any(n.store.connected for n in trio)
    # A new delete: the stores are written (opened), and the next rounds purge it.
    cluster.client.delete(p.address, SHARD, b"k000001")
    rounds()
    clock.now += 11
    rounds()
    assert {n.store.horizon() for n in trio} == {p.store.sync_lsn()}
    assert all(n.store.tombstones() == 0 for n in trio)
    assert compactors[0].purged == 11


def test_no_horizon_while_a_copy_is_in_flight_or_a_replica_is_silent(cluster, trio):
    p, r1, r2 = trio
    load(cluster.client, p, 10)
    cluster.client.delete(p.address, SHARD, b"k000001")
    clock = Clock()
    c = compactor(p, clock)
    new = cluster.start("new")
    lead(p, 1, in_sync=(r1, r2), bootstrapping=(new,))
    c.round()
    clock.now = 20
    c.round()
    assert p.store.horizon() == 0, "a copy in flight holds the horizon back"
    lead(p, 1, in_sync=(r1, r2))
    r2.plane.stop()
    c.round()
    clock.now = 40
    c.round()
    assert p.store.horizon() == 0, "a replica that does not answer proves nothing"


def test_a_copy_behind_the_horizon_takes_the_whole_store_and_no_delete_comes_back(
        cluster, trio, tmp_path):
    p, r1, r2 = trio
    cluster.client.put(p.address, SHARD, b"doomed", b"old")
    first = p.store.sync_lsn()
    new = cluster.start("new")
    store = new.store
    # The copier streamed up to "doomed"'s put, then stopped (a slow or paused copy).
    store.apply([Row(b"doomed", b"old", first)])
    store.set_meta(META_BOOTSTRAP_CURSOR, first)
    store.set_meta(META_IMAGE_TRIED, 1)
    cluster.client.delete(p.address, SHARD, b"doomed")
    load(cluster.client, p, 20)
    for n in trio:
        n.store.compact(n.store.sync_lsn())  # every replica has the delete: purged
    result = copy_shard(store, SHARD, p.address, cluster.peer,
                        image_path=new.stores.incoming_path(SHARD))
    assert result.image_bytes > 0, "copied the whole store again"
    assert store.get(b"doomed") is None, "the deleted key came back"
    assert store.digest() == p.store.digest()
    # Without a place for an image the copy cannot go on, and says so.
    store.set_meta(META_BOOTSTRAP_CURSOR, first)
    with pytest.raises(PeerError, match="behind_horizon"):
        copy_shard(store, SHARD, p.address, cluster.peer)


def test_a_repair_behind_the_primarys_horizon_copies_afresh_and_stays_in_sync(cluster, trio):
    p, r1, r2 = trio
    load(cluster.client, p, 50)
    r1_sync = r1.store.sync_lsn()
    # r1 misses a delete and more (it was cut off), the others purge the delete.
    lead(p, 1, in_sync=(r2,))
    cluster.client.delete(p.address, SHARD, b"k000007")
    load(cluster.client, p, 20, prefix="later")
    for n in (p, r2):
        n.store.compact(n.store.sync_lsn())
    assert r1.store.get(b"k000007").value == b"v7"
    result = repair_shard(r1.store, SHARD, p.address, cluster.peer)
    assert r1.store.get(b"k000007") is None, "the deleted key came back"
    assert r1.store.sync_lsn() >= p.store.horizon() > r1_sync
    assert r1.store.digest() == p.store.digest()
    assert result.caught_up.lsn == p.store.sync_lsn()
    # Back in the in-sync set, it takes forwards again at once.
    lead(p, 1, in_sync=(r1, r2))
    cluster.client.put(p.address, SHARD, b"after", b"1")
    assert len(digests(*trio)) == 1


def test_a_push_from_below_the_horizon_fails_the_write_instead_of_losing_deletes(
        cluster, trio):
    p, r1, r2 = trio
    load(cluster.client, p, 5)
    lead(p, 1, in_sync=(r2,))
    cluster.client.delete(p.address, SHARD, b"k000001")
    p.store.compact(p.store.sync_lsn())
    lead(p, 1, in_sync=(r1, r2))  # r1 back in the set without a repair: behind
    with pytest.raises(PeerError, match="replication_failed"):
        cluster.client.put(p.address, SHARD, b"x", b"1")
    assert r1.store.get(b"k000001").value == b"v1", "untouched, not half-pushed"
