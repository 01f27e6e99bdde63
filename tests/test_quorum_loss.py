"""Quorum loss (issue 13), on a real 3-server ensemble and real processes: with two of the
three ZooKeeper servers gone for longer than the agents' session timeout, agents keep
serving reads from their last plan and refuse writes; a client's write fails within its
deadline instead of waiting for ZooKeeper; when the quorum returns, nobody has left and
nothing is copied (a session flap is not a departure)."""

from __future__ import annotations

import re
import time

import pytest

from shardkeeper import admin
from shardkeeper.client import DataClient, Unavailable
from shardkeeper.poll import poll_until
from shardkeeper.zk import close, connect
from tests.harness import Cluster

AGENTS = {"agent-1", "agent-2", "agent-3"}
SESSION = 2.0  # agents and coordinators
OUTAGE = 3 * SESSION  # no quorum for this long
DEADLINE = 2.0  # the client's retry budget per operation


def copies_started(events: list) -> int:
    found = (re.search(r"(\d+) copies started", e.message) for e in events if e.kind == "plan")
    return sum(int(m.group(1)) for m in found if m)


def test_quorum_loss_keeps_reads_bounds_writes_and_moves_nothing(
    ensemble_cluster: Cluster, zk_ensemble
) -> None:
    c = ensemble_cluster
    c.init(8, 3)
    for name in ("coord-1", "coord-2"):
        c.start_coordinator(name, session_timeout=SESSION)
    for name in sorted(AGENTS):
        c.start_agent(name, session_timeout=SESSION)
    poll_until(lambda: c.settled(AGENTS), 60, "the cluster to settle")
    zk = connect(c.target, session_timeout=10.0)
    try:
        kv = DataClient(zk, c.paths, deadline=DEADLINE)
        keys = [f"key-{i}".encode() for i in range(24)]
        for key in keys:
            kv.put(key, key)
        before = c.plan()
        seen = {name for name, _ in admin.events(c.client, c.paths)}

        for server in zk_ensemble[1:]:
            server.process.kill()
            server.process.wait()
        poll_until(lambda: not zk.connected, 10, "the client to lose ZooKeeper")
        kv.invalidate()  # a table marked stale must not wait for ZooKeeper
        lost = time.monotonic()
        reads = 0
        while time.monotonic() - lost < OUTAGE:
            for key in keys:
                assert kv.get(key) == key
                reads += 1
            began = time.monotonic()
            with pytest.raises(Unavailable):
                kv.put(b"during", b"refused")  # 503 not_writable until the deadline
            # The deadline, plus one request's time-out and one backoff at most.
            assert time.monotonic() - began < DEADLINE + 2 * 2.0 + 1.0
        assert reads >= len(keys)

        for server in zk_ensemble[1:]:
            server.start()
        for server in zk_ensemble[1:]:
            server.wait_ready()
        poll_until(lambda: _put(kv, b"after", b"1"), 60, "writes once the quorum is back")
        poll_until(lambda: c.settled(AGENTS), 60, "the cluster to settle again")
        assert all(kv.get(key) == key for key in keys)
    finally:
        close(zk)
    after = c.plan()
    assert after.routing == before.routing, "no replica moved"
    new = [e for name, e in admin.events(c.client, c.paths) if name not in seen]
    assert not [e.message for e in new if e.kind == "member-left"], "nobody left"
    assert copies_started(new) == 0, [e.message for e in new]
    assert all(c.procs[name].alive() for name in AGENTS)


def _put(kv: DataClient, key: bytes, value: bytes) -> bool:
    try:
        kv.put(key, value)
    except Unavailable:
        return False
    return True
