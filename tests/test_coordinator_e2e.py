"""The leader's policies on a real ZooKeeper with real processes: drain, pause, the
mass-departure guard, rebalance delay, manual moves, fencing of a stopped leader."""

from __future__ import annotations

import json
import threading

from shardkeeper import admin
from shardkeeper import cluster as clusterstate
from shardkeeper.layout import MoveRequest, Paths
from shardkeeper.poll import poll_until
from shardkeeper.process import cli_command
from shardkeeper.vocab import HOLDING
from shardkeeper.zk import ZkTarget, close, connect
from tests.harness import Cluster, RoleProcess


def start(c: Cluster, agents: int, shards: int = 32, replicas: int = 2,
          coordinators: int = 1, timeout: float = 1.0) -> set[str]:
    c.init(shards, replicas)
    for i in range(1, coordinators + 1):
        c.start_coordinator(f"coord-{i}", session_timeout=timeout)
    names = {f"agent-{i}" for i in range(1, agents + 1)}
    for name in sorted(names):
        c.start_agent(name, session_timeout=timeout)
    poll_until(lambda: c.settled(names), 20, "initial convergence")
    return names


def config_set(c: Cluster, *settings: str) -> None:
    r = c.cli("config", "set", *settings)
    assert r.returncode == 0, r.stderr


def events(c: Cluster) -> list[dict]:
    r = c.cli("events", "--json", "--limit", "1000")
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def event_kinds(c: Cluster) -> list[str]:
    return [e["kind"] for e in events(c)]


class History:
    """Samples every shard's holders (from status) and in-sync set (from the plan)."""

    def __init__(self, target: ZkTarget, paths: Paths, replicas: int):
        self.client = connect(target)
        self.paths = paths
        self.min_held: dict[int, int] = {}
        self.min_in_sync: dict[int, int] = {}
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            plan = clusterstate.read_plan(self.client, self.paths)
            members = clusterstate.read_members(self.client, self.paths)
            statuses = clusterstate.read_statuses(self.client, self.paths)
            held: dict[int, int] = {}
            for agent, status in statuses.items():
                if agent in members:
                    for shard, st in status.shards.items():
                        held[shard] = held.get(shard, 0) + (st.state in HOLDING)
            for shard, replicas in enumerate(plan.routing):
                self.min_in_sync[shard] = min(self.min_in_sync.get(shard, 99), len(replicas))
                self.min_held[shard] = min(self.min_held.get(shard, 99), held.get(shard, 0))
            self.samples += 1
            self.stop.wait(0.01)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        close(self.client)


def test_drain_moves_everything_off_without_an_under_replicated_moment(cluster: Cluster) -> None:
    agents = start(cluster, agents=4, shards=32, replicas=2)
    config_set(cluster, "max_moves_total=2", "max_moves_per_agent=1")
    history = History(cluster.target, cluster.paths, 2)
    try:
        held_before = sum(1 for r in cluster.plan().routing if "agent-4" in r)
        assert held_before > 0
        r = cluster.cli("drain", "agent-4")
        assert r.returncode == 0 and "draining" in r.stdout
        poll_until(lambda: "drain-done" in event_kinds(cluster), 30, "drain done")
        poll_until(lambda: cluster.settled(agents), 10, 'cluster.settled(agents)')
    finally:
        history.close()
    assert history.samples > 10
    assert all("agent-4" not in r for r in cluster.plan().routing)
    assert min(history.min_in_sync.values()) == 2, "a shard's in-sync set fell below R"
    assert min(history.min_held.values()) == 2, "a shard was held by fewer than R agents"
    status = json.loads(cluster.cli("status", "--json").stdout)
    row = next(m for m in status["members"] if m["id"] == "agent-4")
    assert row["state"] == "drained" and row["replicas"] == 0
    # undrain: the agent receives replicas again.
    assert cluster.cli("undrain", "agent-4").returncode == 0
    poll_until(lambda: any("agent-4" in r for r in cluster.plan().routing), 15,
        "any(('agent-4' in r for r in cluster.plan().routing)")


