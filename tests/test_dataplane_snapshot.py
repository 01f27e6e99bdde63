"""Bootstrap from a file image: the snapshot endpoint and its download (kernel splice and the
user-space fallback), fallbacks to the rows stream, refusals and timeouts."""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest

from agents.dataplane import transfer
from agents.dataplane.repair import PROBE_ROWS, copy_shard
from agents.dataplane.transfer import CopyCancelled, fetch_snapshot
from agents.shardsm import ShardState
from agents.storeset import StoreSet
from shardkeeper.peer import PeerClient, PeerError, PeerUnavailable
from shardkeeper.poll import poll_until
from tests import dataplane_support
from tests.dataplane_support import (
    PEER_TOKEN,
    SHARD,
    TOKEN,
    digests,
    follow,
    lead,
    load,
    raw,
)

# The data plane's fixtures (in this module they stand for conftest's ZooKeeper ``cluster``).
cluster = dataplane_support.cluster
trio = dataplane_support.trio


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
        result = copy_shard(new.store, SHARD, p.address, cluster.peer,
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


@pytest.mark.parametrize("rows", [0, PROBE_ROWS - 1, PROBE_ROWS])
def test_a_shard_of_one_small_page_is_copied_by_that_page_a_larger_one_by_its_image(
        cluster, trio, rows):
    p, *_ = trio
    if rows:
        load(cluster.client, p, rows)
    stores = StoreSet(cluster.tmp_path / f"fresh{rows}")
    store = stores.open(SHARD)
    result = copy_shard(store, SHARD, p.address, cluster.peer,
                        image_path=stores.incoming_path(SHARD))
    if rows < PROBE_ROWS:
        assert (result.image_bytes, result.rows_fetched, result.pages) == (0, rows, 1)
    else:  # the probe's page is set aside: the image holds those rows
        assert result.image_bytes > 0 and result.rows_fetched == 0
    assert store.count() == rows and store.digest() == p.store.digest()
    assert store.sync_lsn() == p.store.sync_lsn()
    stores.close_all()


def test_a_small_shard_whose_source_purged_deletes_is_copied_by_its_image(
        cluster, trio, caplog):
    p, *_ = trio
    load(cluster.client, p, 10)
    cluster.client.delete(p.address, SHARD, b"k000003")
    for n in trio:
        poll_until(lambda n=n: n.store.sync_lsn() == p.store.sync_lsn(), 10, "in sync")
        n.store.compact(n.store.sync_lsn())  # every replica has the delete: purged
    stores = StoreSet(cluster.tmp_path / "fresh")
    store = stores.open(SHARD)
    with caplog.at_level("INFO", logger="agents.dataplane.repair"):
        result = copy_shard(store, SHARD, p.address, cluster.peer,
                            image_path=stores.incoming_path(SHARD))
    # The probe's rows would lack the purged delete: the copy takes the image at once, as
    # a first copy (not one of the copies again a compaction under way may cost).
    assert result.image_bytes > 0 and "copying its store again" not in caplog.text
    assert store.get(b"k000003") is None and store.count() == 9
    assert store.digest() == p.store.digest()
    stores.close_all()


def test_a_busy_or_failed_image_falls_back_to_the_rows_stream(cluster, trio):
    p, *_ = trio
    load(cluster.client, p, 1_500)
    held = p.store.open_image()  # another copy is reading it
    try:
        assert raw(p.address, "GET", f"/v1/shards/{SHARD}/snapshot", token=PEER_TOKEN)[0] == 409
        stores = StoreSet(cluster.tmp_path / "fresh")
        store = stores.open(SHARD)
        result = copy_shard(store, SHARD, p.address, cluster.peer, page_size=500,
                            image_path=stores.incoming_path(SHARD))
    finally:
        held.close()
    assert (result.image_bytes, result.rows_fetched) == (0, 1_500)
    assert store.digest() == p.store.digest()
    # A copy that tried an image once resumes with rows, even from the start.
    store.set_meta("bootstrap_cursor", 0)
    again = copy_shard(store, SHARD, p.address, cluster.peer,
                       image_path=stores.incoming_path(SHARD))
    assert again.image_bytes == 0 and again.rows_fetched == 1_500
    stores.close_all()


def test_snapshot_needs_the_token_and_a_source_replica(cluster, trio):
    p, r1, _ = trio
    assert raw(p.address, "GET", f"/v1/shards/{SHARD}/snapshot", token="wrong")[0] == 401
    assert raw(p.address, "GET", f"/v1/shards/{SHARD + 1}/snapshot", token=PEER_TOKEN)[0] == 404
    follow(r1, p, 1, state=ShardState.BOOTSTRAPPING)
    assert raw(r1.address, "GET", f"/v1/shards/{SHARD}/snapshot", token=PEER_TOKEN)[0] == 409
    assert raw(p.address, "POST", f"/v1/shards/{SHARD}/snapshot", token=PEER_TOKEN)[0] == 405


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
    size = fetch_snapshot(p.address, SHARD, dest, token=PEER_TOKEN, timeout=2.0)
    source = p.stores.path_for(SHARD).read_bytes()  # the image checkpointed it; no writes since
    assert size == len(source) > 5_000_000
    assert dest.read_bytes() == source


def test_head_split_anywhere_and_body_bytes_behind_it_are_kept(receive_path, tmp_path):
    body = random.Random(3).randbytes(300_000)
    head = snapshot_head(len(body))
    # The end of the headers straddles two reads, and body bytes follow it in the same read.
    pieces = [head[:7], head[7:-2], head[-2:] + body[:1_000], body[1_000:]]
    with ScriptedPeer(pieces) as peer:
        size = fetch_snapshot(peer.address, SHARD, tmp_path / "i", token=PEER_TOKEN, timeout=5.0)
    assert size == len(body) and (tmp_path / "i").read_bytes() == body
    assert f"GET /v1/shards/{SHARD}/snapshot HTTP/1.1".encode() in peer.request
    assert f"Authorization: Bearer {PEER_TOKEN}".encode() in peer.request


def test_a_snapshot_cut_short_is_peer_unavailable(receive_path, tmp_path):
    body = b"x" * 300_000
    peer = ScriptedPeer([snapshot_head(1_000_000) + body[:1_000], body[1_000:]])
    with peer, pytest.raises(PeerUnavailable, match="truncated at 300000 of 1000000"):
        fetch_snapshot(peer.address, SHARD, tmp_path / "i", token=PEER_TOKEN, timeout=5.0)


def test_a_peer_that_closes_inside_the_headers_is_peer_unavailable(receive_path, tmp_path):
    peer = ScriptedPeer([snapshot_head(10)[:20]])
    with peer, pytest.raises(PeerUnavailable) as err:
        fetch_snapshot(peer.address, SHARD, tmp_path / "i", token=PEER_TOKEN, timeout=5.0)
    assert err.value.status is None


def test_a_stalled_snapshot_times_out(receive_path, tmp_path):
    with ScriptedPeer([snapshot_head(100_000) + b"x" * 1_000], hold=True) as peer:
        started = time.monotonic()
        with pytest.raises(PeerUnavailable, match="no bytes for 0.3 s"):
            fetch_snapshot(peer.address, SHARD, tmp_path / "i", token=PEER_TOKEN, timeout=0.3)
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
        fetch_snapshot(big_primary.address, SHARD, dest, token=PEER_TOKEN, timeout=2.0,
                       stop=StopAfter(3))
    assert 0 < dest.stat().st_size < big_primary.stores.path_for(SHARD).stat().st_size

    def downloaded() -> bool:
        try:
            got = fetch_snapshot(big_primary.address, SHARD, dest, token=PEER_TOKEN, timeout=2.0)
            return got > 0
        except PeerError as exc:
            assert exc.status == 409  # busy until the server sees the cancelled copy leave
            return False

    # The server releases the image once it sees the cancelled copier go.
    poll_until(downloaded, 10.0, "the image released", interval=0.01)


def test_snapshot_refusals_keep_their_status_and_body(cluster, trio, receive_path, tmp_path):
    p, r1, _ = trio
    dest = tmp_path / "image"

    def refusal(address, shard=SHARD, token=PEER_TOKEN):
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
    result = copy_shard(new.store, SHARD, big_primary.address, cluster.peer,
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
