"""The operator's day on a real ZooKeeper with real agent and coordinator processes."""

from __future__ import annotations

import time

from kazoo.exceptions import BadVersionError

from agents.storeset import StoreSet
from shardkeeper.layout import AgentPlan, PlanMeta, decode_epoch
from shardkeeper.poll import poll_until
from tests.harness import Cluster

AGENTS = {"agent-1", "agent-2", "agent-3"}


def start(cluster: Cluster, shards: int = 64, replicas: int = 2, session_timeout: float = 1.0):
    cluster.init(shards, replicas)
    for name in ("coord-1", "coord-2"):
        cluster.start_coordinator(name, session_timeout=session_timeout)
    for name in sorted(AGENTS):
        cluster.start_agent(name, session_timeout=session_timeout)


def test_every_shard_gets_distinct_agents_and_status_matches_plan(cluster: Cluster) -> None:
    start(cluster)
    poll_until(lambda: cluster.settled(AGENTS), 15, "initial convergence")
    plan = cluster.plan()
    assert len(plan.routing) == 64
    assert all(len(set(r)) == len(r) == 2 for r in plan.routing)
    assert {a for r in plan.routing for a in r} == AGENTS
    # Each agent holds exactly one store file per assigned replica.
    for agent in AGENTS:
        held = StoreSet(cluster.workdir / agent / "shards").on_disk()
        assert held == set(plan.agents[agent].replicas)


def test_status_matches_plan_within_five_seconds_of_a_new_plan(cluster: Cluster) -> None:
    start(cluster)
    poll_until(lambda: cluster.settled(AGENTS), 15, "initial convergence")
    cluster.start_agent("agent-4")
    poll_until(lambda: cluster.plan().meta.members == tuple(sorted(AGENTS | {"agent-4"})), 15,
        "plan with agent-4")
    poll_until(lambda: cluster.settled(AGENTS | {"agent-4"}), 5,
        "status matches the new plan within 5 s")


def test_sigkill_agent_replans_and_survivors_hold_every_shard_twice(cluster: Cluster) -> None:
    start(cluster, session_timeout=1.0)
    poll_until(lambda: cluster.settled(AGENTS), 15, "initial convergence")
    before = cluster.plan()
    t0 = time.time()
    cluster.procs["agent-2"].kill()
    survivors = AGENTS - {"agent-2"}
    poll_until(lambda: cluster.plan().meta.members == tuple(sorted(survivors)), 10,
        "a plan without agent-2")
    first = cluster.plan()
    print(f"\nkill-to-new-plan: {first.meta.created - t0:.3f}s (session timeout 1.0s)")
    assert first.generation > before.generation
    # The first plan without agent-2 already has a primary for every shard.
    assert all(r and "agent-2" not in r for r in first.routing)
    poll_until(lambda: cluster.settled(survivors), 10, "survivors converge")
    plan = cluster.plan()
    assert all(len(set(r)) == 2 and "agent-2" not in r for r in plan.routing)
    # Survivors kept what they held: only agent-2's replicas moved.
    moved = sum(1 for s, r in enumerate(plan.routing) for a in r if a not in before.routing[s])
    held = sum(1 for r in before.routing if "agent-2" in r)
    assert moved == held


def test_sigterm_agent_leaves_at_once(cluster: Cluster) -> None:
    cluster.init(16, 2)
    cluster.start_coordinator("coord-1", session_timeout=1.0)
    for name in ("agent-1", "agent-2"):
        cluster.start_agent(name, session_timeout=20.0)
    poll_until(lambda: cluster.settled({"agent-1", "agent-2"}), 15,
        "cluster.settled({'agent-1', 'agent-2'})")
    t0 = time.monotonic()
    assert cluster.procs["agent-1"].term() == 0
    poll_until(lambda: "agent-1" not in cluster.members(), 5,
        "member znode gone well before the 20 s session timeout")
    assert time.monotonic() - t0 < 5
    poll_until(lambda: cluster.settled({"agent-2"}), 10, "cluster.settled({'agent-2'})")


def test_agent_registers_again_after_session_expiry(cluster: Cluster) -> None:
    cluster.init(8, 1)
    cluster.start_coordinator("coord-1", session_timeout=1.0)
    agent = cluster.start_agent("agent-1", session_timeout=1.0)
    poll_until(lambda: cluster.settled({"agent-1"}), 15, "cluster.settled({'agent-1'})")
    agent.stop()
    poll_until(lambda: "agent-1" not in cluster.members(), 10,
        "the stopped agent's session expires")
    agent.cont()
    poll_until(lambda: cluster.settled({"agent-1"}), 15,
        "agent registers again and re-applies its plan")
    assert "session lost" in agent.output()