def test_pause_stops_moves_and_resume_restarts_them(cluster: Cluster) -> None:
    agents = start(cluster, agents=3, shards=24, replicas=2)
    r = cluster.cli("pause", "--note", "kernel upgrade")
    assert r.returncode == 0 and "maintenance mode on" in r.stdout
    generation = cluster.plan().generation
    cluster.start_agent("agent-4")
    poll_until(lambda: "agent-4" in cluster.plan().meta.members, 10,
        "'agent-4' in cluster.plan().meta.members")
    plan = cluster.plan()
    assert plan.generation > generation
    assert not any(p.bootstrapping for p in plan.shards), "no copies while paused"
    assert all("agent-4" not in r for r in plan.routing)
    text = cluster.cli("status").stdout
    assert "MAINTENANCE (manual)" in text and "kernel upgrade" in text
    assert cluster.cli("resume").returncode == 0
    poll_until(lambda: cluster.settled(agents | {"agent-4"}) and any(
        "agent-4" in r for r in cluster.plan().routing), 20, "moves resume")


def test_mass_departure_enters_maintenance_and_leaves_when_members_return(
        cluster: Cluster) -> None:
    agents = start(cluster, agents=5, shards=30, replicas=3)
    before = cluster.plan()
    victims = ["agent-3", "agent-4", "agent-5"]
    for v in victims:
        cluster.procs[v].kill()
    survivors = agents - set(victims)
    poll_until(lambda: cluster.client.exists(cluster.paths.maintenance), 10,
        "automatic maintenance")
    poll_until(lambda: set(cluster.plan().meta.members) == survivors, 10,
        'set(cluster.plan().meta.members) == survivors')
    plan = cluster.plan()
    unavailable = 0
    for replicas in plan.routing:
        if set(replicas) <= set(victims):
            # Every replica vanished: the shard waits for its agents instead of being
            # re-created empty elsewhere.
            unavailable += 1
        else:
            # Primaries failed over to a surviving in-sync replica; dead ones left the set.
            assert set(replicas) <= survivors
    assert plan.meta.summary["unavailable"] == unavailable
    moved = sum(1 for s, r in enumerate(plan.routing) for a in r if a not in before.routing[s])
    assert moved < len(plan.routing), "the guard stopped a reshuffle"
    # Sessions expire a tick or two apart, so copies may start before the guard trips;
    # none starts after it.
    log = events(cluster)
    entered = next(i for i, e in enumerate(log) if e["kind"] == "maintenance-entered")
    assert all(" 0 copies started" in e["message"] for e in log[entered:] if e["kind"] == "plan")
    assert "MAINTENANCE (auto)" in cluster.cli("status").stdout
    for v in victims:
        poll_until(lambda v=v: v not in cluster.members(), 10, 'v not in cluster.members()')
        cluster.start_agent(v)
    poll_until(lambda: not cluster.client.exists(cluster.paths.maintenance), 15,
        "automatic maintenance ends when the members return")
    poll_until(lambda: cluster.settled(agents), 20, 'cluster.settled(agents)')
    kinds = event_kinds(cluster)
    assert "maintenance-entered" in kinds and "maintenance-left" in kinds


def test_rebalance_delay_defers_re_replication_but_not_failover(cluster: Cluster) -> None:
    agents = start(cluster, agents=3, shards=24, replicas=2)
    config_set(cluster, "rebalance_delay=600")
    before = cluster.plan()
    cluster.procs["agent-1"].kill()
    survivors = agents - {"agent-1"}
    poll_until(lambda: set(cluster.plan().meta.members) == survivors, 10,
        'set(cluster.plan().meta.members) == survivors')
    plan = cluster.plan()
    assert all(r and r[0] != "agent-1" and "agent-1" not in r for r in plan.routing), \
        "every primary failed over at once"
    lost = [s for s, r in enumerate(before.routing) if "agent-1" in r]
    assert all(len(plan.routing[s]) == 1 for s in lost)
    assert not any(p.bootstrapping for p in plan.shards), "re-replication waits for the delay"
    assert plan.meta.summary["waiting"] == ["agent-1"]
    r = cluster.cli("rebalance")
    assert r.returncode == 0
    poll_until(lambda: cluster.settled(survivors) and all(
        len(r) == 2 for r in cluster.plan().routing), 20, "rebalance re-replicates at once")


