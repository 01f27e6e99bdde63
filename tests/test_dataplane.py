"""The data plane over real HTTP on 127.0.0.1 with real SQLite files: a primary and replicas
in one process, driven through the shard table the way the agent runtime will drive it."""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
from dataclasses import dataclass

import pytest

from agents.dataplane import DataPlane, ShardRoute, ShardTable, transfer
from agents.dataplane.repair import copy_shard, repair_shard, repair_start
from agents.dataplane.transfer import CopyCancelled, fetch_snapshot
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
from agents.store import StoreSet, make_lsn
from shardkeeper.peer import PeerClient, PeerError, PeerUnavailable
from shardkeeper.poll import poll_until
from shardkeeper.wire import MAX_KEY_BYTES, MAX_VALUE_BYTES, Row, b64, key_path

TOKEN = "test-cluster-token"
SHARD = 7


@dataclass
class Node:
    name: str
    stores: StoreSet
    table: ShardTable
    plane: DataPlane

    @property
    def address(self) -> str:
        return self.plane.address

    @property
    def store(self):
        return self.stores.open(SHARD)


class Cluster:
    """Agents on free ports; ``restart`` brings a stopped agent back on a new port."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.nodes: list[Node] = []
        self.client = PeerClient(TOKEN, timeout=2.0, attempts=3)

    def start(self, name: str, stores: StoreSet | None = None, table: ShardTable | None = None,
              **options):
        stores = stores or StoreSet(self.tmp_path / name)
        table = table or ShardTable()
        plane = DataPlane(stores, table, TOKEN, forward_timeout=1.0, **options).start()
        node = Node(name, stores, table, plane)
        self.nodes.append(node)
        return node

    def restart(self, node: Node) -> Node:
        return self.start(node.name, node.stores, node.table)

    def stop(self) -> None:
        for node in self.nodes:
            node.plane.stop()
        for node in self.nodes:
            node.stores.close_all()


def lead(primary: Node, term: int, in_sync=(), bootstrapping=()):
    primary.table.set_route(
        SHARD,
        ShardRoute(
            ShardState.PRIMARY,
            term=term,
            primary=primary.address,
            in_sync=tuple(n.address for n in in_sync),
            bootstrapping=tuple(n.address for n in bootstrapping),
        ),
    )


def follow(replica: Node, primary: Node, term: int, state=ShardState.REPLICA):
    """The route the runtime gives a replica whose plan names ``primary`` at ``term``."""
    replica.table.set_route(SHARD, ShardRoute(state, term=term, primary=primary.address))


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.stop()


@pytest.fixture
def trio(cluster):
    """A primary and two in-sync replicas of SHARD at term 1."""
    p, r1, r2 = cluster.start("p"), cluster.start("r1"), cluster.start("r2")
    p.store.mark_promoted()
    r1.store, r2.store  # noqa: B018 - open the replicas' stores
    lead(p, 1, in_sync=(r1, r2))
    follow(r1, p, 1)
    follow(r2, p, 1)
    return p, r1, r2


def digests(*nodes: Node) -> set[str]:
    return {n.store.digest() for n in nodes}


def raw(address: str, method: str, path: str, body=None, token: str | None = TOKEN):
    """One HTTP request with full control of headers and body."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=payload, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else {}, dict(resp.getheaders())


