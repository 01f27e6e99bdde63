"""The data plane's write path, fencing and request handling, over real HTTP on 127.0.0.1
with real SQLite files (``tests.dataplane_support``): a primary and replicas in one process."""

from __future__ import annotations

import threading
import time

import pytest

from agents.shardsm import ShardState
from agents.store import make_lsn
from shardkeeper.peer import PeerClient, PeerUnavailable
from shardkeeper.poll import poll_until
from shardkeeper.wire import MAX_KEY_BYTES, MAX_TERM, MAX_VALUE_BYTES, Row, b64, key_path
from tests import dataplane_support
from tests.dataplane_support import (
    PEER_TOKEN,
    SHARD,
    RecordingClient,
    digests,
    follow,
    lead,
    load,
    raw,
    token_for,
)

# The data plane's fixtures (in this module they stand for conftest's ZooKeeper ``cluster``).
cluster = dataplane_support.cluster
trio = dataplane_support.trio


# -- the write path ----------------------------------------------------------------------


def test_write_is_acknowledged_only_after_every_in_sync_replica_applied(cluster, trio):
    p, r1, r2 = trio
    lsn = cluster.client.put(p.address, SHARD, b"user:1", b"\x00\xffbinary")
    # No waiting: the acknowledgement itself promises the replicas hold the row.
    for node in trio:
        assert node.store.get(b"user:1") == Row(b"user:1", b"\x00\xffbinary", lsn)
    lsns = cluster.client.batch_put(p.address, SHARD, [(b"a", b"1"), (b"b", b"2")])
    assert lsns == [lsn + 1, lsn + 2]
    cluster.client.delete(p.address, SHARD, b"a")
    assert cluster.client.get(p.address, SHARD, b"a") is None
    assert cluster.client.get(p.address, SHARD, b"b").value == b"2"
    assert all(n.store.get(b"a").tombstone for n in trio)
    assert len(digests(*trio)) == 1
    assert lsn >> 32 == 1, "LSNs carry the primary's term"


def test_dead_in_sync_replica_means_no_acknowledgement(cluster, trio):
    p, r1, r2 = trio
    cluster.client.put(p.address, SHARD, b"before", b"1")
    r2.plane.stop()
    with pytest.raises(PeerUnavailable) as failed:
        cluster.client.put(p.address, SHARD, b"during", b"2")
    assert failed.value.status == 503
    assert failed.value.body == {"error": "replication_failed", "replicas": [r2.address]}
    # The coordinator drops the dead replica from the in-sync set: writes flow again.
    lead(p, 1, in_sync=(r1,))
    cluster.client.put(p.address, SHARD, b"after", b"3")
    assert r1.store.get(b"after").value == b"3"


def test_lagging_in_sync_replica_is_pushed_what_it_missed(cluster, trio):
    p, r1, r2 = trio
    lead(p, 1, in_sync=(r1,))
    load(cluster.client, p, 300, batch=100)
    assert r2.store.count() == 0
    lead(p, 1, in_sync=(r1, r2))
    cluster.client.put(p.address, SHARD, b"next", b"x")
    assert len(digests(*trio)) == 1
    assert r2.store.sync_lsn() == p.store.max_lsn()


# -- fencing: a replica takes forwards at exactly its route's term ------------------------


def test_replica_refuses_a_forward_of_an_older_term(cluster, trio):
    p, r1, _ = trio
    follow(r1, p, 2)  # r1's plan names a primary of term 2: p (term 1) was deposed
    before = r1.store.digest()
    reply = cluster.peer.replicate(
        r1.address, SHARD, term=1, prev_lsn=0, rows=[Row(b"k", b"v", make_lsn(1, 5))], sync=True
    )
    assert (reply.status, reply.body) == (409, {"error": "stale_term", "term": 2})
    assert r1.store.digest() == before and r1.table.route(SHARD).term == 2
    # The deposed primary applies the write locally but cannot get it acknowledged.
    with pytest.raises(PeerUnavailable) as failed:
        cluster.client.put(p.address, SHARD, b"k", b"v")
    assert failed.value.body == {"error": "replication_failed", "replicas": [r1.address]}
    assert r1.store.get(b"k") is None


def test_replica_and_bootstrapping_replica_take_forwards_at_their_term(cluster, trio):
    p, r1, r2 = trio
    row = Row(b"k", b"v", make_lsn(1, 1))
    ok = cluster.peer.replicate(r1.address, SHARD, term=1, prev_lsn=0, rows=[row], sync=True)
    assert (ok.status, ok.body) == (200, {"sync_lsn": row.lsn})
    assert r1.store.get(b"k") == row and r1.store.sync_lsn() == row.lsn
    follow(r2, p, 1, state=ShardState.BOOTSTRAPPING)
    copied = cluster.peer.replicate(r2.address, SHARD, term=1, prev_lsn=0, rows=[row],
                                      sync=False)
    assert copied.status == 200 and r2.store.get(b"k") == row
    ahead = cluster.peer.replicate(r2.address, SHARD, term=2, prev_lsn=0,
                                     rows=[Row(b"j", b"v", make_lsn(2, 1))], sync=False)
    assert (ahead.status, ahead.body) == (409, {"error": "term_ahead", "term": 1})
    assert r2.store.get(b"j") is None


