"""The data plane's connections: one I/O thread and a fixed pool of workers in lanes.

Thread-per-connection let 200 slow, never-ending bodies hold 200 threads, and read 32 MiB
bodies before anyone looked at the token. Here the thread count is fixed (``ServerLimits``:
one I/O thread plus ``workers``), and a request reaches a worker only once it is whole and
admitted:

1. The I/O thread (epoll, non-blocking sockets) accepts, reads heads, parses them
   (``agents.dataplane.http``) and asks the application to ``admit`` the head: route,
   token, method, parameters. A refusal (401, 403, 404, 405, 400, 413, ...) is answered
   there and then, before a byte of body is read; an announced body is then drained into a
   scratch buffer for at most ``linger`` seconds (so the client sees the answer instead of a
   reset) and the connection closed. The few endpoints that need neither a token nor a
   worker (health, readiness, metrics) are answered there too.
2. An admitted request's body is read by the I/O thread, into a buffer that grows as bytes
   arrive, within ``body_timeout`` plus the size at ``min_body_rate``: a slow client costs a
   socket and what it sent, never a thread. Client bodies announced and not yet answered
   count against ``max_buffered_bytes`` (a 503 beyond); peers' do not.
3. The whole request goes to a worker through its **lane**: ``PEER`` (forwards, repairs:
   what another agent's write waits on), ``CLIENT`` (reads, writes) and ``BULK`` (rows pages
   and snapshots). Clients may occupy at most ``client_workers`` workers and bulk transfers
   at most ``bulk_workers``, and both together fewer than ``workers``: a peer's forward always
   finds a worker, however many clients wait (two agents whose client writes wait on each
   other's forwards cannot deadlock).
4. The worker answers: small answers with one non-blocking send (the rest, if any, goes back
   to the I/O thread to write); snapshots with a blocking ``sendfile`` bounded by
   ``send_timeout``. While another worker is spare it then waits up to ``hot_wait`` (10 ms)
   for the connection's next request and answers it too if it comes whole and for the same
   lane: a client sending request after request (a primary's forwards, a copy's pages, a
   loader) is served by one thread, without two thread hand-offs per request, each a
   wake-up that a busy host schedules late. Otherwise the kept-alive connection goes back
   to the I/O thread, which closes it after ``idle_timeout`` without a request: idle
   connections never hold a worker.

At ``max_connections`` open connections a new one takes the place of the connection idle
longest; if none is idle it gets a 503 ``overloaded`` and is closed.

Ownership: a connection belongs to the I/O thread or to one worker at a time. Its socket is
registered with ``EPOLLONESHOT``, so the kernel reports it only while re-armed, which its
owner does on handing it back; hand-backs, time-outs and closes take ``_lock``, so that a
time-out never closes a socket a worker is about to re-arm.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from agents.dataplane.http import (
    CONTINUE,
    MAX_HEAD_BYTES,
    HttpError,
    RequestHead,
    Response,
    encode_head,
    encode_response,
    find_head_end,
    parse_head,
)
from agents.dataplane.lanes import Lane, Lanes, worker_scratch
from agents.dataplane.transfer import send_file
from shardkeeper.wire import MAX_BODY_BYTES, ErrorCode

log = logging.getLogger(__name__)

_IN = select.EPOLLIN | select.EPOLLONESHOT | select.EPOLLRDHUP
_OUT = select.EPOLLOUT | select.EPOLLONESHOT
_CHUNK = 256 << 10  # per recv of a head or a drain
_OVERFLOW = 64  # refused connections kept lingering (beyond max_connections) at most
_REFUSED_LINGER = 1.0


@dataclass(frozen=True)
class ServerLimits:
    """The thread model and its bounds; with the defaults an agent's data plane runs at most
    37 threads: the I/O thread, 20 workers and up to 16 forwarding threads."""

    workers: int = 20
    client_workers: int = 14  # at most this many workers busy with client requests
    bulk_workers: int = 4  # ... and with rows pages and snapshots
    max_connections: int = 512
    backlog: int = 256
    idle_timeout: float = 30.0  # a kept-alive connection without a request
    head_timeout: float = 10.0  # from a request's first byte to the end of its head
    body_timeout: float = 10.0  # a body gets this long, plus its size at min_body_rate
    min_body_rate: float = float(1 << 20)  # bytes per second
    send_timeout: float = 10.0  # an answer that makes no progress for this long is dropped
    linger: float = 2.0  # draining the body of a refused request, before closing
    # Client bodies announced and not yet answered, in all: 8 bodies of the largest size.
    max_buffered_bytes: int = 8 * MAX_BODY_BYTES
    # Threads for the follow-ups of a primary's forwards (replication.Replicator): pushing
    # a lagging replica what it missed, asking again one on an older plan; beyond it they
    # queue. The forwards themselves go out from the worker that holds the write. 16 keeps
    # an agent of ~600 replicas within issue 14's 64 threads.
    forward_workers: int = 16
    # After an answer, a worker waits this long for the connection's next request (while
    # another worker is spare) before handing the connection back to the I/O thread.
    hot_wait: float = 0.01

    def __post_init__(self) -> None:
        if self.client_workers < 1 or self.bulk_workers < 1:
            raise ValueError("client_workers and bulk_workers must be positive")
        if self.client_workers + self.bulk_workers >= self.workers:
            raise ValueError("client_workers + bulk_workers must leave a worker for peers")
        if self.max_connections < 1 or self.backlog < 1:
            raise ValueError("max_connections and backlog must be positive")


@dataclass(frozen=True)
class Admission:
    """What the application makes of a head: ``response`` at once (a refusal, or an answer
    that needs no worker), or a worker in ``lane`` calls ``handle`` with ``call``."""

    route: str
    lane: Lane | None = None
    response: Response | None = None
    call: Any = None


class App(Protocol):
    def admit(self, head: RequestHead) -> Admission: ...

    def handle(self, head: RequestHead, call: Any, body: bytes | bytearray) -> Response: ...

    def observe(self, route: str, status: int, seconds: float) -> None: ...


class _State(enum.Enum):
    HEAD = "head"  # waiting for (the rest of) a head; idle if nothing is buffered
    BODY = "body"
    BUSY = "busy"  # a worker has it
    WRITE = "write"  # the I/O thread is sending the rest of an answer
    DRAIN = "drain"  # answered and refused: discarding the body before closing
    CLOSED = "closed"


class _After(enum.Enum):
    KEEP = "keep"
    CLOSE = "close"
    DRAIN = "drain"


class _Conn:
    __slots__ = ("sock", "fd", "state", "deadline", "buf", "body", "want", "head", "admission",
                 "started", "out", "after", "drain_left", "overflow", "worker", "reserved")

    def __init__(self, sock: socket.socket, deadline: float, overflow: bool = False):
        self.sock = sock
        self.fd = sock.fileno()
        self.state = _State.HEAD
        self.deadline = deadline
        self.buf = bytearray()
        self.body: bytearray | None = None
        self.want = 0  # the body's announced length
        self.reserved = 0  # bytes counted against max_buffered_bytes
        self.head: RequestHead | None = None
        self.admission: Admission | None = None
        self.started = 0.0
        self.out: memoryview | None = None
        self.after = _After.KEEP
        self.drain_left = 0
        self.overflow = overflow  # accepted over the cap, only to be told so
        self.worker = False  # owned by a worker (not armed)

    @property
    def idle(self) -> bool:
        return self.state is _State.HEAD and not self.buf and not self.worker


class HttpServer:
    """Serves ``app`` on ``address``; binds at construction, serves from ``start()``."""

    def __init__(self, address: tuple[str, int], app: App, limits: ServerLimits | None = None,
                 name: str = "dataplane"):
        self.app = app
        self.limits = limits or ServerLimits()
        self._listener = socket.create_server(address, backlog=self.limits.backlog)
        self._listener.setblocking(False)
        self._address: tuple[str, int] = self._listener.getsockname()[:2]  # kept after stop
        self.name = f"{name}:{self._address[1]}"  # thread names: several agents per process
        self._ep = select.epoll()
        self._ep.register(self._listener.fileno(), select.EPOLLIN)
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake, select.EPOLLIN)
        self._handback: deque[_Conn] = deque()  # from workers: buffered bytes to parse
        self._conns: dict[int, _Conn] = {}
        self._overflow = 0
        self._buffered = 0  # client body bytes reserved (max_buffered_bytes)
        self._lock = threading.Lock()
        self._stopping = False
        self._scratch = bytearray(_CHUNK)
        caps = {Lane.PEER: self.limits.workers, Lane.CLIENT: self.limits.client_workers,
                Lane.BULK: self.limits.bulk_workers}
        self._lanes = Lanes(self.limits.workers, caps, self._work, self.name)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    def start(self) -> None:
        self._lanes.start()
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-io", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the listener and every connection, a worker's too: peers see us go at once.
        Idempotent."""
        if self._wake < 0:
            return
        self._stopping = True
        self._signal()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
            for conn in conns:
                conn.state = _State.CLOSED
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
                conn.sock.close()
        self._lanes.stop()
        self._listener.close()
        self._ep.close()
        wake, self._wake = self._wake, -1
        os.close(wake)

    def stats(self) -> dict[str, int]:
        """Open connections, client body bytes in flight, busy workers per lane."""
        busy = self._lanes.busy()
        return {"connections": len(self._conns) - self._overflow,
                "buffered_bytes": self._buffered,
                **{f"busy_{lane.name.lower()}": n for lane, n in busy.items()}}

    # -- the I/O thread ------------------------------------------------------------------

    def _loop(self) -> None:
        listen_fd = self._listener.fileno()
        next_sweep = 0.0
        while not self._stopping:
            try:
                events = self._ep.poll(0.25)
            except OSError:
                if self._stopping:
                    return
                raise
            now = time.monotonic()
            for fd, mask in events:
                if fd == listen_fd:
                    self._accept(now)
                elif fd == self._wake:
                    self._woken(now)
                else:
                    conn = self._conns.get(fd)
                    if conn is not None and not conn.worker:
                        try:
                            self._step(conn, mask, now)
                        except Exception:  # a bug: lose the connection, not the server
                            log.exception("data plane connection failed")
                            self._close(conn)
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + 0.25

    def _signal(self) -> None:
        if self._wake >= 0:  # not after stop: the descriptor number may be another file's
            with contextlib.suppress(OSError):
                os.eventfd_write(self._wake, 1)

    def _woken(self, now: float) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        # Only those queued now: a client pipelining many requests gets one parsed per turn.
        for _ in range(len(self._handback)):
            conn = self._handback.popleft()
            if conn.state is _State.HEAD and self._conns.get(conn.fd) is conn:
                self._parse(conn, now)
        if self._handback:
            self._signal()

    def _accept(self, now: float) -> None:
        for _ in range(64):  # then let the other sockets have a turn
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: keep serving the open ones
                log.warning("accept failed: %r", exc)
                return
            sock.setblocking(False)
            # A snapshot's head and body go out in separate sends; Nagle would hold the
            # second for the client's delayed ACK (~40 ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            full = len(self._conns) - self._overflow >= self.limits.max_connections
            if full and not self._evict_idle():
                self._refuse_overloaded(sock, now)
                continue
            conn = _Conn(sock, now + self.limits.idle_timeout)
            self._conns[conn.fd] = conn
            self._ep.register(conn.fd, _IN)

    def _evict_idle(self) -> bool:
        """Close the connection idle longest to make room; False if none is idle."""
        with self._lock:
            idle = [c for c in self._conns.values() if c.idle and not c.overflow]
            if not idle:
                return False
            self._close_locked(min(idle, key=lambda c: c.deadline))
            return True

    def _refuse_overloaded(self, sock: socket.socket, now: float) -> None:
        response = Response(503, {"error": ErrorCode.OVERLOADED, "detail":
                                  f"{self.limits.max_connections} connections open; retry"})
        self.app.observe("other", 503, 0.0)
        if self._overflow >= _OVERFLOW:
            sock.close()
            return
        conn = _Conn(sock, now + _REFUSED_LINGER, overflow=True)
        self._conns[conn.fd] = conn
        self._overflow += 1
        self._ep.register(conn.fd, _IN)
        self._write(conn, encode_response(response, close=True), _After.DRAIN, now)

    def _step(self, conn: _Conn, mask: int, now: float) -> None:
        if mask & select.EPOLLERR:
            self._close(conn)
        elif conn.state is _State.WRITE:
            self._flush(conn, now)
        elif conn.state is _State.DRAIN:
            self._drain(conn, now)
        elif conn.state is _State.BODY:
            self._read_body(conn, now)
        else:
            self._read_head(conn, now)

    def _recv(self, conn: _Conn, into: memoryview) -> int | None:
        """Bytes read into ``into``; 0 if the peer closed (the connection is then closed),
        None if there were none after all."""
        try:
            n = conn.sock.recv_into(into)
        except (BlockingIOError, InterruptedError):
            self._arm(conn, _IN)
            return None
        except OSError:
            n = 0
        if n == 0:
            self._close(conn)
        return n

    def _read_head(self, conn: _Conn, now: float) -> None:
        n = self._recv(conn, memoryview(self._scratch))
        if not n:
            return
        if not conn.buf:  # the first bytes of a request: it now has head_timeout
            conn.deadline = now + self.limits.head_timeout
        conn.buf += memoryview(self._scratch)[:n]
        self._parse(conn, now)

    def _parse(self, conn: _Conn, now: float) -> None:
        """Act on a head in ``conn.buf`` if it is all there."""
        buf = conn.buf
        while buf[:2] == b"\r\n":  # empty lines before a request line are skipped
            del buf[:2]
        end = find_head_end(buf)
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                error = HttpError(431, ErrorCode.HEAD_TOO_LARGE,
                                  detail=f"head over {MAX_HEAD_BYTES} bytes")
                self._answer(conn, "other", error.response(), _After.CLOSE, now)
            else:
                if not buf:
                    conn.deadline = now + self.limits.idle_timeout
                self._arm(conn, _IN)
            return
        try:
            head = parse_head(bytes(buf[: end - 4]))
        except HttpError as exc:  # framing unknown: answer, then close
            self._answer(conn, "other", exc.response(), _After.CLOSE, now)
            return
        del buf[:end]
        conn.head, conn.started = head, now
        try:
            admission = self.app.admit(head)
        except Exception:  # a bug: never a traceback to the client, never a dead loop
            log.exception("admitting %s %s failed", head.method, head.target)
            admission = Admission("other", response=Response(500, {"error": ErrorCode.INTERNAL}))
        conn.admission = admission
        length = head.content_length
        if admission.response is not None:
            if length and len(buf) < length:
                # Refused before its body: let the client finish sending, unread.
                conn.drain_left = length - len(buf)
                buf.clear()
                self._answer(conn, admission.route, admission.response, _After.DRAIN, now)
            else:
                del buf[:length]
                after = _After.KEEP if head.keep_alive else _After.CLOSE
                self._answer(conn, admission.route, admission.response, after, now,
                             head_only=head.method == "HEAD")
            return
        if length and admission.lane is not Lane.PEER and not self._reserve(conn, length):
            error = HttpError(503, ErrorCode.OVERLOADED,
                              detail="too many request bodies in flight; retry")
            conn.drain_left = max(0, length - len(buf))
            del buf[:length]
            self._answer(conn, admission.route, error.response(), _After.DRAIN, now)
            return
        if len(buf) >= length:
            body = bytes(buf[:length])
            del buf[:length]
            self._dispatch(conn, body)
            return
        # The body grows as it arrives: announcing 32 MiB and sending none costs nothing.
        conn.body, conn.want = bytearray(buf), length
        buf.clear()
        conn.state = _State.BODY
        conn.deadline = now + self.limits.body_timeout + length / self.limits.min_body_rate
        if head.expect_continue and not conn.body:
            with contextlib.suppress(OSError):  # 25 bytes on an idle socket: they fit
                conn.sock.send(CONTINUE)
        self._arm(conn, _IN)

    def _reserve(self, conn: _Conn, length: int) -> bool:
        """Count a client's body against ``max_buffered_bytes`` until it is answered
        (peers' are not: a forward must not fail because clients send big batches)."""
        with self._lock:
            if self._buffered + length > self.limits.max_buffered_bytes:
                return False
            self._buffered += length
            conn.reserved = length
            return True

    def _release_locked(self, conn: _Conn) -> None:
        self._buffered -= conn.reserved
        conn.reserved = 0

    def _read_body(self, conn: _Conn, now: float) -> None:
        assert conn.body is not None
        want = min(conn.want - len(conn.body), _CHUNK)  # not into a pipelined next request
        n = self._recv(conn, memoryview(self._scratch)[:want])
        if not n:
            return
        conn.body += memoryview(self._scratch)[:n]
        if len(conn.body) < conn.want:
            self._arm(conn, _IN)
            return
        body, conn.body = conn.body, None
        self._dispatch(conn, body)

    def _dispatch(self, conn: _Conn, body: bytes | bytearray) -> None:
        assert conn.admission is not None and conn.admission.lane is not None
        conn.state = _State.BUSY
        conn.worker = True
        self._lanes.submit(conn.admission.lane, (conn, body))

    def _answer(self, conn: _Conn, route: str, response: Response, after: _After, now: float,
                head_only: bool = False) -> None:
        """Answer from the I/O thread (never an image)."""
        self.app.observe(route, response.status, now - conn.started if conn.started else 0.0)
        close = after is not _After.KEEP
        self._write(conn, encode_response(response, close=close, head_only=head_only), after,
                    now)

    def _write(self, conn: _Conn, data: bytes, after: _After, now: float) -> None:
        conn.out = memoryview(data)
        conn.after = after
        conn.state = _State.WRITE
        conn.deadline = now + self.limits.send_timeout
        self._flush(conn, now)

    def _flush(self, conn: _Conn, now: float) -> None:
        assert conn.out is not None
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            if sent:
                conn.deadline = now + self.limits.send_timeout
            self._arm(conn, _OUT)
            return
        conn.out = None
        self._next(conn, now)

    def _next(self, conn: _Conn, now: float) -> None:
        """After an answer went out."""
        if conn.after is _After.CLOSE:
            self._close(conn)
        elif conn.after is _After.DRAIN:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)  # the answer is complete: say so
            conn.state = _State.DRAIN
            conn.deadline = min(conn.deadline, now + self.limits.linger)
            if conn.overflow:
                conn.drain_left = MAX_HEAD_BYTES
            self._drain(conn, now)
        else:
            conn.state = _State.HEAD
            conn.deadline = now + self.limits.idle_timeout
            conn.head = conn.admission = None
            conn.started = 0.0
            if conn.buf:  # pipelined: the next turn parses it (no recursion per request)
                self._handback.append(conn)
                self._signal()
            else:
                self._arm(conn, _IN)

    def _drain(self, conn: _Conn, now: float) -> None:
        """Discard what the client still sends of a refused body (into the scratch buffer:
        memory stays flat), then close."""
        while conn.drain_left > 0:
            view = memoryview(self._scratch)[: min(conn.drain_left, _CHUNK)]
            n = self._recv(conn, view)
            if n is None or n == 0:
                return  # re-armed, or closed
            conn.drain_left -= n
        self._close(conn)

    def _sweep(self, now: float) -> None:
        """Time-outs: idle keep-alive connections close quietly, slow heads and bodies get a
        408, writes and drains that stalled are closed."""
        with self._lock:
            expired = [c for c in self._conns.values()
                       if not c.worker and c.state is not _State.CLOSED and c.deadline <= now]
        for conn in expired:
            if conn.state in (_State.HEAD, _State.BODY) and (conn.buf or conn.body is not None):
                route = conn.admission.route if conn.admission is not None else "other"
                conn.body = None
                conn.buf.clear()
                error = HttpError(408, ErrorCode.TIMEOUT, detail="request not received in time")
                self._answer(conn, route, error.response(), _After.CLOSE, now)
            else:
                self._close(conn)

    def _arm(self, conn: _Conn, mask: int) -> None:
        try:
            self._ep.modify(conn.fd, mask)
        except (OSError, ValueError):  # closed meanwhile (stop)
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        with self._lock:
            self._close_locked(conn)

    def _close_locked(self, conn: _Conn) -> None:
        if conn.state is _State.CLOSED:
            return
        conn.state = _State.CLOSED
        self._release_locked(conn)
        if self._conns.get(conn.fd) is conn:
            del self._conns[conn.fd]
            if conn.overflow:
                self._overflow -= 1
        conn.sock.close()  # also takes it out of the epoll set

    # -- workers -------------------------------------------------------------------------

    def _work(self, job: tuple[_Conn, bytes | bytearray]) -> None:
        conn, body = job
        assert conn.admission is not None and conn.admission.lane is not None
        lane = conn.admission.lane
        scratch = worker_scratch()
        while True:
            data, close = self._respond(conn, body)
            # Decide before sending whether to wait for the next request: once the answer is
            # out, its client runs, and Python work here would only contend with it for the
            # GIL (each contended switch is a futex round trip).
            poller = None
            if not close and not conn.buf and self.limits.hot_wait > 0 and self._lanes.spare():
                poller = select.poll()
                poller.register(conn.fd, select.POLLIN)
            try:
                sent = conn.sock.send(data) if data else 0
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent, close = len(data), True
            rest = data[sent:]
            if rest or poller is None:
                break
            next_body = self._next_request(conn, lane, poller, scratch)
            if next_body is None:
                break
            body = next_body
        self._hand_back(conn, rest, close)

    def _next_request(self, conn: _Conn, lane: Lane, poller: select.poll,
                      scratch: bytearray) -> bytes | None:
        """The body of this connection's next request if it comes within ``hot_wait``, whole
        and for the same lane: then this worker answers it too, and a client that sends
        request after request is served by one thread, as with a thread per connection
        (each hand-off between threads costs a wake-up, a scheduling delay on a busy host).
        Anything else goes back to the I/O thread with whatever arrived. Only while a worker
        is spare, so that no queued request waits for this one."""
        try:
            if not poller.poll(self.limits.hot_wait * 1000):
                return None
            n = conn.sock.recv_into(scratch)
        except OSError:  # BlockingIOError included: the I/O thread looks again
            return None
        if not n:
            return None  # the peer closed; the I/O thread sees it too and closes
        conn.buf += memoryview(scratch)[:n]
        end = find_head_end(conn.buf)
        if end < 0:
            return None
        try:
            head = parse_head(bytes(conn.buf[: end - 4]))
            admission = self.app.admit(head)
        except Exception:  # refusals and errors are the I/O thread's to answer
            return None
        length = head.content_length
        if admission.response is not None or admission.lane is not lane or (
            len(conn.buf) - end < length
        ):
            return None
        if length and lane is not Lane.PEER and not self._reserve(conn, length):
            return None
        body = bytes(conn.buf[end : end + length])
        del conn.buf[: end + length]
        conn.head, conn.admission, conn.started = head, admission, time.monotonic()
        return body

    def _respond(self, conn: _Conn, body: bytes | bytearray) -> tuple[bytes, bool]:
        """Answer the request ``conn`` holds: the bytes to send (none if a snapshot went out
        already), and whether to close after them."""
        head, admission = conn.head, conn.admission
        assert head is not None and admission is not None
        try:
            response = self.app.handle(head, admission.call, body)
        except Exception:  # a bug or a disk error: the client gets a 500, the log the trace
            log.exception("data plane failed on %s %s", head.method, head.target)
            response = Response(500, {"error": ErrorCode.INTERNAL})
        close = not head.keep_alive
        data = b""
        if response.image is not None:
            close = not self._send_image(conn, response) or close
        else:
            data = encode_response(response, close=close, head_only=head.method == "HEAD")
        # Counted as answered when handed to the kernel (a snapshot: when it was sent).
        self.app.observe(admission.route, response.status, time.monotonic() - conn.started)
        if conn.reserved:  # answered: its body no longer counts
            with self._lock:
                self._release_locked(conn)
        return data, close

    def _send_image(self, conn: _Conn, response: Response) -> bool:
        """Send a store file with sendfile (the bytes stay in the kernel); False if the
        copier went away or stalled for ``send_timeout``."""
        image = response.image
        assert image is not None
        headers = {"Content-Type": response.content_type, "Content-Length": str(image.size)}
        try:
            conn.sock.settimeout(self.limits.send_timeout)
            conn.sock.sendall(encode_head(response.status, headers, close=False))
            with image.path.open("rb") as f:
                send_file(conn.sock, f.fileno(), image.size, self.limits.send_timeout)
            return True
        except OSError as exc:
            log.info("snapshot %s not sent: %r", image.path.name, exc)
            return False
        finally:
            image.close()
            with contextlib.suppress(OSError):
                conn.sock.setblocking(False)

    def _hand_back(self, conn: _Conn, rest: bytes, close: bool) -> None:
        """A worker is done with ``conn``: the I/O thread writes ``rest``, then keeps the
        connection for the next request or closes it."""
        now = time.monotonic()
        with self._lock:
            if conn.state is _State.CLOSED:  # stopped meanwhile
                return
            conn.worker = False
            self._release_locked(conn)
            if close and not rest:
                self._close_locked(conn)
                return
            if rest:
                conn.out, conn.state = memoryview(rest), _State.WRITE
                conn.after = _After.CLOSE if close else _After.KEEP
                conn.deadline = now + self.limits.send_timeout
                mask = _OUT
            else:
                conn.state = _State.HEAD
                # Part of the next request already here: it is under way, not idle.
                wait = self.limits.head_timeout if conn.buf else self.limits.idle_timeout
                conn.deadline = now + wait
                conn.head = conn.admission = None
                conn.started = 0.0
                if conn.buf:  # the next request is already here: the I/O thread parses it
                    self._handback.append(conn)
                    self._signal()
                    return
                mask = _IN
            try:
                self._ep.modify(conn.fd, mask)
            except (OSError, ValueError):  # stopped meanwhile
                self._close_locked(conn)
