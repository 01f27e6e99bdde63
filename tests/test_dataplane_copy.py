"""Copying and repairing a shard replica over the rows stream (``agents.dataplane.repair``):
bootstrap while writes go on, resumption, failover repair."""

from __future__ import annotations

import random
import threading

import pytest

from agents.dataplane.repair import copy_shard, repair_shard, repair_start
from agents.dataplane.transfer import CopyCancelled
from agents.handler import KVShardHandler, perform
from agents.shardsm import (
    BecomeReplica,
    CopyDone,
    Demote,
    Promote,
    Repair,
    ShardState,
    StartBootstrap,
    Synced,
)
from agents.store import make_lsn
from agents.storeset import StoreSet
from shardkeeper.peer import PeerClient, PeerError, PeerUnavailable
from shardkeeper.poll import poll_until
from tests import dataplane_support
from tests.dataplane_support import (
    PEER_TOKEN,
    SHARD,
    TOKEN,
    Node,
    digests,
    follow,
    lead,
    load,
)

# The data plane's fixtures (in this module they stand for conftest's ZooKeeper ``cluster``).
cluster = dataplane_support.cluster
trio = dataplane_support.trio


# -- bootstrap ---------------------------------------------------------------------------


class WritesWhilePagesAreInFlight(PeerClient):
    """Overwrites and deletes keys of each page after the source read it, before it lands."""

    def __init__(self, primary: Node):
        super().__init__(PEER_TOKEN, attempts=3)
        self.primary = primary

    def rows_after(self, address, shard, after, limit):
        page = super().rows_after(address, shard, after, limit)
        for row in page.rows[:3]:
            self.put(self.primary.address, shard, row.key, b"changed while in flight")
        for row in page.rows[3:5]:
            self.delete(self.primary.address, shard, row.key)
        return page


def test_bootstrap_copies_20000_rows_while_writes_continue(cluster, trio):
    p, r1, r2 = trio
    load(cluster.client, p, 20_000)
    new = cluster.start("r3")
    follow(new, p, 1, state=ShardState.BOOTSTRAPPING)
    lead(p, 1, in_sync=(r1, r2), bootstrapping=(new,))

    stop_writing = threading.Event()
    written = []

    def writer():
        rng, client = random.Random(1), PeerClient(TOKEN, attempts=3)
        while not stop_writing.is_set():
            key = f"k{rng.randrange(25_000):06d}".encode()
            if rng.random() < 0.1:
                client.delete(p.address, SHARD, key)
            else:
                client.put(p.address, SHARD, key, rng.randbytes(16))
            written.append(key)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        poll_until(lambda: len(written) > 20, 10.0, "the first writes", interval=0.01)

        def let_writes_interleave(_cursor, _fetched):
            seen = len(written)
            poll_until(lambda: len(written) >= seen + 5, 10.0, "5 more writes", interval=0.01)

        result = copy_shard(
            new.store, SHARD, p.address, WritesWhilePagesAreInFlight(p),
            page_size=1000, progress=let_writes_interleave,
        )  # fmt: skip
        # Online: the replica joins the in-sync set while writes still flow.
        follow(new, p, 1)
        lead(p, 1, in_sync=(r1, r2, new))
        count = len(written)
        poll_until(lambda: len(written) > count + 20, 10.0, "writes to the joined replica",
                   interval=0.01)
    finally:
        stop_writing.set()
        thread.join()
    assert result.rows_fetched >= 20_000 and result.pages >= 20
    assert len(written) > 20 + 5 * result.pages
    assert len(digests(p, r1, r2, new)) == 1
    assert new.store.count() == p.store.count() >= 20_000


def test_interrupted_bootstrap_resumes_from_its_cursor(cluster, trio):
    p, *_ = trio
    load(cluster.client, p, 5_000)
    path = cluster.tmp_path / "r3" / "shard.sqlite3"
    stores = StoreSet(path.parent)
    stop = threading.Event()

    def stop_after_three_pages(cursor, fetched):
        if fetched >= 1_500:
            stop.set()

    with pytest.raises(CopyCancelled):
        copy_shard(
            stores.open(SHARD), SHARD, p.address, cluster.peer,
            page_size=500, stop=stop, progress=stop_after_three_pages,
        )  # fmt: skip
    stores.close_all()  # the agent restarts
    stores = StoreSet(path.parent)
    store = stores.open(SHARD)
    assert store.bootstrap_cursor() > 0
    result = copy_shard(store, SHARD, p.address, cluster.peer, page_size=500)
    assert result.rows_fetched == 3_500, "resumed after the first 1,500 rows, not from 0"
    assert store.digest() == p.store.digest()
    stores.close_all()


def test_bootstrap_through_the_handler_reports_copy_done(cluster, trio):
    p, *_ = trio
    load(cluster.client, p, 1_200, batch=400)
    new = cluster.start("r3")
    follow(new, p, 1, state=ShardState.BOOTSTRAPPING)
    handler = KVShardHandler(new.stores, cluster.peer, page_size=500)
    event = perform(handler, StartBootstrap(SHARD, p.address), threading.Event())
    assert event == CopyDone(SHARD, p.store.max_lsn())
    assert new.store.digest() == p.store.digest()
    became = perform(handler, BecomeReplica(SHARD, 1, p.address), threading.Event())
    assert became == Synced(SHARD, 0)
    failed = perform(handler, StartBootstrap(SHARD, "127.0.0.1:1"), threading.Event())
    assert type(failed).__name__ == "CopyFailed"


# -- failover ----------------------------------------------------------------------------