def test_a_forged_forward_of_a_huge_term_moves_no_fence(cluster, trio):
    """Issue 10: one forged forward with a huge term used to raise the replica's fence and
    make every later put to the shard fail with 503 until the replica's session bounced."""
    p, r1, r2 = trio
    cluster.client.put(p.address, SHARD, b"before", b"1")
    before = digests(r1, r2)
    for sync, term in ((True, MAX_TERM), (False, MAX_TERM), (True, 10**15)):
        forged = {"term": term, "prev_lsn": p.store.max_lsn(), "sync": sync,
                  "rows": [{"key": b64(b"k"), "value": b64(b"forged"), "lsn": make_lsn(9, 1)}]}
        status, body, _ = raw(r1.address, "POST", f"/v1/shards/{SHARD}/replicate", forged,
                             token=PEER_TOKEN)
        if term > MAX_TERM:  # no LSN could carry it
            assert (status, body["error"]) == (400, "malformed")
        else:
            assert (status, body) == (409, {"error": "term_ahead", "term": 1})
    assert r1.table.route(SHARD).term == 1 and digests(r1, r2) == before
    for i in range(3):
        cluster.client.put(p.address, SHARD, f"after-{i}".encode(), b"acknowledged")
    assert r1.store.get(b"after-2").value == b"acknowledged" and r1.store.get(b"k") is None
    assert len(digests(*trio)) == 1



def test_a_new_primary_gets_through_once_its_replica_reads_the_plan(cluster):
    forwards = RecordingClient()
    p, r1 = cluster.start("p", client=forwards), cluster.start("r1")
    p.store.mark_promoted()
    r1.store  # noqa: B018 - open the replica's store
    # Plan 2 made p primary at term 2; r1 has not read it yet and still routes by term 1.
    lead(p, 2, in_sync=(r1,))
    follow(r1, p, 1)
    lsns: list[int] = []
    writer = threading.Thread(
        target=lambda: lsns.append(cluster.client.put(p.address, SHARD, b"k", b"v"))
    )
    writer.start()
    try:
        poll_until(lambda: "term_ahead" in forwards.errors, 5.0, "r1 refusing term 2",
                   interval=0.002)
        assert r1.store.get(b"k") is None and not lsns, "refused, and not acknowledged"
        follow(r1, p, 2)  # r1 reads plan 2, from another thread than the waiting write
    finally:
        writer.join(10)
    assert lsns and lsns[0] >> 32 == 2, "acknowledged once r1 took the forward"
    assert r1.store.get(b"k") == Row(b"k", b"v", lsns[0])
    assert forwards.errors[-1] is None


def test_a_replica_that_never_reads_the_plan_fails_the_write_after_a_bounded_wait(cluster):
    forwards = RecordingClient()
    p, r1 = cluster.start("p", client=forwards, term_ahead_wait=0.3), cluster.start("r1")
    p.store.mark_promoted()
    r1.store  # noqa: B018 - open the replica's store
    lead(p, 2, in_sync=(r1,))
    follow(r1, p, 1)
    started = time.monotonic()
    with pytest.raises(PeerUnavailable) as failed:
        cluster.client.put(p.address, SHARD, b"k", b"v")
    waited = time.monotonic() - started
    assert failed.value.body == {"error": "replication_failed", "replicas": [r1.address]}
    assert forwards.errors.count("term_ahead") > 1, "asked again before giving up"
    assert 0.3 <= waited < 5 and r1.store.get(b"k") is None


def test_a_bootstrapping_replica_behind_on_the_plan_does_not_hold_writes_up(cluster):
    forwards = RecordingClient()
    p, new = cluster.start("p", client=forwards, term_ahead_wait=30.0), cluster.start("new")
    p.store.mark_promoted()
    new.store  # noqa: B018 - the copy opened its store
    lead(p, 2, bootstrapping=(new,))
    follow(new, p, 1, state=ShardState.BOOTSTRAPPING)
    started = time.monotonic()
    cluster.client.put(p.address, SHARD, b"k", b"v")
    assert time.monotonic() - started < 10, "acknowledged without asking again for 30 s"
    assert forwards.errors == ["term_ahead"] and new.store.get(b"k") is None