def test_sigkill_leader_fails_over_and_old_epoch_is_fenced(cluster: Cluster) -> None:
    start(cluster, session_timeout=1.0)
    poll_until(lambda: cluster.settled(AGENTS), 15, 'cluster.settled(AGENTS)')
    leader = poll_until(cluster.leader, 5, 'cluster.leader')
    old_epoch = cluster.epoch()
    old_generation = cluster.plan().generation
    cluster.procs[leader].kill()
    standby = ({"coord-1", "coord-2"} - {leader}).pop()
    poll_until(lambda: cluster.leader() == standby and cluster.epoch() > old_epoch, 10,
        "standby leads with a bumped epoch")
    terms = [(p.primary, p.term) for p in cluster.plan().shards]
    assert all(term > 0 for _, term in terms), "every shard's primary has a term"
    # The new leader plans: stop an agent and see a generation it wrote.
    cluster.procs["agent-3"].kill()
    poll_until(lambda: cluster.plan().meta.members == ("agent-1", "agent-2"), 10,
        "cluster.plan().meta.members == ('agent-1', 'agent-2'")
    plan = cluster.plan()
    # The leader goes on writing (copies, promotions): a plan/meta read after the shards
    # bounds every term they carry.
    meta = cluster.plan().meta
    # It read the terms back: shards that kept their primary kept their term, and the
    # others' term is the generation that replaced their primary.
    for (primary, term), now in zip(terms, plan.shards, strict=True):
        if now.primary == primary:
            assert now.term == term
        else:
            assert old_generation < now.term <= meta.generation
    assert meta.leader == standby and meta.epoch == cluster.epoch()
    assert meta.generation > old_generation
    # A write fenced with the deposed leader's epoch version fails as a whole.
    stale = PlanMeta(meta.generation + 1, old_epoch, leader, 64, 2, (), 1)
    tx = cluster.client.transaction()
    tx.check(cluster.paths.epoch, old_epoch)
    tx.set_data(cluster.paths.plan_meta, stale.encode())
    tx.set_data(cluster.paths.plan_agent("agent-1"), AgentPlan(999, old_epoch).encode())
    results = tx.commit()
    assert isinstance(results[0], BadVersionError)
    # The new leader may write again meanwhile (agent-3's session expiring records it
    # down); whatever plan/meta holds, it is the new leader's, never the stale write.
    now = cluster.plan().meta
    assert (now.epoch, now.leader) == (cluster.epoch(), standby) and now != stale
    assert now.generation >= meta.generation
    assert cluster.plan().agents["agent-1"].generation != 999
    # And the epoch znode names the new leader.
    data, _ = cluster.client.get(cluster.paths.epoch)
    assert decode_epoch(cluster.paths.epoch, data) == standby


def test_ensemble_survives_losing_one_zookeeper_server(ensemble_cluster: Cluster,
                                                       zk_ensemble) -> None:
    c = ensemble_cluster
    start(c, shards=32, replicas=2, session_timeout=2.0)
    poll_until(lambda: c.settled(AGENTS), 20, 'c.settled(AGENTS)')
    zk_ensemble[0].process.kill()
    zk_ensemble[0].process.wait()
    c.procs["agent-1"].kill()
    survivors = AGENTS - {"agent-1"}
    poll_until(lambda: c.settled(survivors), 20,
        "a new plan without agent-1 while one ZooKeeper server is down")
    assert all(len(set(r)) == 2 for r in c.plan().routing)


def test_agent_started_before_zookeeper_waits_for_it(tmp_path) -> None:
    from shardkeeper.dev.zkserver import free_port, standalone

    server = standalone(tmp_path / "zk", port=free_port())
    c = Cluster(server.address, tmp_path)
    try:
        agent = c.start_agent("agent-1")
        poll_until(lambda: "retrying" in agent.output(), 30,
            "the agent keeps trying to reach ZooKeeper")
        assert agent.alive()
        server.start()
        server.wait_ready()
        c.init(4, 1)
        c.start_coordinator("coord-1")
        poll_until(lambda: c.settled({"agent-1"}), 30, "the agent registers once ZooKeeper is up")
    finally:
        c.close()
        server.stop()


def test_a_killed_agent_fails_over_at_once_a_frozen_one_at_its_session_timeout(
        cluster: Cluster) -> None:
    """The leader holds a liveness link to every agent: a SIGKILLed process closes it and
    its port refuses connections, so its primaries move long before a 10 s session
    expires; a SIGSTOPped process closes nothing, so only its session timeout decides."""
    cluster.init(16, 2)
    cluster.start_coordinator("coord-1", session_timeout=1.0)
    for name in sorted(AGENTS):
        cluster.start_agent(name, session_timeout=10.0)
    poll_until(lambda: cluster.settled(AGENTS), 30, "initial convergence")
    t0 = time.monotonic()
    cluster.procs["agent-1"].kill()
    poll_until(lambda: "agent-1" not in cluster.plan().meta.members, 5,
               "a plan without the killed agent, well before its 10 s session expires")
    killed = time.monotonic() - t0
    plan = cluster.plan()
    assert all(r and r[0] != "agent-1" for r in plan.routing), "its primaries moved"
    cluster.procs["agent-2"].stop()
    t0 = time.monotonic()
    time_stopped = poll_until(lambda: "agent-2" not in cluster.plan().meta.members and
                              time.monotonic() - t0, 30, "the frozen agent's session expires")
    cluster.procs["agent-2"].cont()
    print(f"\nSIGKILL -> plan {killed:.2f}s, SIGSTOP -> plan {time_stopped:.2f}s (T = 10 s)")
    assert killed < 5 and time_stopped > 5