def test_manual_move_is_carried_out_or_refused(cluster: Cluster) -> None:
    agents = start(cluster, agents=3, shards=12, replicas=2)
    routing = cluster.plan().routing
    shard = 0
    source = routing[shard][1]
    dest = (agents - set(routing[shard])).pop()
    r = cluster.cli("move", str(shard), "--from", source, "--to", dest)
    assert r.returncode == 0, r.stderr
    poll_until(lambda: dest in cluster.plan().routing[shard]
             and source not in cluster.plan().routing[shard], 15,
                 'dest in cluster.plan().routing[shard] and source not')
    # The CLI refuses what it can tell is wrong (exit 2, nothing written)...
    assert cluster.cli("move", "99", "--from", source, "--to", dest).returncode == 2
    r = cluster.cli("move", "1", "--from", "agent-9", "--to", dest)
    assert r.returncode == 2 and "no agent 'agent-9'" in r.stderr
    # ...and the leader refuses a request that is wrong when it reads it.
    admin.request_move(cluster.client, cluster.paths, MoveRequest(1, "agent-9", dest))
    poll_until(lambda: "move-refused" in event_kinds(cluster), 10,
        "'move-refused' in event_kinds(cluster)")
    assert "move-accepted" in event_kinds(cluster)


def test_stopped_leader_is_deposed_and_cannot_write_after_resuming(cluster: Cluster) -> None:
    agents = start(cluster, agents=3, shards=16, replicas=2, coordinators=2)
    leader = poll_until(cluster.leader, 5, 'cluster.leader')
    standby = ({"coord-1", "coord-2"} - {leader}).pop()
    epoch = cluster.epoch()
    cluster.procs[leader].stop()
    poll_until(lambda: cluster.leader() == standby and cluster.epoch() > epoch, 15,
        "standby elected after the stopped leader's session expired")
    # Give the stopped leader something to act on, then wake it up.
    cluster.procs["agent-3"].kill()
    poll_until(lambda: set(cluster.plan().meta.members) == agents - {"agent-3"}, 10,
        "set(cluster.plan().meta.members) == agents - {'agent")
    cluster.procs[leader].cont()
    poll_until(lambda: "gives up leadership" in cluster.procs[leader].output(), 15,
        "the resumed leader notices it lost its session and steps down")
    cluster.start_agent("agent-4")
    poll_until(lambda: "agent-4" in cluster.plan().meta.members, 10,
        "'agent-4' in cluster.plan().meta.members")
    meta = cluster.plan().meta
    assert meta.leader == standby and meta.epoch == cluster.epoch()
    poll_until(lambda: leader in cluster.client.Election(cluster.paths.election).contenders(), 15,
        "the old leader campaigns again as a standby")
    assert cluster.leader() == standby


def test_config_show_set_and_events(cluster: Cluster) -> None:
    start(cluster, agents=3, shards=8, replicas=2)
    shown = json.loads(cluster.cli("config", "show", "--json").stdout)
    assert shown["shards"] == 8 and shown["max_moves_total"] == 64
    r = cluster.cli("config", "set", "shards=16")
    assert r.returncode == 2 and "shards cannot change" in r.stderr
    r = cluster.cli("config", "set", "nonsense")
    assert r.returncode == 2 and "expected KEY=VALUE" in r.stderr
    config_set(cluster, "max_moves_total=5")
    assert "max_moves_total            5" in cluster.cli("config", "show").stdout
    text = cluster.cli("events").stdout
    assert "member-joined" in text and "plan" in text
    follower = RoleProcess(
        "events", cli_command("events", "--follow", "--zk", cluster.hosts,
                              "--cluster", cluster.name), cluster.workdir / "events.log")
    try:
        poll_until(lambda: "member-joined" in follower.output(), 10,
            "'member-joined' in follower.output()")
        cluster.cli("drain", "agent-2")
        poll_until(lambda: "drain-done" in follower.output(), 15,
            "events --follow prints new events as they are logged")
    finally:
        follower.kill()
