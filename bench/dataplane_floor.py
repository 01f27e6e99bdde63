"""The floor of one client's R=3 / R=1 put ratio on this machine: ``bench.dataplane``'s
``floor_*`` figures.

What an acknowledged put must do, and nothing else: the client sends one key and value
and waits; the primary commits it to SQLite (the store's pragmas: WAL,
``synchronous=NORMAL``; the row and the sync marker in one transaction, as
``ShardStore.apply_forward`` and ``apply_on_top`` do), sends it to each replica before it
reads any answer (as ``PeerClient.post_many`` does), each replica commits it the same way
and answers, and the primary answers the client. Every node is a process of its own with
one thread and blocking sockets, the messages are a 4-byte length and the bytes: no HTTP,
no JSON, no token, no checks, no metrics. What the data plane adds to this is its cost;
the ratio this gets is what the data plane's ``put_ratio_procs`` would reach if that cost
were nothing on every hop alike.

``--overlap`` orders the primary's work as the data plane refuses to (its forwards out
first, then its own commit, then the answers): what that shortcut would buy at most.

``python -m bench.dataplane_floor DB [--overlap]``: a node. It prints its port, reads one
line from stdin (a JSON list of its replicas' ports, ``[]`` for a replica or an R=1
primary), connects to them, prints ``ready``, serves one upstream connection until it
closes, and exits. Every socket has a time-out, so a node whose bench died exits too.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

_LEN = struct.Struct(">I")
_KEY = 16  # bytes of a message that are its key; the rest is the value
TIMEOUT = 30.0  # seconds any socket waits: a node whose bench went away stops


def _open(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS rows (key BLOB PRIMARY KEY, value BLOB, lsn INTEGER)")
    db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER)")
    return db


def _commit(db: sqlite3.Connection, message: bytes, lsn: int) -> None:
    db.execute("BEGIN")
    db.execute("INSERT OR REPLACE INTO rows VALUES (?, ?, ?)",
               (message[:_KEY], message[_KEY:], lsn))
    db.execute("INSERT OR REPLACE INTO meta VALUES ('sync_lsn', ?)", (lsn,))
    db.execute("COMMIT")


def _exactly(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None if the peer closed first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def receive(sock: socket.socket) -> bytes | None:
    """One message, or None at the end of the stream."""
    head = _exactly(sock, _LEN.size)
    return None if head is None else _exactly(sock, _LEN.unpack(head)[0])


def send(sock: socket.socket, message: bytes) -> None:
    sock.sendall(_LEN.pack(len(message)) + message)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def serve(path: str, overlap: bool) -> None:
    db = _open(path)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    print(listener.getsockname()[1], flush=True)
    replicas = [connect(port) for port in json.loads(sys.stdin.readline())]
    print("ready", flush=True)
    upstream, _ = listener.accept()
    upstream.settimeout(TIMEOUT)
    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lsn = 0
    while (message := receive(upstream)) is not None:
        lsn += 1
        if overlap and replicas:
            for replica in replicas:
                send(replica, message)
            _commit(db, message, lsn)
        else:
            _commit(db, message, lsn)
            for replica in replicas:
                send(replica, message)
        for replica in replicas:
            if receive(replica) is None:
                raise SystemExit("a replica went away")
        send(upstream, b"ok")


class FloorNode:
    """A floor node in a process of its own."""

    def __init__(self, path: Path, overlap: bool = False):
        args = [sys.executable, "-m", "bench.dataplane_floor", str(path)]
        self.proc = subprocess.Popen(args + (["--overlap"] if overlap else []),
                                     cwd=Path(__file__).resolve().parents[1],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"floor node did not start (exit {self.proc.wait(10)})")
        self.port = int(line)

    def lead(self, replicas: list[FloorNode]) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([r.port for r in replicas]) + "\n")
        self.proc.stdin.flush()
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("floor node did not connect to its replicas")

    def close(self) -> None:
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def floor_rate(root: Path, name: str, replicas: int, overlap: bool,
               rate: Callable[[Callable[[int], int]], float]) -> float:
    """Puts per second of one client against a floor primary with ``replicas - 1``
    replicas; ``rate(op)`` runs the puts for the bench's time."""
    nodes = [FloorNode(root / f"{name}-r{i}.sqlite3") for i in range(replicas - 1)]
    client = None
    try:
        for node in nodes:
            node.lead([])
        primary = FloorNode(root / f"{name}-p.sqlite3", overlap)
        primary.lead(nodes)
        nodes.append(primary)
        client = connect(primary.port)
        value = b"x" * 100

        def put(i: int) -> int:
            send(client, b"k%015d" % i + value)
            if receive(client) != b"ok":
                raise RuntimeError("the floor primary went away")
            return 1

        return rate(put)
    finally:
        if client is not None:
            client.close()  # the primary's end of stream, then its replicas'
        for node in reversed(nodes):
            node.close()


if __name__ == "__main__":
    serve(sys.argv[1], "--overlap" in sys.argv[2:])