def unacknowledged_write_on_r1_only(cluster, trio):
    """Old primary p applies a write, r1 gets it, r2 is down: no ack, then p dies."""
    p, r1, r2 = trio
    load(cluster.client, p, 500, batch=250)
    cluster.client.put(p.address, SHARD, b"k000001", b"overwritten-unacked")
    r2.plane.stop()
    with pytest.raises(PeerUnavailable):
        cluster.client.put(p.address, SHARD, b"k000002", b"unacked")
    with pytest.raises(PeerUnavailable):
        cluster.client.delete(p.address, SHARD, b"k000003")
    p.plane.stop()
    r2 = cluster.restart(r2)
    assert r1.store.get(b"k000002").value == b"unacked" and r2.store.get(b"k000002").value == b"v2"
    return p, r1, r2


def test_failover_repair_drops_writes_the_new_primary_never_saw(cluster, trio):
    old, r1, r2 = unacknowledged_write_on_r1_only(cluster, trio)
    # Plan generation 2 promotes r2, which lacks the unacknowledged writes.
    point = KVShardHandler(r2.stores, cluster.peer).on_become_primary(SHARD, 2)
    lead(r2, 2, in_sync=(r1,))
    follow(r1, r2, 2)
    assert r1.store.digest() != r2.store.digest()
    with pytest.raises(PeerError):
        cluster.client.put(r2.address, SHARD, b"blocked", b"until repaired")
    result = repair_shard(r1.store, SHARD, r2.address, cluster.peer)
    assert result.promotion_lsn == point and result.replaced >= 2
    assert r1.store.get(b"k000002").value == b"v2" and not r1.store.get(b"k000003").tombstone
    assert len(digests(r1, r2)) == 1
    lsn = cluster.client.put(r2.address, SHARD, b"new", b"gen2")
    assert lsn >> 32 == 2 and lsn > old.store.max_lsn()
    assert len(digests(r1, r2)) == 1

    # The old primary comes back and the plan makes it a replica: it repairs too.
    old = cluster.restart(old)
    follow(old, r2, 2)
    handler = KVShardHandler(old.stores, cluster.peer)
    perform(handler, Demote(SHARD, 2, r2.address), threading.Event())
    lead(r2, 2, in_sync=(r1, old))
    cluster.client.put(r2.address, SHARD, b"after", b"rejoin")
    assert len(digests(old, r1, r2)) == 1
    assert not old.store.was_primary()


def test_failover_repair_catches_up_a_replica_that_missed_the_last_write(cluster, trio):
    old, r1, r2 = unacknowledged_write_on_r1_only(cluster, trio)
    # Plan generation 2 promotes r1, which holds the unacknowledged writes: they survive.
    perform(KVShardHandler(r1.stores, cluster.peer), Promote(SHARD, 2), threading.Event())
    lead(r1, 2, in_sync=(r2,))
    follow(r2, r1, 2)
    repair_shard(r2.store, SHARD, r1.address, cluster.peer)
    assert r2.store.get(b"k000002").value == b"unacked"
    assert len(digests(r1, r2)) == 1
    cluster.client.batch_put(r1.address, SHARD, [(b"x", b"1"), (b"y", b"2")])
    assert len(digests(r1, r2)) == 1


def test_repair_start_covers_the_unacknowledged_tail():
    # Same stream: whichever of the two saw less bounds the disagreement.
    assert repair_start(make_lsn(5, 9), make_lsn(5, 10)) == make_lsn(5, 9)
    assert repair_start(make_lsn(5, 12), make_lsn(5, 10)) == make_lsn(5, 10)
    # The replica missed generation 6 entirely: its whole generation-5 tail is suspect.
    assert repair_start(make_lsn(6, 20), make_lsn(5, 10)) == make_lsn(5, 0)
    # A new cluster: nothing to compare.
    assert repair_start(0, 0) == 0


def test_repair_after_missing_a_whole_primary_generation(cluster, trio):
    old, r1, r2 = unacknowledged_write_on_r1_only(cluster, trio)
    # Generation 2: r2 leads alone while r1 is partitioned away, then a copy r3 joins.
    KVShardHandler(r2.stores, cluster.peer).on_become_primary(SHARD, 2)
    lead(r2, 2)
    cluster.client.put(r2.address, SHARD, b"gen2", b"written")
    r3 = cluster.start("r3")
    follow(r3, r2, 2, state=ShardState.BOOTSTRAPPING)
    copy_shard(r3.store, SHARD, r2.address, cluster.peer)
    follow(r3, r2, 2)
    lead(r2, 2, in_sync=(r3,))
    cluster.client.put(r2.address, SHARD, b"gen2", b"acknowledged by r3")
    # Generation 3: r2 dies, r3 is promoted; r1 finally hears of it and repairs.
    r2.plane.stop()
    KVShardHandler(r3.stores, cluster.peer).on_become_primary(SHARD, 3)
    lead(r3, 3, in_sync=(r1,))
    follow(r1, r3, 3)
    perform(
        KVShardHandler(r1.stores, cluster.peer), Repair(SHARD, r3.address, 3), threading.Event()
    )
    assert r1.store.get(b"k000002").value == b"v2", "generation 1's unacked tail is gone"
    assert len(digests(r1, r3)) == 1
    cluster.client.put(r3.address, SHARD, b"gen3", b"ok")
    assert len(digests(r1, r3)) == 1


def test_rows_stream_is_binary_and_still_needs_the_token(cluster, trio):
    p, *_ = trio
    cluster.client.put(p.address, SHARD, b"k", b"v")
    page = cluster.peer.rows_after(p.address, SHARD, 0, 10)
    assert page.rows == [p.store.get(b"k")] and page.complete
    assert page.max_lsn == p.store.sync_lsn()
    assert PeerClient("wrong", attempts=1).call(
        p.address, "GET", f"/v1/shards/{SHARD}/rows?after=0").status == 401
