"""Issue 14 on real processes: a SIGTERMed agent hands its primaries to in-sync replicas
before it leaves, under a write load that loses and fails nothing; a crashed agent fails
over long before its session timeout, a frozen one only at it."""

from __future__ import annotations

import time

from shardkeeper import admin
from shardkeeper.client import DataClient
from shardkeeper.poll import poll_until
from tests.harness import Cluster
from tests.test_data_e2e import Writer, assert_all_readable, cli_ok

AGENTS = {"agent-1", "agent-2", "agent-3", "agent-4"}
LONG_SESSION = 10.0  # a departure seen only by the session would take this long


def events(cluster: Cluster) -> list:
    return [e for _, e in admin.events(cluster.client, cluster.paths)]


def test_sigterm_hands_off_primaries_first_and_no_write_fails(cluster: Cluster) -> None:
    cluster.init(16, 3)
    cluster.start_coordinator("coord-1", session_timeout=1.0)
    for name in sorted(AGENTS):
        cluster.start_agent(name, session_timeout=LONG_SESSION)
    poll_until(lambda: cluster.settled(AGENTS), 30, "initial convergence")
    kv = DataClient(cluster.client, cluster.paths, deadline=20.0)
    routing = cluster.plan().routing
    victim = max(sorted(AGENTS), key=lambda a: sum(r[0] == a for r in routing))
    held = [s for s, r in enumerate(routing) if r[0] == victim]
    assert held, "the victim is primary of some shards"
    writers = [Writer(kv, f"w{i}-") for i in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.wait_acks(100)
    t0 = time.monotonic()
    assert cluster.procs[victim].term(timeout=30) == 0
    exited = time.monotonic() - t0
    poll_until(lambda: victim not in cluster.plan().meta.members, 10, "a plan without it")
    for w in writers:
        w.wait_acks(len(w.acked) + 100)
    for w in writers:
        w.stop()
    # Its primaries moved in a plan written while it was still a member, before it left.
    log = events(cluster)
    leaving = [e for e in log if e.kind == "member-leaving" and victim in e.message]
    left = [e for e in log if e.kind == "member-left" and victim in e.message]
    assert leaving and left and leaving[0].generation < left[0].generation, log[-6:]
    handed = [e for e in log if e.kind == "plan" and e.generation == leaving[0].generation]
    assert handed and f"{len(held)} handed off" in handed[0].message, handed
    assert "primaries handed off (0 kept" in cluster.procs[victim].output()
    failed = sum(w.failed for w in writers)
    longest = max(w.longest_gap for w in writers)
    print(f"\nSIGTERM -> exit {exited:.2f}s; {sum(len(w.acked) for w in writers)} writes"
          f" acknowledged, {failed} failed; longest gap between acks {longest:.2f}s")
    assert failed == 0, "a write failed after the client library's retries"
    # Back with its data: it catches up and the cluster is whole again.
    cluster.start_agent(victim, session_timeout=LONG_SESSION)
    poll_until(lambda: cluster.settled(AGENTS), 60, "the restarted agent catches up")
    for w in writers:
        assert_all_readable(kv, w.acked)
    assert "every replica's digest is equal" in cli_ok(cluster, "verify")


def test_sigterm_without_a_replica_to_take_over_leaves_at_once(cluster: Cluster) -> None:
    """R=1: no in-sync replica can take a primary; the leader says so in plan/meta and
    the agent leaves without waiting for its hand-off timeout."""
    cluster.init(8, 1)
    cluster.start_coordinator("coord-1", session_timeout=1.0)
    for name in ("agent-1", "agent-2"):
        cluster.start_agent(name, session_timeout=LONG_SESSION)
    poll_until(lambda: cluster.settled({"agent-1", "agent-2"}), 30, "initial convergence")
    t0 = time.monotonic()
    assert cluster.procs["agent-1"].term(timeout=30) == 0
    assert time.monotonic() - t0 < 8, "well before the 10 s hand-off timeout"
    assert "kept: no other in-sync replica" in cluster.procs["agent-1"].output()


def test_a_killed_agent_fails_over_at_once_even_with_its_leader_elected_before_init(
        cluster: Cluster) -> None:
    """The leader learns the cluster token only after `init`; its liveness links must work
    all the same, so a SIGKILLed agent's primaries move long before its session expires."""
    cluster.start_coordinator("coord-1", session_timeout=1.0)
    poll_until(cluster.leader, 20, "a leader before init")
    cluster.init(16, 2)
    for name in sorted(AGENTS):
        cluster.start_agent(name, session_timeout=LONG_SESSION)
    poll_until(lambda: cluster.settled(AGENTS), 30, "initial convergence")
    victim = cluster.plan().routing[0][0]
    t0 = time.monotonic()
    cluster.procs[victim].kill()
    poll_until(lambda: victim not in cluster.plan().meta.members, LONG_SESSION / 2,
               "a plan without the killed agent, well before its session expires")
    print(f"\nSIGKILL -> plan {time.monotonic() - t0:.2f}s (T = {LONG_SESSION:g} s)")
    assert all(r and r[0] != victim for r in cluster.plan().routing), "its primaries moved"
