"""The leader's liveness server on real sockets: a closed link is a death only once the
agent's data-plane port refuses connections, which a dying process's kernel may do a
moment after it closed the link."""

from __future__ import annotations

import logging
import socket
import threading

import pytest

from coordinator import liveness
from coordinator.liveness import LivenessServer
from shardkeeper.liveness import hello
from shardkeeper.poll import poll_until

TOKEN = "peer-token"


class Agent:
    """An agent's two sockets: its data-plane listener and its link to the leader."""

    def __init__(self, server: LivenessServer):
        self.plane = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.plane.getsockname()[1]}"
        host, _, port = server.address.rpartition(":")
        self.link = socket.create_connection((host, int(port)))
        self.link.sendall(hello("a1", 12.5, TOKEN))


@pytest.fixture
def linked():
    """A leader's liveness server, the agent linked to it, and the deaths reported."""
    addresses: dict[str, str] = {}
    dead: list[tuple[str, float]] = []
    server = LivenessServer("127.0.0.1", 0, (TOKEN,), addresses.get,
                            lambda agent, started: dead.append((agent, started))).start()
    try:
        agent = Agent(server)
        addresses["a1"] = agent.address
        poll_until(lambda: server.connected() == {"a1"}, 10, "the hello taken")
        yield server, agent, dead
    finally:
        server.stop()


def test_a_port_that_closes_just_after_the_link_is_a_death(linked) -> None:
    _, agent, dead = linked
    agent.link.close()
    # The kernel of a dying process got to the listener a little later.
    threading.Timer(2 * liveness.PROBE_INTERVAL, agent.plane.close).start()
    poll_until(lambda: dead == [("a1", 12.5)], 10, "the death seen")


def test_a_closed_link_whose_port_keeps_accepting_is_no_death(linked, caplog) -> None:
    caplog.set_level(logging.INFO, logger="coordinator.liveness")
    server, agent, dead = linked
    agent.link.close()
    poll_until(lambda: not server.connected(), 10, "the closed link noticed")
    # Every probe finds the port accepting (a live agent whose link broke).
    poll_until(lambda: "still accepts" in caplog.text, 10, "the probes given up")
    assert dead == []
    agent.plane.close()


def test_a_refused_link_is_logged_once_naming_the_agent_never_the_token(linked, caplog) -> None:
    """A host left out of a peer-token rotation keeps reconnecting with a token the leader
    does not accept: one warning per agent per REFUSAL_LOG_SECONDS, not one per attempt."""
    caplog.set_level(logging.WARNING, logger="coordinator.liveness")
    server, _, _ = linked
    host, _, port = server.address.rpartition(":")
    for _ in range(3):
        with socket.create_connection((host, int(port))) as link:
            link.sendall(hello("a2", 1.0, "stale-token"))
            link.settimeout(10)
            assert link.recv(16) == b"", "the leader closes a refused link"
    with socket.create_connection((host, int(port))) as link:
        link.sendall(b"GET / HTTP/1.1\r\n\r\n")
        link.settimeout(10)
        assert link.recv(16) == b""
    refusals = [r.getMessage() for r in caplog.records if "refused a link" in r.getMessage()]
    assert len(refusals) == 2, refusals
    assert "agent a2" in refusals[0] and "peer token is not one this leader accepts" in (
        refusals[0])
    assert "no agent named" in refusals[1] and "not a liveness hello" in refusals[1]
    assert all("stale-token" not in r for r in refusals)
    assert server.connected() == {"a1"}
