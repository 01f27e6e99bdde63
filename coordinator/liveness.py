"""Seeing a crashed agent process at once, instead of after its session timeout.

A killed process is not a silent host: its kernel closes its sockets at once. Each agent
holds one TCP connection to the leader (``agents/leaderlink.py``; the leader advertises
the address in the epoch znode). When such a connection closes, the leader probes the
agent's data-plane port: a refused connection means no process listens there any more,
so the agent is dead and its primaries fail over now. Anything else (a connection that
succeeds, or one that hangs, as with a SIGSTOPped process or a network partition, where
no socket is closed) proves nothing, and the session timeout decides as before.

A false suspicion cannot lose an acknowledged write: the leader only plans as if the agent
had left; terms fence its primaries (their replicas take forwards only at the new
primary's term), and its data stays on disk (dropped replicas go to the trash).

The leader identifies an agent's process by its member znode's ``started`` stamp: a dead
mark holds for that incarnation only, so the agent started again is live again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable

from shardkeeper.liveness import MAX_HELLO, HelloRefused, check_hello

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 0.5  # a port that neither accepts nor refuses by then proves nothing
REFUSAL_LOG_SECONDS = 60.0  # a refused link is logged at most this often per agent
# A dying process's kernel closes its sockets one by one: the link may close while the
# data-plane port still accepts. Probe again this often, this many times, before taking
# the closed link for a live agent's (a live agent's port keeps accepting throughout).
PROBE_INTERVAL, PROBE_TRIES = 0.2, 5


def refused(address: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """True only if ``address`` actively refuses a connection (no process listens)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return False
    except ConnectionRefusedError:
        return True
    except OSError as e:
        return e.errno == errno.ECONNREFUSED
    except ValueError:
        return False


class LivenessServer:
    """The leader's end: accepts agents' connections and reports processes that died.

    ``tokens`` are the peer tokens a hello may carry (the leader replaces them on a
    rotation step; empty while there are none yet: a leader elected before
    `shardkeeper init` serves links from the moment it exists, and agents that knew the
    token early are refused until then and retry);
    ``address_of(agent)`` gives an agent's data-plane address (from its member znode);
    ``on_dead(agent, started)`` is called (from this server's thread) when a probe finds
    the agent's port refused after its connection closed.
    """

    def __init__(self, host: str, port: int, tokens: tuple[str, ...],
                 address_of: Callable[[str], str | None],
                 on_dead: Callable[[str, float], None]):
        self.tokens = tokens  # the peer tokens accepted; the leader follows rotations
        self.address_of = address_of
        self.on_dead = on_dead
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.sock.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.sock, selectors.EVENT_READ, None)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="liveness", daemon=True)
        self._buffers: dict[socket.socket, bytes] = {}
        self._agents: dict[socket.socket, tuple[str, float]] = {}
        self._refusals_logged: dict[str, float] = {}  # who -> when last logged

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    def start(self) -> LivenessServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        for key in list(self.selector.get_map().values()):
            with contextlib.suppress(OSError):
                key.fileobj.close()
        self.selector.close()

    def connected(self) -> set[str]:
        return {agent for agent, _ in list(self._agents.values())}

    def _run(self) -> None:
        while not self.stopped.is_set():
            for key, _ in self.selector.select(timeout=0.2):
                if key.fileobj is self.sock:
                    self._accept()
                else:
                    self._read(key.fileobj)

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        conn.setblocking(False)
        self._buffers[conn] = b""
        self.selector.register(conn, selectors.EVENT_READ, None)

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(MAX_HELLO)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data and conn in self._buffers:
            buffered = self._buffers[conn] + data
            if b"\n" in buffered:
                del self._buffers[conn]
                try:
                    self._agents[conn] = check_hello(buffered.split(b"\n", 1)[0], self.tokens)
                except HelloRefused as refusal:
                    self._refused(conn, refusal)
                    self._close(conn)
            elif len(buffered) > MAX_HELLO:
                self._close(conn)
            else:
                self._buffers[conn] = buffered
            return
        if data:
            return  # an agent sends nothing after its hello; ignore stray bytes
        who = self._agents.pop(conn, None)
        self._close(conn)
        if who is not None:
            # Probing may take PROBE_TIMEOUT: not on this thread, which serves them all.
            threading.Thread(target=self._probe, args=who, daemon=True).start()

    def _refused(self, conn: socket.socket, refusal: HelloRefused) -> None:
        """Say so, at most once per REFUSAL_LOG_SECONDS per agent (or peer host): an agent
        retries every second, and one refused for good (a peer token the leader does not
        accept: a host left out of a rotation) is only seen dead at its session's expiry."""
        try:
            host = conn.getpeername()[0]
        except OSError:
            host = "?"
        who = refusal.agent or host
        now = time.monotonic()
        if now - self._refusals_logged.get(who, -REFUSAL_LOG_SECONDS) < REFUSAL_LOG_SECONDS:
            return
        if len(self._refusals_logged) >= 4096:  # bounded, whatever connects
            self._refusals_logged.clear()
        self._refusals_logged[who] = now
        log.warning("liveness: refused a link from %s (%s): %s; its crash will be seen only"
                    " when its session expires", host,
                    f"agent {refusal.agent}" if refusal.agent else "no agent named",
                    refusal.reason)

    def _probe(self, agent: str, started: float) -> None:
        address = self.address_of(agent)
        if address is None:
            return
        for attempt in range(PROBE_TRIES):
            if attempt:
                if self.stopped.wait(PROBE_INTERVAL):
                    return
                if (agent, started) in list(self._agents.values()):
                    return  # it linked again: alive
            if refused(address):
                log.warning("%s: its connection closed and %s refuses connections: the"
                            " process is gone", agent, address)
                self.on_dead(agent, started)
                return
        log.info("%s: its connection closed but %s still accepts: taken for alive (its"
                 " session decides)", agent, address)

    def _close(self, conn: socket.socket) -> None:
        self._buffers.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        with contextlib.suppress(OSError):
            conn.close()
