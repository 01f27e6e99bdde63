"""A primary's forwards from one thread (``PeerClient.post_many``) and the HTTP/1.1 connection
under every PeerClient call (``shardkeeper.httpconn``), against stand-in peers on real
sockets on 127.0.0.1: every peer gets its request before any answer is read, an answer that
does not come is a failure in its place, a kept-alive connection the peer closed gets one
fresh try. No assertion on time: only generous bounds against hanging."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import pytest

from agents.store import make_lsn
from shardkeeper.httpconn import Connection, ProtocolError
from shardkeeper.peer import PeerClient, PeerUnavailable, Reply
from shardkeeper.poll import poll_until
from shardkeeper.wire import Row
from tests import dataplane_support
from tests.dataplane_support import PEER_TOKEN, SHARD, RecordingClient, digests, follow, lead

cluster = dataplane_support.cluster
trio = dataplane_support.trio

HANG = 20.0  # seconds: only against a test that would otherwise never end


def read_request(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """One request's head and body from ``sock``; None once the client closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        body += chunk
    return head, body


def answer(body: bytes = b"{}", status: str = "200 OK", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


class StandIn:
    """A peer on a free port of 127.0.0.1 that runs ``serve(sock)`` per connection."""

    def __init__(self, serve: Callable[[socket.socket], None]):
        self.serve = serve
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self.socks.append(sock)
            threading.Thread(target=self._run, args=(sock,), daemon=True).start()

    def _run(self, sock: socket.socket) -> None:
        sock.settimeout(HANG)
        try:
            self.serve(sock)
        except OSError:
            pass
        finally:
            sock.close()

    def close(self) -> None:
        self.listener.close()
        for sock in self.socks:
            sock.close()


@pytest.fixture
def stand_ins():
    made: list[StandIn] = []

    def make(serve: Callable[[socket.socket], None]) -> StandIn:
        made.append(StandIn(serve))
        return made[-1]

    yield make
    for peer in made:
        peer.close()


def free_closed_port() -> str:
    """An address where nothing listens (connect is refused)."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        return f"127.0.0.1:{s.getsockname()[1]}"


# -- post_many ---------------------------------------------------------------------------


def test_post_many_sends_to_every_peer_before_it_reads_an_answer(stand_ins):
    """Each stand-in answers only once both have their request: a client that read one
    answer before sending the other request would never get it (the barrier breaks)."""
    both = threading.Barrier(2, timeout=HANG)

    def serve_as(name: str) -> Callable[[socket.socket], None]:
        def serve(sock: socket.socket) -> None:
            while (request := read_request(sock)) is not None:
                both.wait()
                sock.sendall(answer(b'{"name": "%s", "got": %d}' % (name.encode(),
                                                                     len(request[1]))))
        return serve

    a, b = stand_ins(serve_as("a")), stand_ins(serve_as("b"))
    client = PeerClient(PEER_TOKEN, timeout=HANG, attempts=1)
    for _ in range(3):  # again on the kept-alive connections
        replies = client.post_many([(a.address, "/x", b'{"n": 1}'), (b.address, "/y", b"{}")])
        assert replies == [Reply(200, {"name": "a", "got": 8}), Reply(200, {"name": "b", "got": 2})]
    assert (a.connections, b.connections) == (1, 1)


def test_post_many_puts_a_failure_in_the_place_of_an_answer_that_does_not_come(stand_ins):
    def fine(sock: socket.socket) -> None:
        while read_request(sock) is not None:
            sock.sendall(answer(b'{"ok": true}'))

    silent_got = threading.Event()

    def silent(sock: socket.socket) -> None:
        read_request(sock)
        silent_got.set()
        sock.recv(1)  # until the client gives up and closes

    def broken(sock: socket.socket) -> None:
        read_request(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"trunc")

    ok, quiet, bad = stand_ins(fine), stand_ins(silent), stand_ins(broken)
    refused = free_closed_port()
    client = PeerClient(PEER_TOKEN, timeout=0.5, attempts=1)
    calls = [(refused, "/r", b"{}"), (quiet.address, "/q", b"{}"), (bad.address, "/b", b"{}"),
             (ok.address, "/o", b"{}")]
    replies = client.post_many(calls)
    assert [type(r) for r in replies[:3]] == [PeerUnavailable] * 3
    assert [r.address for r in replies[:3]] == [refused, quiet.address, bad.address]
    assert replies[3] == Reply(200, {"ok": True}), "the others' failures cost it nothing"
    assert silent_got.is_set()
    with pytest.raises(ValueError):
        client.post_many([(ok.address, "/1", b"{}"), (ok.address, "/2", b"{}")])


def test_no_connection_is_left_with_an_answer_unread(stand_ins, monkeypatch):
    """Should anything unforeseen escape post_many while answers are outstanding, those
    connections are dropped: the next call must not read an old answer as its own."""
    def numbered(sock: socket.socket) -> None:
        n = 0
        while read_request(sock) is not None:
            n += 1
            sock.sendall(answer(b'{"n": %d}' % n))

    a, b = stand_ins(numbered), stand_ins(numbered)
    client = PeerClient(PEER_TOKEN, timeout=HANG, attempts=1)
    calls = [(a.address, "/a", b"{}"), (b.address, "/b", b"{}")]
    assert client.post_many(calls) == [Reply(200, {"n": 1})] * 2

    def unforeseen(*args, **kwargs):
        raise RuntimeError("unforeseen")

    with monkeypatch.context() as patch:
        patch.setattr(client, "_receive", unforeseen)
        with pytest.raises(RuntimeError):
            client.post_many(calls)
    assert client.post_many(calls) == [Reply(200, {"n": 1})] * 2, "fresh connections"
    assert (a.connections, b.connections) == (2, 2)


@pytest.mark.parametrize("many", [False, True])
def test_a_kept_alive_connection_the_peer_closed_gets_one_fresh_try(stand_ins, many):
    closed = threading.Event()

    def one_per_connection(sock: socket.socket) -> None:
        if read_request(sock) is not None:
            sock.sendall(answer(b'{"n": 1}'))  # keep-alive by default, then closed anyway
        sock.close()
        closed.set()

    peer = stand_ins(one_per_connection)
    client = PeerClient(PEER_TOKEN, timeout=HANG, attempts=1)
    for _ in range(3):
        closed.clear()
        if many:
            assert client.post_many([(peer.address, "/p", b"{}")]) == [Reply(200, {"n": 1})]
        else:
            assert client.call(peer.address, "POST", "/p", {}) == Reply(200, {"n": 1})
        assert closed.wait(HANG)
    assert peer.connections == 3


def test_an_answer_that_closes_the_connection_is_not_reused(stand_ins):
    def close_after(sock: socket.socket) -> None:
        read_request(sock)
        sock.sendall(answer(b"{}", extra="Connection: close\r\n"))
        # Kept open: a client that reused it would hang here, not fail fast.
        sock.recv(1)

    peer = stand_ins(close_after)
    client = PeerClient(PEER_TOKEN, timeout=HANG, attempts=1)
    for _ in range(2):
        assert client.call(peer.address, "GET", "/healthz").status == 200
    assert peer.connections == 2


# -- the connection's reading of answers ---------------------------------------------------


def canned(stand_ins, data: bytes) -> Connection:
    def serve(sock: socket.socket) -> None:
        read_request(sock)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)

    peer = stand_ins(serve)
    host, _, port = peer.address.rpartition(":")
    conn = Connection(host, int(port), HANG)
    conn.send_request("GET", "/", {}, None)
    return conn


def test_answers_are_read_by_their_framing(stand_ins):
    got = canned(stand_ins, b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b'{"a": 1}'))
    a = got.read_response()
    assert (a.status, a.body, a.will_close) == (200, b'{"a": 1}', False)
    old = canned(stand_ins, b"HTTP/1.0 404 Not Found\r\nContent-Type: x\r\n\r\nto the end")
    a = old.read_response()
    assert (a.status, a.body, a.will_close) == (404, b"to the end", True)
    big = b"r" * 300_000  # several reads, straight into the body's buffer
    a = canned(stand_ins, answer(big)).read_response()
    assert a.body == big and a.headers["content-length"] == "300000"


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/2 200\r\nContent-Length: 0\r\n\r\n",
    b"SMTP ready\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",  # truncated
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"HTTP/1.1 200 OK\r\n no-name\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n",  # closed within the head
    "HTTP/1.1 2\u00b200 OK\r\nContent-Length: 0\r\n\r\n".encode("latin-1"),  # "²".isdigit()
])
def test_answers_that_break_the_framing_are_protocol_errors(stand_ins, data):
    with pytest.raises(ProtocolError):
        canned(stand_ins, data).read_response()


# -- the primary's forwards ----------------------------------------------------------------


def test_a_write_waits_for_a_lagging_replica_and_one_behind_on_the_plan_at_once(cluster):
    """One in-sync replica missed writes (gap: pushed), the other has not read the plan that
    made this primary (term_ahead: asked again): both follow-ups run, the write is
    acknowledged once both applied it, and all three hold the same rows."""
    forwards = RecordingClient()
    p = cluster.start("p", client=forwards, term_ahead_wait=HANG)
    r1, r2 = cluster.start("r1"), cluster.start("r2")
    p.store.mark_promoted()
    r1.store, r2.store  # noqa: B018 - open the replicas' stores
    lead(p, 2, in_sync=(r1,))
    follow(r1, p, 2)
    for i in range(5):  # r2 misses these
        cluster.client.put(p.address, SHARD, f"early-{i}".encode(), b"v")
    lead(p, 2, in_sync=(r1, r2))
    follow(r2, p, 1)  # r2 reads plan 2 later
    lsns: list[int] = []
    writer = threading.Thread(
        target=lambda: lsns.append(cluster.client.put(p.address, SHARD, b"k", b"v")))
    writer.start()
    try:
        poll_until(lambda: "term_ahead" in forwards.errors, HANG, "r2 refusing term 2",
                   interval=0.002)
        assert not lsns, "not acknowledged while r2 refuses"
        follow(r2, p, 2)
    finally:
        writer.join(HANG)
    assert lsns and r2.store.get(b"k") == Row(b"k", b"v", lsns[0])
    assert r2.store.get(b"early-0") is not None, "the gap was pushed too"
    assert len(digests(p, r1, r2)) == 1


def test_a_retried_forward_is_acknowledged_and_applied_once(cluster, trio):
    """What the fresh try after a failed kept-alive connection may do: send a forward the
    replica already applied. It is acknowledged (the replica holds its rows), not a gap."""
    p, r1, _ = trio
    lsn = cluster.client.put(p.address, SHARD, b"k", b"v")
    row = Row(b"k", b"v", lsn)
    again = cluster.peer.replicate(r1.address, SHARD, term=1, prev_lsn=lsn - 1, rows=[row],
                                   sync=True)
    assert (again.status, again.body) == (200, {"sync_lsn": lsn})
    assert r1.store.get(b"k") == row and r1.store.sync_lsn() == lsn
    ahead = Row(b"j", b"v", make_lsn(1, (lsn & 0xFFFFFFFF) + 5))
    gap = cluster.peer.replicate(r1.address, SHARD, term=1, prev_lsn=ahead.lsn - 1,
                                 rows=[ahead], sync=True)
    assert (gap.status, gap.body) == (409, {"error": "gap", "sync_lsn": lsn})
