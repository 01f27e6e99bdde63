"""Trust nothing read (issue 10), end to end on real processes: forged and damaged znodes
of every kind, with leader changes in between, never delete data, never stall failover,
and never crash-loop a leader; dropped replicas go to the trash."""

from __future__ import annotations

import json
import subprocess
import time

from shardkeeper.client import DataClient
from shardkeeper.cluster import read_members
from shardkeeper.layout import Paths
from shardkeeper.poll import poll_until
from shardkeeper.process import cli_command
from shardkeeper.vocab import CorruptZnode
from tests.harness import Cluster, fetch

SESSION = 1.0
KEYS = [f"key-{i:04d}".encode() for i in range(200)]


def start(cluster: Cluster, agents: int = 4, coordinators: int = 2, shards: int = 16,
          replicas: int = 2) -> tuple[set[str], DataClient]:
    cluster.init(shards, replicas)
    for i in range(1, coordinators + 1):
        cluster.start_coordinator(f"coord-{i}", session_timeout=SESSION)
    names = {f"agent-{i}" for i in range(1, agents + 1)}
    for name in sorted(names):
        cluster.start_agent(name, session_timeout=SESSION)
    poll_until(lambda: settled(cluster, names), 30, "initial convergence")
    kv = DataClient(cluster.client, cluster.paths, deadline=20.0)
    for key in KEYS:
        kv.put(key, b"v-" + key)
    return names, kv


def settled(cluster: Cluster, agents: set[str]) -> bool:
    try:
        return cluster.settled(agents)
    except CorruptZnode:
        return False  # a damaged plan znode the leader has not rewritten yet


def plan_members(cluster: Cluster) -> tuple[str, ...] | None:
    try:
        plan = cluster.plan()
    except CorruptZnode:
        return None
    return plan.meta.members if plan.meta else None


def departed(cluster: Cluster, agent: str) -> bool:
    members = plan_members(cluster)
    return members is not None and agent not in members


def all_keys_readable(kv: DataClient) -> None:
    kv.invalidate()
    missing = [k for k in KEYS if kv.get(k) != b"v-" + k]
    assert not missing, f"{len(missing)} keys lost or wrong, e.g. {missing[:3]}"


def local(*args: str) -> subprocess.CompletedProcess[str]:
    """A CLI command that works on a host's files, not on the cluster (no --zk)."""
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=60)


def shard_files(cluster: Cluster, agent: str) -> set[str]:
    return {p.name for p in (cluster.workdir / agent / "shards").glob("shard-*.sqlite3")}


def test_a_forged_plan_deletes_nothing_and_real_plans_still_apply(cluster: Cluster) -> None:
    agents, kv = start(cluster, agents=3, coordinators=1)
    held = shard_files(cluster, "agent-1")
    assert held
    forged = json.dumps({"generation": 999_999_999, "epoch": 0, "replicas": {}}).encode()
    cluster.client.set(cluster.paths.plan_agent("agent-1"), forged)
    poll_until(lambda: "refused" in json.dumps(cluster.cli("status", "--json").stdout)
               or "not acting on plan" in cluster.procs["agent-1"].output(), 10,
               "agent-1 refuses the forged plan")
    status = cluster.statuses()["agent-1"]
    assert "999999999" in status.refused
    # ...and counts it where a scraper sees it.
    address = read_members(cluster.client, cluster.paths)["agent-1"].address
    scraped = fetch(f"http://{address}/metrics").body.decode()
    refused = [float(line.split()[-1]) for line in scraped.splitlines()
               if line.startswith("shardkeeper_plans_refused_total ")]
    assert refused and refused[0] >= 1, scraped
    assert shard_files(cluster, "agent-1") == held, "no shard file was touched"
    assert not (cluster.workdir / "agent-1" / "trash").exists()
    all_keys_readable(kv)
    # The cluster moves on: a departure makes the leader write agent-1 a real plan again.
    cluster.procs["agent-3"].kill()
    poll_until(lambda: settled(cluster, agents - {"agent-3"}), 30, "re-replicated")
    assert cluster.statuses()["agent-1"].refused == ""
    all_keys_readable(kv)


def test_dropped_replicas_go_to_the_trash_and_come_back(cluster: Cluster) -> None:
    agents, kv = start(cluster, agents=3, coordinators=1)
    before = shard_files(cluster, "agent-3")
    assert cluster.cli("drain", "agent-3").returncode == 0
    poll_until(lambda: settled(cluster, agents) and not shard_files(cluster, "agent-3"), 30,
               "agent-3 drained")
    data_dir = str(cluster.workdir / "agent-3")
    listed = json.loads(local("agent", "trash", "list", "--data-dir", data_dir,
                              "--json").stdout)
    assert {f"shard-{e['shard']:06d}.sqlite3" for e in listed} == before
    busy = local("agent", "trash", "restore", "--data-dir", data_dir, listed[0]["name"])
    assert busy.returncode == 1 and "in use by another agent" in busy.stderr
    cluster.procs["agent-3"].term()
    restored = local("agent", "trash", "restore", "--data-dir", data_dir, listed[0]["name"])
    assert restored.returncode == 0, restored.stderr
    assert len(shard_files(cluster, "agent-3")) == 1
    purged = local("agent", "trash", "purge", "--data-dir", data_dir)
    assert purged.returncode == 0 and f"purged {len(listed) - 1} entries" in purged.stdout
    all_keys_readable(kv)