def load(client: PeerClient, node: Node, count: int, prefix: str = "k", batch: int = 1000):
    for start in range(0, count, batch):
        items = [
            (f"{prefix}{i:06d}".encode(), f"v{i}".encode()) for i in range(start, start + batch)
        ]
        client.batch_put(node.address, SHARD, items[: count - start])


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
    reply = cluster.client.replicate(
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
    ok = cluster.client.replicate(r1.address, SHARD, term=1, prev_lsn=0, rows=[row], sync=True)
    assert (ok.status, ok.body) == (200, {"sync_lsn": row.lsn})
    assert r1.store.get(b"k") == row and r1.store.sync_lsn() == row.lsn
    follow(r2, p, 1, state=ShardState.BOOTSTRAPPING)
    copied = cluster.client.replicate(r2.address, SHARD, term=1, prev_lsn=0, rows=[row],
                                      sync=False)
    assert copied.status == 200 and r2.store.get(b"k") == row
    ahead = cluster.client.replicate(r2.address, SHARD, term=2, prev_lsn=0,
                                     rows=[Row(b"j", b"v", make_lsn(2, 1))], sync=False)
    assert (ahead.status, ahead.body) == (409, {"error": "term_ahead", "term": 1})
    assert r2.store.get(b"j") is None


def test_a_forged_forward_of_a_huge_term_moves_no_fence(cluster, trio):
    """Issue 10: one forged forward with a huge term used to raise the replica's fence and
    make every later put to the shard fail with 503 until the replica's session bounced."""
    p, r1, r2 = trio
    cluster.client.put(p.address, SHARD, b"before", b"1")
    before = digests(r1, r2)
    for sync in (True, False):
        forged = {"term": 10**15, "prev_lsn": p.store.max_lsn(), "sync": sync,
                  "rows": [{"key": b64(b"k"), "value": b64(b"forged"), "lsn": make_lsn(9, 1)}]}
        status, body, _ = raw(r1.address, "POST", f"/v1/shards/{SHARD}/replicate", forged)
        assert (status, body) == (409, {"error": "term_ahead", "term": 1})
    assert r1.table.route(SHARD).term == 1 and digests(r1, r2) == before
    for i in range(3):
        cluster.client.put(p.address, SHARD, f"after-{i}".encode(), b"acknowledged")
    assert r1.store.get(b"after-2").value == b"acknowledged" and r1.store.get(b"k") is None
    assert len(digests(*trio)) == 1


class RecordingClient(PeerClient):
    """A primary's forwarding client that keeps the error of every answer it gets."""

    def __init__(self) -> None:
        super().__init__(TOKEN, timeout=1.0, attempts=1)
        self.errors: list[str | None] = []

    def replicate(self, *args, **kwargs):
        reply = super().replicate(*args, **kwargs)
        self.errors.append(reply.body.get("error"))
        return reply


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
        ("/healthz", "GET", None),
    ]:
        assert intruder.call(p.address, method, path, body).status == 401
        assert raw(p.address, method, path, body, token=None)[0] == 401
    assert all(n.store.count() == 0 for n in trio)
    assert cluster.client.healthz(p.address).status == 200


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
    got, answer, _ = raw(p.address, method, path, body)
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
    assert raw(p.address, "GET", "/healthz")[0] == 503
    p.table.set_serving(True)
    p.table.set_writable(True)
    cluster.client.put(p.address, SHARD, b"k", b"2")
    assert {n.store.get(b"k").value for n in trio} == {b"2"}


# -- bootstrap ---------------------------------------------------------------------------


class WritesWhilePagesAreInFlight(PeerClient):
    """Overwrites and deletes keys of each page after the source read it, before it lands."""

    def __init__(self, primary: Node):
        super().__init__(TOKEN, attempts=3)
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
            stores.open(SHARD), SHARD, p.address, cluster.client,
            page_size=500, stop=stop, progress=stop_after_three_pages,
        )  # fmt: skip
    stores.close_all()  # the agent restarts
    stores = StoreSet(path.parent)
    store = stores.open(SHARD)
    assert store.bootstrap_cursor() > 0
    result = copy_shard(store, SHARD, p.address, cluster.client, page_size=500)
    assert result.rows_fetched == 3_500, "resumed after the first 1,500 rows, not from 0"
    assert store.digest() == p.store.digest()
    stores.close_all()


def test_bootstrap_through_the_handler_reports_copy_done(cluster, trio):
    p, *_ = trio
    load(cluster.client, p, 1_200, batch=400)
    new = cluster.start("r3")
    follow(new, p, 1, state=ShardState.BOOTSTRAPPING)
    handler = KVShardHandler(new.stores, cluster.client, page_size=500)
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
    point = KVShardHandler(r2.stores, cluster.client).on_become_primary(SHARD, 2)
    lead(r2, 2, in_sync=(r1,))
    follow(r1, r2, 2)
    assert r1.store.digest() != r2.store.digest()
    with pytest.raises(PeerError):
        cluster.client.put(r2.address, SHARD, b"blocked", b"until repaired")
    result = repair_shard(r1.store, SHARD, r2.address, cluster.client)
    assert result.promotion_lsn == point and result.replaced >= 2
    assert r1.store.get(b"k000002").value == b"v2" and not r1.store.get(b"k000003").tombstone
    assert len(digests(r1, r2)) == 1
    lsn = cluster.client.put(r2.address, SHARD, b"new", b"gen2")
    assert lsn >> 32 == 2 and lsn > old.store.max_lsn()
    assert len(digests(r1, r2)) == 1

    # The old primary comes back and the plan makes it a replica: it repairs too.
    old = cluster.restart(old)
    follow(old, r2, 2)
    handler = KVShardHandler(old.stores, cluster.client)
    perform(handler, Demote(SHARD, 2, r2.address), threading.Event())
    lead(r2, 2, in_sync=(r1, old))
    cluster.client.put(r2.address, SHARD, b"after", b"rejoin")
    assert len(digests(old, r1, r2)) == 1
    assert not old.store.was_primary()


