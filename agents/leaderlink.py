"""The agent's end of crash detection: one TCP connection held open to the leader.

The leader advertises where to connect in the epoch znode (``LeaderInfo.liveness``); the
agent connects, says who it is (one hello line, ``shardkeeper/liveness.py``) and then
only holds the socket. If this process dies, its kernel closes the socket and the
leader learns it at once. Nothing here is needed for correctness: without a link the
session timeout still bounds failover.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading

from shardkeeper.liveness import hello

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0


class LeaderLink:
    def __init__(self, agent: str, started: float, token: str):
        self.agent = agent
        self.started = started
        self.token = token
        self._address: str | None = None
        self._changed = threading.Event()
        self._stop = threading.Event()
        self.connected_to: str | None = None
        self._logged: str | None = None  # the last leader address a link was logged to
        self.thread = threading.Thread(target=self._run, name="leader-link", daemon=True)

    def start(self) -> LeaderLink:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()

    def follow(self, address: str | None) -> None:
        """The leader's liveness address changed (a new leader, or none)."""
        if address != self._address:
            self._address = address
            self._changed.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._changed.clear()
            address = self._address
            if not address:
                self._changed.wait()
                continue
            try:
                self._hold(address)
            except OSError as e:
                log.debug("leader link to %s: %s", address, e)
            self.connected_to = None
            # Reconnect after a pause, or at once when the leader changes.
            self._changed.wait(RETRY_SECONDS)

    def _hold(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0) as sock:
            sock.sendall(hello(self.agent, self.started, self.token))
            self.connected_to = address
            if address != self._logged:  # once per leader, not per reconnection
                log.info("leader link to %s connected", address)
                self._logged = address
            sock.settimeout(0.5)
            while not self._changed.is_set():
                try:
                    if not sock.recv(64):
                        return  # the leader closed it (its term ended)
                except TimeoutError:
                    continue
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
