"""Issue 12 through the agent runtime: real agent processes on a ZooKeeper server of their
own (the test pauses it), scraped over HTTP without a token."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

from agents.dataplane.repair import PROBE_ROWS
from agents.runtime import Agent, HealthServer
from shardkeeper.client import DataClient
from shardkeeper.cluster import read_members
from shardkeeper.dev.zkserver import standalone
from shardkeeper.poll import poll_until
from shardkeeper.token import NoToken
from tests.dataplane_support import raw
from tests.harness import Cluster
from tests.test_dataplane_metrics import scrape


def address_of(cluster: Cluster, name: str) -> str:
    """The data-plane address the agent registered (it may have bound port 0)."""
    poll_until(lambda: name in cluster.members(), 30, f"{name} registered")
    return read_members(cluster.client, cluster.paths)[name].address


def gauge(address: str, name: str, **labels: str) -> float | None:
    try:
        _, samples = scrape(address)
    except OSError:
        return None
    return samples.get((name, tuple(sorted(labels.items()))))


def held(address: str) -> float:
    return sum(gauge(address, "shardkeeper_replicas", state=s) or 0 for s in ("PRIMARY", "REPLICA"))


def test_the_runtime_feeds_readiness_replicas_zookeeper_and_bootstrap_bytes(tmp_path: Path):
    server = standalone(tmp_path / "zk", tick_ms=250)
    server.start()
    cluster = Cluster(server.address, tmp_path)
    try:
        server.wait_ready()
        cluster.init(4, 2)
        cluster.start_agent("agent-1", session_timeout=1.0)
        first = address_of(cluster, "agent-1")
        # Up, registered and connected, but no leader has written it a plan: not ready.
        poll_until(lambda: gauge(first, "shardkeeper_zk_connected") == 1, 30,
                   "agent-1 connected")
        assert raw(first, "GET", "/healthz", token=None)[0] == 200
        status, body, _ = raw(first, "GET", "/readyz", token=None)
        assert (status, body["reason"]) == (503, "no plan read in this ZooKeeper session yet")
        cluster.start_coordinator("coord-1", session_timeout=1.0)
        poll_until(lambda: raw(first, "GET", "/readyz", token=None)[0] == 200, 30,
                   "agent-1 ready")
        # More rows per shard than a copy's first page: agent-2 copies the store files (a
        # shard of one small page is copied by that page, tested elsewhere).
        kv = DataClient(cluster.client, cluster.paths, deadline=20.0)
        items = [(f"k{i:04d}".encode(), b"v") for i in range(4 * 4 * PROBE_ROWS)]
        for shard, some in kv.by_shard(items).items():
            assert len(some) > PROBE_ROWS
            kv.put_batch(shard, some)
        cluster.start_agent("agent-2", session_timeout=1.0)
        second = address_of(cluster, "agent-2")
        poll_until(lambda: cluster.settled({"agent-1", "agent-2"}), 30, "both hold all shards")
        poll_until(lambda: held(first) == held(second) == 4, 30,
                   "each agent reports four replicas, primary or replica")
        # Each agent's gauge follows the plan it applied: scraped one after the other while
        # a primary moves for balance, both may count it for a moment; then they agree.
        poll_until(lambda: sum(gauge(a, "shardkeeper_replicas", state="PRIMARY")
                               for a in (first, second)) == 4, 30,
                   "the two agents' gauges count each shard's primary once")
        copied = gauge(second, "shardkeeper_bootstrap_bytes_total", kind="snapshot")
        assert copied and copied > 0, "agent-2 copied its shards' files from agent-1"
        # ZooKeeper stops answering: the agents say so at once, and recover with it.
        server.send(signal.SIGSTOP)
        try:
            poll_until(lambda: gauge(first, "shardkeeper_zk_connected") == 0, 30,
                       "agent-1 reports the connection down")
            assert raw(first, "GET", "/healthz", token=None)[0] == 200, "alive meanwhile"
        finally:
            server.send(signal.SIGCONT)
        poll_until(lambda: gauge(first, "shardkeeper_zk_connected") == 1
                   and raw(first, "GET", "/readyz", token=None)[0] == 200, 60,
                   "agent-1 connected and ready again")
    finally:
        cluster.close()
        server.stop()


def test_an_agent_waiting_for_its_tokens_is_alive_and_connected_but_not_ready(cluster, tmp_path):
    agent = Agent(cluster.target, cluster.name, "agent-x", address="127.0.0.1:1",
                  data_dir=tmp_path / "agent-x", session_timeout=1.0)
    server = HealthServer(agent, "127.0.0.1", 0)  # no `init`: no tokens, no plan
    server.start()

    def run() -> None:
        with contextlib.suppress(NoToken):  # what run() says when stopped while waiting
            agent.run()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        address = server.plane.address
        poll_until(lambda: gauge(address, "shardkeeper_zk_connected") == 1, 30,
                   "the waiting agent reports its ZooKeeper connection")
        assert raw(address, "GET", "/healthz", token=None)[0] == 200
        status, body, _ = raw(address, "GET", "/readyz", token=None)
        assert (status, body["reason"]) == (503, "no plan read in this ZooKeeper session yet")
    finally:
        agent.stop()
        thread.join(10)
        server.stop()
    assert not thread.is_alive()