def test_failover_repair_catches_up_a_replica_that_missed_the_last_write(cluster, trio):
    old, r1, r2 = unacknowledged_write_on_r1_only(cluster, trio)
    # Plan generation 2 promotes r1, which holds the unacknowledged writes: they survive.
    perform(KVShardHandler(r1.stores, cluster.client), Promote(SHARD, 2), threading.Event())
    lead(r1, 2, in_sync=(r2,))
    follow(r2, r1, 2)
    repair_shard(r2.store, SHARD, r1.address, cluster.client)
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
    KVShardHandler(r2.stores, cluster.client).on_become_primary(SHARD, 2)
    lead(r2, 2)
    cluster.client.put(r2.address, SHARD, b"gen2", b"written")
    r3 = cluster.start("r3")
    follow(r3, r2, 2, state=ShardState.BOOTSTRAPPING)
    copy_shard(r3.store, SHARD, r2.address, cluster.client)
    follow(r3, r2, 2)
    lead(r2, 2, in_sync=(r3,))
    cluster.client.put(r2.address, SHARD, b"gen2", b"acknowledged by r3")
    # Generation 3: r2 dies, r3 is promoted; r1 finally hears of it and repairs.
    r2.plane.stop()
    KVShardHandler(r3.stores, cluster.client).on_become_primary(SHARD, 3)
    lead(r3, 3, in_sync=(r1,))
    follow(r1, r3, 3)
    perform(
        KVShardHandler(r1.stores, cluster.client), Repair(SHARD, r3.address, 3), threading.Event()
    )
    assert r1.store.get(b"k000002").value == b"v2", "generation 1's unacked tail is gone"
    assert len(digests(r1, r3)) == 1
    cluster.client.put(r3.address, SHARD, b"gen3", b"ok")
    assert len(digests(r1, r3)) == 1


def test_rows_stream_is_binary_and_still_needs_the_token(cluster, trio):
    p, *_ = trio
    cluster.client.put(p.address, SHARD, b"k", b"v")
    page = cluster.client.rows_after(p.address, SHARD, 0, 10)
    assert page.rows == [p.store.get(b"k")] and page.complete
    assert page.max_lsn == p.store.sync_lsn()
    assert PeerClient("wrong", attempts=1).call(
        p.address, "GET", f"/v1/shards/{SHARD}/rows?after=0").status == 401


def test_bootstrap_from_a_file_image_while_writes_continue(cluster, trio):
    p, r1, r2 = trio
    load(cluster.client, p, 5_000)
    new = cluster.start("r3")
    follow(new, p, 1, state=ShardState.BOOTSTRAPPING)
    lead(p, 1, in_sync=(r1, r2), bootstrapping=(new,))
    stop_writing = threading.Event()

    def writer():
        client, i = PeerClient(TOKEN, attempts=3), 0
        while not stop_writing.is_set():
            client.put(p.address, SHARD, f"k{i % 6000:06d}".encode(), f"w{i}".encode())
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        result = copy_shard(new.store, SHARD, p.address, cluster.client,
                            image_path=new.stores.incoming_path(SHARD))
        follow(new, p, 1)
        lead(p, 1, in_sync=(r1, r2, new))
        count = p.store.max_lsn()
        poll_until(lambda: p.store.max_lsn() > count + 20, 10.0, "writes to the joined replica",
                   interval=0.01)
    finally:
        stop_writing.set()
        thread.join()
    assert result.image_bytes > 0 and not new.stores.incoming_path(SHARD).exists()
    assert len(digests(p, r1, r2, new)) == 1
    assert new.store.count() == p.store.count() >= 5_000


