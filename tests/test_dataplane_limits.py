"""Issue 10: the data plane's thread model and its bounds, over real sockets. A fixed set of
threads whatever the connections do, the token checked before any body byte, a connection
cap with a clear 503, time-outs for idle connections and slow heads and bodies, and a peer's
forward never starved by clients."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest

from agents.dataplane import ShardRoute
from agents.dataplane.conns import ServerLimits
from agents.shardsm import ShardState
from shardkeeper.peer import PeerClient, PeerError
from shardkeeper.poll import poll_until
from shardkeeper.wire import MAX_BODY_BYTES, key_path
from tests import dataplane_support
from tests.dataplane_support import PEER_TOKEN, SHARD, TOKEN, follow, lead

cluster = dataplane_support.cluster
trio = dataplane_support.trio

FAST = {"idle_timeout": 0.3, "head_timeout": 0.3, "body_timeout": 0.3, "linger": 0.5}


def connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=20)


def put_head(length: int, token: str | None = TOKEN, key: bytes = b"k") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    return (f"PUT {key_path(SHARD, key)} HTTP/1.1\r\nHost: a\r\n{auth}"
            f"Content-Length: {length}\r\n\r\n").encode()


def read_answer(sock: socket.socket) -> bytes:
    """Everything until the server closes (answers here end with Connection: close)."""
    data = bytearray()
    while chunk := sock.recv(1 << 16):
        data += chunk
    return bytes(data)


def server_threads(node) -> list[str]:
    prefix = f"dataplane:{node.address.rpartition(':')[2]}-"
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(prefix))


def test_the_token_is_checked_before_any_body_byte_is_read(cluster, trio):
    """12 unauthenticated 32 MiB bodies in parallel (the probe took an agent from 47 to 240
    MB with them): each gets its 401 and the server buffers none of them."""
    p, *_ = trio
    payload = memoryview(bytearray(MAX_BODY_BYTES))  # shared, not copied per sender

    def send_unauthenticated(_: int) -> bytes:
        with connect(p.address) as sock:
            sock.sendall(put_head(MAX_BODY_BYTES, token="wrong"))
            # The server drains the body unread (or closes when its linger time is up).
            with contextlib.suppress(OSError):
                sock.sendall(payload)
            return read_answer(sock)

    tracemalloc.start()
    try:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(send_unauthenticated, range(12)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(a.startswith(b"HTTP/1.1 401 ") for a in answers), answers[0][:100]
    assert b'"unauthorized"' in answers[0]
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB allocated while 384 MiB were refused"
    # A client holding the token sends a body only once the server asked for it.
    with connect(p.address) as sock:
        sock.sendall(put_head(10, token="wrong")[:-2] + b"Expect: 100-continue\r\n\r\n")
        assert read_answer(sock).startswith(b"HTTP/1.1 401 ")


def test_slow_bodies_hold_no_thread_and_time_out_while_forwards_go_through(cluster, tmp_path):
    limits = ServerLimits(min_body_rate=1e9, **FAST)
    p, r1 = cluster.start("p"), cluster.start("r1", limits=limits)
    p.store.mark_promoted()
    r1.store  # noqa: B018 - open the replica's store
    lead(p, 1, in_sync=(r1,))
    follow(r1, p, 1)
    threads = server_threads(r1)
    assert len(threads) == 1 + limits.workers, threads
    slow = [connect(r1.address) for _ in range(200)]
    try:
        for sock in slow:  # authenticated, announced, and never finished
            sock.sendall(put_head(1000, key=b"slow") + b'{"value": ')
        poll_until(lambda: r1.plane.stats()["connections"] == 200, 20, "200 slow bodies open")
        assert server_threads(r1) == threads, "no thread per connection"
        # A peer's forward to the replica goes through meanwhile.
        lsn = cluster.client.put(p.address, SHARD, b"k", b"v")
        assert r1.store.get(b"k").lsn == lsn
        answers = [read_answer(sock) for sock in slow]
    finally:
        for sock in slow:
            sock.close()
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers[0][:100]
    assert r1.store.get(b"slow") is None
    poll_until(lambda: r1.plane.stats()["connections"] == 0, 20, "the slow bodies closed")
    assert server_threads(r1) == threads


def test_idle_and_slow_head_connections_are_closed(cluster):
    node = cluster.start("n", limits=ServerLimits(**FAST))
    with connect(node.address) as idle, connect(node.address) as slow_head:
        idle.sendall(b"GET /healthz HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode()
                     + b"\r\n\r\n")
        assert idle.recv(1 << 16).startswith(b"HTTP/1.1 200 ")
        slow_head.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert idle.recv(1 << 16) == b"", "a kept-alive connection closes after idle_timeout"
        assert read_answer(slow_head).startswith(b"HTTP/1.1 408 ")


def test_the_connection_cap_answers_503_and_makes_room_from_idle_connections(cluster):
    node = cluster.start("capped", limits=ServerLimits(max_connections=4))
    busy = [connect(node.address) for _ in range(4)]
    try:
        for sock in busy:  # heads under way: not idle, so not to be evicted
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        poll_until(lambda: node.plane.stats()["connections"] == 4, 20, "4 connections open")
        with connect(node.address) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            answer = read_answer(extra)
        assert answer.startswith(b"HTTP/1.1 503 ") and b'"overloaded"' in answer
    finally:
        for sock in busy:
            sock.close()
    poll_until(lambda: node.plane.stats()["connections"] == 0, 20, "the busy ones gone")
    idle = [connect(node.address) for _ in range(4)]
    try:
        poll_until(lambda: node.plane.stats()["connections"] == 4, 20, "4 idle connections")
        assert PeerClient(TOKEN, attempts=1).healthz(node.address).status == 200
        for sock in idle:
            sock.setblocking(False)

        def closed_by_server() -> list[socket.socket]:
            gone = []
            for sock in idle:
                with contextlib.suppress(BlockingIOError):
                    if sock.recv(1) == b"":
                        gone.append(sock)
            return gone

        poll_until(closed_by_server, 20, "an idle connection closed to make room")
        assert closed_by_server() == [idle[0]], "only the one idle longest"
    finally:
        for sock in idle:
            sock.close()


SHARD2 = SHARD + 1


def test_a_peers_forward_is_not_starved_by_clients(cluster):
    """Client writes that wait on a replica that never answers fill the client lane (and
    its queue); a forward from another primary to this agent is served all the same."""
    limits = ServerLimits(workers=4, client_workers=2, bulk_workers=1)
    hole = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never answers
    hole_address = f"127.0.0.1:{hole.getsockname()[1]}"
    a = cluster.start("a", limits=limits, forward_timeout=30.0)
    b = cluster.start("b")
    a.store.mark_promoted()
    a.table.set_route(SHARD, ShardRoute(ShardState.PRIMARY, 1, a.address, (hole_address,)))
    b.stores.open(SHARD2).mark_promoted()
    a.stores.open(SHARD2)
    b.table.set_route(SHARD2, ShardRoute(ShardState.PRIMARY, 1, b.address, (a.address,)))
    a.table.set_route(SHARD2, ShardRoute(ShardState.REPLICA, 1, b.address))
    results: list[object] = []

    def client_write(i: int) -> None:
        try:
            results.append(PeerClient(TOKEN, timeout=60, attempts=1).put(
                a.address, SHARD, f"c{i}".encode(), b"v"))
        except PeerError as exc:
            results.append(exc)

    writers = [threading.Thread(target=client_write, args=(i,)) for i in range(6)]
    try:
        for w in writers:
            w.start()
        poll_until(lambda: a.plane.stats()["busy_client"] == 2, 20, "the client lane full")
        lsn = cluster.client.put(b.address, SHARD2, b"forwarded", b"through")
        assert a.stores.open(SHARD2).get(b"forwarded").lsn == lsn
        assert not results and a.plane.stats()["busy_client"] == 2, "the clients still wait"
    finally:
        hole.close()  # the pending forwards get a reset: the client writes fail at once
        for w in writers:
            w.join(60)
    assert len(results) == 6 and all(isinstance(r, PeerError) for r in results)


def test_server_limits_must_leave_a_worker_for_peers():
    with pytest.raises(ValueError, match="leave a worker"):
        ServerLimits(workers=4, client_workers=3, bulk_workers=1)


def test_pipelined_requests_in_one_segment_do_not_recurse(cluster, trio):
    """10,000 requests in one send: the server parses one per turn, not one per stack frame."""
    p, *_ = trio
    get = (f"GET /healthz HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").encode()
    with connect(p.address) as sock:
        sock.sendall(get * 10_000 + b"GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n")
        answers = read_answer(sock)
    assert answers.count(b"HTTP/1.1 200 ") == 10_000 and answers.endswith(
        json.dumps({"error": "no_such_endpoint"}).encode())


def test_client_bodies_in_flight_are_bounded_and_peers_are_not(cluster):
    limits = ServerLimits(max_buffered_bytes=1500)
    p, r1 = cluster.start("p"), cluster.start("r1", limits=limits)
    p.store.mark_promoted()
    r1.store  # noqa: B018 - open the replica's store
    lead(p, 1, in_sync=(r1,))
    follow(r1, p, 1)
    with connect(r1.address) as first, connect(r1.address) as second:
        first.sendall(put_head(1000))  # announced, not sent: counted all the same
        poll_until(lambda: r1.plane.stats()["buffered_bytes"] == 1000, 20, "the first counted")
        second.sendall(put_head(1000))
        answer = read_answer(second)
        assert answer.startswith(b"HTTP/1.1 503 ") and b'"overloaded"' in answer
        # A peer's forward (a body too) is not counted against the clients' bound.
        lsn = cluster.client.put(p.address, SHARD, b"k", b"v")
        assert r1.store.get(b"k").lsn == lsn


def test_a_primary_under_concurrent_writes_stays_within_its_threads(cluster, trio):
    p, *_ = trio
    clients = [PeerClient(TOKEN, timeout=30, attempts=1) for _ in range(40)]

    def write(i: int) -> int:
        return clients[i % 40].put(p.address, SHARD, f"c{i}".encode(), b"v")

    with ThreadPoolExecutor(40) as pool:
        lsns = list(pool.map(write, range(400)))
    assert len(set(lsns)) == 400
    limits = p.plane.limits
    threads = server_threads(p)
    assert len(threads) <= 1 + limits.workers + limits.forward_workers, threads
    # Each write's forwards go out from the worker that holds it (PeerClient.post_many);
    # the pool is only for the follow-ups of a replica that is behind or on an older plan.
    assert not any("-forward" in name for name in threads), "no hand-off to a forward thread"


def test_one_connection_across_lanes_and_split_heads_is_answered_in_order(cluster, trio):
    """A worker keeps serving a connection whose next request comes at once (same lane,
    whole); anything else (another lane, a refusal, a head in pieces) goes back to the I/O
    thread. Either way every answer comes, in order."""
    p, *_ = trio
    cluster.client.put(p.address, SHARD, b"k", b"v")
    get = f"GET {key_path(SHARD, b'k')} HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    rows = (f"GET /v1/shards/{SHARD}/rows?after=0 HTTP/1.1\r\n"
            f"Authorization: Bearer {PEER_TOKEN}\r\n\r\n")
    steps = [get, get, rows, get, "GET /healthz HTTP/1.1\r\n\r\n", get[:20], get[20:], rows, get]
    statuses = []
    with connect(p.address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        for step in steps:
            sock.sendall(step.encode())
            if step == get[:20]:
                continue  # the rest of this head comes in the next send
            status = int(reader.readline().split()[1])
            length = 0
            while (line := reader.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            reader.read(length)
            statuses.append(status)
    assert statuses == [200] * 8