def test_non_primary_redirects_to_the_primary(cluster, trio):
    p, r1, _ = trio
    status, body, headers = raw(r1.address, "PUT", key_path(SHARD, b"k"), {"value": "dg=="})
    assert status == 307
    assert body == {"error": "not_primary", "primary": p.address}
    assert headers["Location"] == f"http://{p.address}{key_path(SHARD, b'k')}"
    assert raw(r1.address, "GET", key_path(SHARD, b"k"))[0] == 307
    # The client library follows the redirect.
    cluster.client.put(r1.address, SHARD, b"k", b"v")
    assert cluster.client.get(r1.address, SHARD, b"k").value == b"v"


def test_wrong_or_missing_token_gets_401_and_changes_nothing(cluster, trio):
    p, *_ = trio
    intruder = PeerClient("not-the-token", attempts=1)
    for path, method, body in [
        (key_path(SHARD, b"k"), "PUT", {"value": "dg=="}),
        (key_path(SHARD, b"k"), "GET", None),
        (f"/v1/shards/{SHARD}/rows?after=0", "GET", None),
    ]:
        assert intruder.call(p.address, method, path, body).status == 401
        assert raw(p.address, method, path, body, token=None)[0] == 401
    assert all(n.store.count() == 0 for n in trio)
    assert raw(p.address, "GET", "/healthz", token=None)[0] == 200, "probes hold no token"


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("PUT", key_path(SHARD, b"k"), b"{not json", 400),
        ("PUT", key_path(SHARD, b"k"), {"val": "dg=="}, 400),
        ("PUT", key_path(SHARD, b"k"), {"value": "***"}, 400),
        ("PUT", key_path(SHARD, b"k"), [1, 2], 400),
        ("PUT", key_path(99, b"k"), {"value": "dg=="}, 404),
        ("PUT", "/v1/shards/abc/keys/k", {"value": "dg=="}, 400),
        ("PUT", key_path(SHARD, b"x" * (MAX_KEY_BYTES + 1)), {"value": "dg=="}, 413),
        ("PUT", key_path(SHARD, b"k"), {"value": b64(b"v" * (MAX_VALUE_BYTES + 1))}, 413),
        ("POST", f"/v1/shards/{SHARD}/batch", {"puts": []}, 400),
        (
            "POST",
            f"/v1/shards/{SHARD}/batch",
            {"puts": [{"key": "aw==", "value": "dg=="}, {}]},
            400,
        ),
        (
            "POST",
            f"/v1/shards/{SHARD}/batch",
            {"puts": [{"key": "aw==", "value": "dg=="}, {"key": "A" * 2000, "value": "dg=="}]},
            413,
        ),
        ("POST", f"/v1/shards/{SHARD}/replicate", {"term": 1, "rows": "x"}, 400),
        (
            "POST",
            f"/v1/shards/{SHARD}/replicate",  # an LSN SQLite cannot hold (a replica: 500)
            {"term": 1, "prev_lsn": 0, "sync": False,
             "rows": [{"key": "aw==", "value": "dg==", "lsn": 1 << 63}]},
            400,
        ),
        ("GET", f"/v1/shards/{SHARD}/rows?after=-1", None, 400),
        ("PATCH", key_path(SHARD, b"k"), None, 405),
        ("POST", key_path(SHARD, b"k"), None, 405),
        ("GET", "/v2/nothing/here", None, 404),
    ],
)
def test_bad_requests_get_4xx_and_change_nothing(cluster, trio, method, path, body, status):
    p, *_ = trio
    cluster.client.put(p.address, SHARD, b"k", b"original")
    before = digests(*trio)
    got, answer, _ = raw(p.address, method, path, body, token=token_for(path))
    assert got == status, answer
    assert digests(*trio) == before and len(before) == 1
    assert cluster.client.get(p.address, SHARD, b"k").value == b"original"


def test_suspended_primary_refuses_writes_and_lost_serves_nothing(cluster, trio):
    p, *_ = trio
    cluster.client.put(p.address, SHARD, b"k", b"1")
    p.table.set_writable(False)
    status, body, _ = raw(p.address, "PUT", key_path(SHARD, b"k"), {"value": "Mg=="})
    assert (status, body["error"]) == (503, "not_writable")
    assert cluster.client.get(p.address, SHARD, b"k").value == b"1", "reads still served"
    assert len(digests(*trio)) == 1 and p.store.get(b"k").value == b"1"
    p.table.set_serving(False)
    assert raw(p.address, "GET", key_path(SHARD, b"k"))[0] == 503
    p.plane.metrics.ready(True)  # what the runtime says after a turn with its plan read
    assert raw(p.address, "GET", "/readyz")[:2] == (
        503, {"status": "not_ready", "error": "not_ready",
              "reason": "ZooKeeper session lost: not serving"})
    assert raw(p.address, "GET", "/healthz")[0] == 200, "alive all the same"
    p.table.set_serving(True)
    p.table.set_writable(True)
    cluster.client.put(p.address, SHARD, b"k", b"2")
    assert {n.store.get(b"k").value for n in trio} == {b"2"}