def test_a_busy_or_failed_image_falls_back_to_the_rows_stream(cluster, trio):
    p, *_ = trio
    load(cluster.client, p, 1_500)
    held = p.store.open_image()  # another copy is reading it
    try:
        assert raw(p.address, "GET", f"/v1/shards/{SHARD}/snapshot")[0] == 409
        stores = StoreSet(cluster.tmp_path / "fresh")
        store = stores.open(SHARD)
        result = copy_shard(store, SHARD, p.address, cluster.client, page_size=500,
                            image_path=stores.incoming_path(SHARD))
    finally:
        held.close()
    assert (result.image_bytes, result.rows_fetched) == (0, 1_500)
    assert store.digest() == p.store.digest()
    # A copy that tried an image once resumes with rows, even from the start.
    store.set_meta("bootstrap_cursor", 0)
    again = copy_shard(store, SHARD, p.address, cluster.client,
                       image_path=stores.incoming_path(SHARD))
    assert again.image_bytes == 0 and again.rows_fetched == 1_500
    stores.close_all()


def test_snapshot_needs_the_token_and_a_source_replica(cluster, trio):
    p, r1, _ = trio
    assert raw(p.address, "GET", f"/v1/shards/{SHARD}/snapshot", token="wrong")[0] == 401
    assert raw(p.address, "GET", f"/v1/shards/{SHARD + 1}/snapshot")[0] == 404
    follow(r1, p, 1, state=ShardState.BOOTSTRAPPING)
    assert raw(r1.address, "GET", f"/v1/shards/{SHARD}/snapshot")[0] == 409
    assert raw(p.address, "POST", f"/v1/shards/{SHARD}/snapshot")[0] == 405


# -- the snapshot download: kernel splice, and the user-space fallback ---------------------


@pytest.fixture(params=["splice", "user-space copy"])
def receive_path(request, monkeypatch):
    """Every snapshot test runs on both receive paths: splice where the platform has it,
    and the recv_into fallback, forced."""
    if request.param == "splice":
        if not transfer.SPLICE_SNAPSHOTS:
            pytest.skip("no os.splice on this platform")
    else:
        monkeypatch.setattr(transfer, "SPLICE_SNAPSHOTS", False)
    return request.param


@pytest.fixture
def big_primary(cluster):
    """A lone primary whose shard file is several MB, so a download takes many chunks."""
    p = cluster.start("big")
    p.store.mark_promoted()
    lead(p, 1)
    value = random.Random(7).randbytes(2_000)
    for start in range(0, 3_000, 500):
        cluster.client.batch_put(
            p.address, SHARD, [(f"k{i:06d}".encode(), value) for i in range(start, start + 500)]
        )
    return p


class ScriptedPeer:
    """A loopback TCP peer that reads one request and answers with ``pieces``, one send
    each, then closes (or, with ``hold``, keeps the connection open until the test ends)."""

    def __init__(self, pieces: list[bytes], hold: bool = False):
        self.pieces, self.hold = pieces, hold
        self.request = b""
        self.done = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def __enter__(self) -> ScriptedPeer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(10)
        self.listener.close()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while b"\r\n\r\n" not in self.request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                self.request += chunk
            for piece in self.pieces:
                conn.sendall(piece)
                self.done.wait(0.02)  # pace the pieces so they arrive as separate reads
            if self.hold:
                self.done.wait(10)


