"""Group commit (``agents.dataplane.group``): writes to one shard that queue behind the one
being written go out as one batch, each acknowledged with its own LSNs only once the batch
is applied everywhere, or each failed with the batch's error. The writers are held where
needed with events (no sleeps); time bounds are only against hanging."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from agents.dataplane.group import GroupCommit
from shardkeeper.peer import PeerUnavailable
from shardkeeper.poll import poll_until
from tests import dataplane_support
from tests.dataplane_support import SHARD, RecordingClient, digests, follow, lead

cluster = dataplane_support.cluster
trio = dataplane_support.trio

HANG = 20.0


class Batches:
    """A ``write_batch`` that records each batch, numbers the changes, and holds the first
    batch until ``release`` is set."""

    def __init__(self, fail_on: bytes | None = None):
        self.batches: list[list[bytes]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on
        self.next = 100

    def __call__(self, changes):
        self.batches.append([key for key, _ in changes])
        if len(self.batches) == 1:
            self.entered.set()
            assert self.release.wait(HANG)
        if self.fail_on is not None and any(k == self.fail_on for k, _ in changes):
            raise RuntimeError("batch failed")
        first, self.next = self.next, self.next + len(changes)
        return list(range(first, self.next))


def start(pool: ThreadPoolExecutor, group: GroupCommit, batches: Batches, keys: list[bytes]):
    return pool.submit(group.write, [(k, b"v") for k in keys], batches)


def queue_behind_a_held_batch(group, batches, pool, writes):
    """Start a first write and hold it in its batch, then queue ``writes`` in order."""
    first = start(pool, group, batches, [b"first"])
    assert batches.entered.wait(HANG)
    futures = []
    for n, keys in enumerate(writes, 1):
        futures.append(start(pool, group, batches, keys))
        poll_until(lambda n=n: group.queued() == n, HANG, f"{n} writes queued", interval=0.001)
    return first, futures


def test_writes_queued_behind_a_batch_go_out_together_in_order():
    group, batches = GroupCommit(max_rows=100, max_bytes=1 << 20), Batches()
    with ThreadPoolExecutor(8) as pool:
        first, queued = queue_behind_a_held_batch(group, batches, pool,
                                                  [[b"a1", b"a2"], [b"b"], [b"c1", b"c2"]])
        batches.release.set()
        assert first.result(HANG) == [100]
        assert [f.result(HANG) for f in queued] == [[101, 102], [103], [104, 105]]
    assert batches.batches == [[b"first"], [b"a1", b"a2", b"b", b"c1", b"c2"]]
    assert (group.batches, group.writes) == (2, 4)


def test_a_batch_stays_within_its_bounds_and_never_splits_a_write():
    group, batches = GroupCommit(max_rows=3, max_bytes=1 << 20), Batches()
    with ThreadPoolExecutor(8) as pool:
        _, queued = queue_behind_a_held_batch(
            group, batches, pool, [[b"a1", b"a2"], [b"b1", b"b2"], [b"c"], [b"d1", b"d2", b"d3",
                                                                          b"d4"]])
        batches.release.set()
        assert [len(f.result(HANG)) for f in queued] == [2, 2, 1, 4]
    assert batches.batches[1:] == [[b"a1", b"a2"], [b"b1", b"b2", b"c"],
                                   [b"d1", b"d2", b"d3", b"d4"]]


def test_a_failed_batch_fails_every_write_in_it_and_the_next_batch_goes_on():
    group, batches = GroupCommit(max_rows=2, max_bytes=1 << 20), Batches(fail_on=b"bad")
    with ThreadPoolExecutor(8) as pool:
        first, (ok_before, bad, also, after) = queue_behind_a_held_batch(
            group, batches, pool, [[b"x"], [b"bad"], [b"y"], [b"z"]])
        batches.release.set()
        assert first.result(HANG) == [100]
        for failed in (ok_before, bad):  # batched together: both fail
            with pytest.raises(RuntimeError, match="batch failed"):
                failed.result(HANG)
        assert also.result(HANG) and after.result(HANG)
    assert batches.batches[1:] == [[b"x", b"bad"], [b"y", b"z"]]


def test_concurrent_puts_are_batched_into_one_forward_and_acknowledged_each(cluster):
    """A primary whose first forward is held: the puts that arrive meanwhile wait, then go
    to the replicas as one forward; every put gets its own LSN, and the three agree."""
    held, release = threading.Event(), threading.Event()
    forwarded: list[int] = []

    class HoldingClient(RecordingClient):
        def post_many(self, calls, **kwargs):
            forwarded.append(len(calls[0][2]))
            if len(forwarded) == 1:
                held.set()
                assert release.wait(HANG)
            return super().post_many(calls, **kwargs)

    p = cluster.start("p", client=HoldingClient())
    r1, r2 = cluster.start("r1"), cluster.start("r2")
    p.store.mark_promoted()
    r1.store, r2.store  # noqa: B018 - open the replicas' stores
    lead(p, 1, in_sync=(r1, r2))
    follow(r1, p, 1)
    follow(r2, p, 1)
    writes = p.plane.writes_of(SHARD)
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(cluster.client.put, p.address, SHARD, b"first", b"v")
        assert held.wait(HANG)
        rest = [pool.submit(cluster.client.put, p.address, SHARD, f"k{i}".encode(), b"v")
                for i in range(5)]
        poll_until(lambda: writes.queued() == 5, HANG, "5 puts queued", interval=0.001)
        assert not any(f.done() for f in rest), "none acknowledged before its forward"
        release.set()
        lsns = [first.result(HANG)] + [f.result(HANG) for f in rest]
    assert len(forwarded) == 2, "the five queued puts went out in one forward"
    assert sorted(lsns) == list(range(lsns[0], lsns[0] + 6))
    for node in (r1, r2):
        assert node.store.count() == 6 and node.store.sync_lsn() == max(lsns)
    assert len(digests(p, r1, r2)) == 1


def test_concurrent_puts_are_not_acknowledged_when_a_replica_is_down(cluster, trio):
    p, _r1, r2 = trio
    r2.plane.stop()

    def put(i: int) -> str:
        try:
            cluster.client.put(p.address, SHARD, f"k{i}".encode(), b"v")
        except PeerUnavailable as exc:
            return exc.body.get("error", "")
        return "acknowledged"

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(put, range(16)))
    assert answers == ["replication_failed"] * 16
