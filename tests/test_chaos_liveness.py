"""Issue 13's liveness regressions, on real processes: a copy whose source cannot serve the
shard, and an agent whose disk is full, must lead somewhere, never to a stuck cluster.

The first failure was seen on a fresh machine: agent-3 copied shard 1 from a source that
answered ``404 unknown_shard`` (its new primaries were not promoted yet), the copy went
BOOTSTRAPPING -> ERROR 3.5 s later, and the leader, whose last plan said "1 in flight",
never wrote another plan. Here the source's promotions are held back for real: its data
dir is a small tmpfs that is full before the first plan, so every promotion fails (and is
retried) and it serves none of its shards until the space comes back.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agents.storeset import StoreSet
from bench.chaos import disk
from bench.common import unsettled
from shardkeeper import admin
from shardkeeper.client import DataClient
from shardkeeper.poll import TimedOut, poll_until
from shardkeeper.zk import ensure_layout
from tests.harness import Cluster

SESSION = 1.0

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")


@pytest.fixture()
def small_disk(tmp_path: Path):
    """agent-1's data dir: a 64 MB tmpfs, unmounted whatever happens."""
    path = tmp_path / "agent-1"
    disk.mount_tmpfs(path, 64)
    try:
        yield path
    finally:
        disk.unmount(path)


def settle(cluster: Cluster, agents: set[str], timeout: float, what: str) -> None:
    """Wait until the cluster settled on ``agents``; on time-out, say what is left."""
    try:
        poll_until(lambda: cluster.settled(agents), timeout, what)
    except TimedOut as e:
        reason = unsettled(cluster.client, cluster.paths, 2, agents)
        statuses = {a: {s: (st.state, st.catching_up, st.reason) for s, st in
                        status.shards.items()} for a, status in cluster.statuses().items()}
        raise AssertionError(f"{e}: {reason}; statuses {statuses}") from None


def audit(cluster: Cluster, kind: str) -> list[str]:
    return [e.message for _, e in admin.events(cluster.client, cluster.paths) if e.kind == kind]


@needs_root
def test_a_copy_from_a_source_that_cannot_serve_it_is_repointed(cluster, small_disk) -> None:
    ensure_layout(cluster.client, cluster.paths)
    cluster.client.create(cluster.paths.token, b"liveness-test-token")
    cluster.client.create(cluster.paths.peer_token, b"liveness-test-peer-token")
    cluster.start_coordinator("coord-1", session_timeout=SESSION)
    first = {"agent-1", "agent-2"}
    for name in sorted(first):
        cluster.start_agent(name, session_timeout=SESSION)
    poll_until(lambda: cluster.members() == first, 30, "agent-1 and agent-2 to register")
    disk.fill(small_disk)  # before any plan: agent-1 can create no store at all
    cluster.init(8, 2)
    poll_until(lambda: cluster.plan().meta is not None, 30, "the first plan")
    assert all(set(row) == first for row in cluster.plan().routing), "R=2 on two agents"
    cluster.start_agent("agent-3", session_timeout=SESSION)
    # agent-3 takes a third of the replicas, copied from in-sync sources, half of them
    # agent-1, which answers 404 unknown_shard: those copies fail, and the leader must
    # point them at agent-2.
    poll_until(lambda: any("404" in m and "copying from agent-2 instead" in m
                           for m in audit(cluster, "copy-failed")), 90,
               "the leader to re-point a copy that failed against agent-1")
    disk.release(small_disk)
    everyone = first | {"agent-3"}
    settle(cluster, everyone, 90, "the cluster to settle once agent-1 has room again")
    assert cluster.procs["agent-1"].alive(), "a full disk must not end the agent"
    held = StoreSet(cluster.workdir / "agent-3" / "shards").on_disk()
    assert held == set(cluster.plan().agents["agent-3"].replicas) and held
    kv = DataClient(cluster.client, cluster.paths, deadline=20.0)
    for i in range(40):
        kv.put(f"after-{i}".encode(), b"v")
    assert all(kv.get(f"after-{i}".encode()) == b"v" for i in range(40))
    verified = cluster.cli("verify", timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def run_repeatedly(times: int) -> None:  # pragma: no cover - a manual tool
    """`python -m tests.test_chaos_liveness N`: the regression N times in a row."""
    for i in range(times):
        done = subprocess.run(["python", "-m", "pytest", "-q", "-x", __file__], check=False)
        print(f"run {i + 1}/{times}: exit {done.returncode}", flush=True)
        if done.returncode != 0:
            raise SystemExit(1)