def snapshot_head(length: int) -> bytes:
    return (
        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.shardkeeper.snapshot\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_snapshot_download_is_the_source_file_byte_for_byte(cluster, big_primary, receive_path,
                                                           tmp_path):
    p = big_primary
    dest = tmp_path / "image"
    size = fetch_snapshot(p.address, SHARD, dest, token=TOKEN, timeout=2.0)
    source = p.stores.path_for(SHARD).read_bytes()  # the image checkpointed it; no writes since
    assert size == len(source) > 5_000_000
    assert dest.read_bytes() == source


def test_head_split_anywhere_and_body_bytes_behind_it_are_kept(receive_path, tmp_path):
    body = random.Random(3).randbytes(300_000)
    head = snapshot_head(len(body))
    # The end of the headers straddles two reads, and body bytes follow it in the same read.
    pieces = [head[:7], head[7:-2], head[-2:] + body[:1_000], body[1_000:]]
    with ScriptedPeer(pieces) as peer:
        size = fetch_snapshot(peer.address, SHARD, tmp_path / "i", token=TOKEN, timeout=5.0)
    assert size == len(body) and (tmp_path / "i").read_bytes() == body
    assert f"GET /v1/shards/{SHARD}/snapshot HTTP/1.1".encode() in peer.request
    assert f"Authorization: Bearer {TOKEN}".encode() in peer.request


def test_a_snapshot_cut_short_is_peer_unavailable(receive_path, tmp_path):
    body = b"x" * 300_000
    peer = ScriptedPeer([snapshot_head(1_000_000) + body[:1_000], body[1_000:]])
    with peer, pytest.raises(PeerUnavailable, match="truncated at 300000 of 1000000"):
        fetch_snapshot(peer.address, SHARD, tmp_path / "i", token=TOKEN, timeout=5.0)


def test_a_peer_that_closes_inside_the_headers_is_peer_unavailable(receive_path, tmp_path):
    peer = ScriptedPeer([snapshot_head(10)[:20]])
    with peer, pytest.raises(PeerUnavailable) as err:
        fetch_snapshot(peer.address, SHARD, tmp_path / "i", token=TOKEN, timeout=5.0)
    assert err.value.status is None


def test_a_stalled_snapshot_times_out(receive_path, tmp_path):
    with ScriptedPeer([snapshot_head(100_000) + b"x" * 1_000], hold=True) as peer:
        started = time.monotonic()
        with pytest.raises(PeerUnavailable, match="no bytes for 0.3 s"):
            fetch_snapshot(peer.address, SHARD, tmp_path / "i", token=TOKEN, timeout=0.3)
        assert time.monotonic() - started < 5


class StopAfter(threading.Event):
    """A stop that arrives mid-download: it sets itself the ``looks``-th time it is read."""

    def __init__(self, looks: int):
        super().__init__()
        self.looks = looks

    def is_set(self) -> bool:
        self.looks -= 1
        if self.looks <= 0:
            self.set()
        return super().is_set()


def test_stop_cancels_a_snapshot_download_between_chunks(cluster, big_primary, receive_path,
                                                         tmp_path):
    dest = tmp_path / "image"
    with pytest.raises(CopyCancelled):
        fetch_snapshot(big_primary.address, SHARD, dest, token=TOKEN, timeout=2.0,
                       stop=StopAfter(3))
    assert 0 < dest.stat().st_size < big_primary.stores.path_for(SHARD).stat().st_size

    def downloaded() -> bool:
        try:
            return fetch_snapshot(big_primary.address, SHARD, dest, token=TOKEN, timeout=2.0) > 0
        except PeerError as exc:
            assert exc.status == 409  # busy until the server sees the cancelled copy leave
            return False

    # The server releases the image once it sees the cancelled copier go.
    poll_until(downloaded, 10.0, "the image released", interval=0.01)


def test_snapshot_refusals_keep_their_status_and_body(cluster, trio, receive_path, tmp_path):
    p, r1, _ = trio
    dest = tmp_path / "image"

    def refusal(address, shard=SHARD, token=TOKEN):
        with pytest.raises(PeerError) as err:
            fetch_snapshot(address, shard, dest, token=token, timeout=2.0)
        return type(err.value), err.value.status, err.value.body.get("error")

    assert refusal(p.address, token="not-the-token") == (PeerError, 401, "unauthorized")
    assert refusal(p.address, SHARD + 1)[:2] == (PeerError, 404)
    held = p.store.open_image()
    try:
        assert refusal(p.address) == (PeerError, 409, "busy")
    finally:
        held.close()
    follow(r1, p, 1, state=ShardState.BOOTSTRAPPING)
    assert refusal(r1.address) == (PeerError, 409, "not_a_source")
    p.table.set_serving(False)
    assert refusal(p.address)[:2] == (PeerUnavailable, 503)


def test_bootstrap_from_a_file_image_on_the_fallback_path(cluster, big_primary, monkeypatch):
    monkeypatch.setattr(transfer, "SPLICE_SNAPSHOTS", False)
    new = cluster.start("new")
    follow(new, big_primary, 1, state=ShardState.BOOTSTRAPPING)
    result = copy_shard(new.store, SHARD, big_primary.address, cluster.client,
                        image_path=new.stores.incoming_path(SHARD))
    assert result.image_bytes == big_primary.stores.path_for(SHARD).stat().st_size
    assert result.rows_fetched == 0 and new.store.digest() == big_primary.store.digest()


def test_the_server_gives_up_on_a_reader_that_stops_reading(tmp_path):
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.truncate(64 << 20)  # more than every socket buffer on the way can hold
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()), big.open("rb") as f:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(60)
            with pytest.raises(TimeoutError):
                transfer.send_file(conn, f.fileno(), 64 << 20, 0.2)
            assert conn.gettimeout() == 60