def test_a_live_agents_member_and_status_znodes_heal(cluster: Cluster) -> None:
    agents, kv = start(cluster, agents=3, coordinators=1)
    generation = cluster.plan().generation
    for path in (cluster.paths.member("agent-2"), cluster.paths.agent_status("agent-2")):
        cluster.client.delete(path)
        poll_until(lambda p=path: cluster.client.exists(p), 10, f"{path} written again")
        cluster.client.set(path, b"garbage")
        poll_until(lambda p=path: cluster.client.get(p)[0] != b"garbage", 10,
                   f"{path} rewritten")
    poll_until(lambda: settled(cluster, agents), 10, "still settled")
    kinds = [e["kind"] for e in map(json.loads, cluster.cli(
        "events", "--json", "--limit", "1000").stdout.splitlines())]
    assert "member-left" not in kinds, "a live agent was never treated as departed"
    assert cluster.plan().generation == generation, "nothing was re-planned"
    all_keys_readable(kv)


def damages(paths: Paths) -> list[tuple[str, str]]:
    """(path, how) for every znode kind a leader or agent reads."""
    kinds = [paths.plan_meta, paths.plan_agent("agent-1"), paths.routing_chunk(0),
             paths.config, paths.epoch, paths.member("agent-2"), paths.agent_status("agent-2")]
    return [(path, how) for path in kinds for how in ("garbage", "delete")]


def test_damaged_znodes_of_every_kind_never_stall_failover_or_lose_a_key(
        cluster: Cluster) -> None:
    agents, kv = start(cluster, agents=4, coordinators=2)
    config = cluster.client.get(cluster.paths.config)[0]
    victims = iter(["agent-3", "agent-4"] * 7)
    for path, how in damages(cluster.paths):
        if how == "garbage":
            cluster.client.set(path, b"\xff{not json")
        else:
            cluster.client.delete(path)
        # A leader change, then a departure the new leader must plan for.
        leader = poll_until(cluster.leader, 10, "a leader")
        victim = next(victims)
        cluster.procs[leader].kill()
        cluster.procs[victim].kill()
        t0 = time.monotonic()
        poll_until(lambda v=victim: departed(cluster, v), 20,
                   f"a plan without {victim} after damaging {path} ({how})")
        assert time.monotonic() - t0 < 20
        if path == cluster.paths.config:  # an operator restores it (init --force would too)
            if how == "garbage":
                cluster.client.set(cluster.paths.config, config)
            else:
                cluster.client.create(cluster.paths.config, config)
        cluster.start_coordinator(leader, session_timeout=SESSION)
        cluster.start_agent(victim, session_timeout=SESSION)
        poll_until(lambda: settled(cluster, agents), 40,
                   f"the cluster settles after damaging {path} ({how})")
    all_keys_readable(kv)
    kinds = {e["kind"] for e in map(json.loads, cluster.cli(
        "events", "--json", "--limit", "1000").stdout.splitlines())}
    assert {"plan-repaired", "config-refused"} <= kinds, "the repairs were audited"
    for name in cluster.procs:
        out = cluster.procs[name].output()
        assert "Traceback" not in out, f"{name} logged a traceback"
    epochs = cluster.epoch()
    assert epochs < 60, f"leadership looped: epoch {epochs}"



def test_the_running_leader_repairs_plan_znodes_damaged_behind_its_back(
        cluster: Cluster) -> None:
    agents, kv = start(cluster, agents=3, coordinators=1)
    chunk = cluster.paths.routing_chunk(0)
    before = cluster.client.get(chunk)[0]
    cluster.client.delete(chunk)
    poll_until(lambda: cluster.client.exists(chunk), 10, "the chunk rewritten")
    cluster.client.set(cluster.paths.plan_meta, b"[]")
    poll_until(lambda: plan_members(cluster) == tuple(sorted(agents)), 10, "meta rewritten")
    rewritten = cluster.client.get(chunk)[0]
    assert json.loads(rewritten)["replicas"] == json.loads(before)["replicas"]
    kinds = [e["kind"] for e in map(json.loads, cluster.cli(
        "events", "--json", "--limit", "1000").stdout.splitlines())]
    assert kinds.count("plan-repaired") >= 2
    poll_until(lambda: settled(cluster, agents), 10, "settled")
    all_keys_readable(kv)
