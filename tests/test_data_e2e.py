"""Issue 5's acceptance, as the operator lives it: real ZooKeeper, a real coordinator and real
agent processes holding real data. Load keys, kill and freeze agents under a write load,
add an agent, send garbage; nothing acknowledged is lost and the replicas converge."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from agents.storeset import StoreSet
from shardkeeper.cli.data import load_key, load_value
from shardkeeper.client import DataClient, DataError
from shardkeeper.poll import poll_until
from shardkeeper.wire import MAX_KEY_BYTES, MAX_VALUE_BYTES, b64, key_path
from tests.harness import Cluster

AGENTS = ("agent-1", "agent-2", "agent-3", "agent-4")
ONLINE = {"REPLICA", "PRIMARY"}
SESSION = 1.0


def start(cluster: Cluster, agents=AGENTS, shards: int = 16, replicas: int = 3) -> DataClient:
    """A converged cluster, and a client of it."""
    cluster.init(shards, replicas)
    cluster.start_coordinator("coord-1", session_timeout=SESSION)
    for name in agents:
        cluster.start_agent(name, session_timeout=SESSION)
    poll_until(lambda: cluster.settled(set(agents)), 30, "initial convergence")
    return DataClient(cluster.client, cluster.paths, deadline=20.0)


class Writer(threading.Thread):
    """Puts unique keys as fast as one client can; remembers what was acknowledged."""

    def __init__(self, kv: DataClient, prefix: str, keys: Iterator[bytes] | None = None):
        super().__init__(daemon=True)
        self.kv = kv
        self.prefix = prefix
        self.keys = keys
        self.acked: dict[bytes, bytes] = {}
        self.failed = 0
        self.longest_gap = 0.0  # longest time without an acknowledged write
        self.halt = threading.Event()

    def run(self) -> None:
        last_ack = time.monotonic()
        i = 0
        while not self.halt.is_set():
            key = next(self.keys) if self.keys else f"{self.prefix}{i:07d}".encode()
            value = f"v{i}".encode()
            i += 1
            try:
                self.kv.put(key, value)
            except DataError:
                self.failed += 1
                continue
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - last_ack)
            last_ack = now
            self.acked[key] = value

    def stop(self) -> None:
        self.halt.set()
        self.join(30)

    def wait_acks(self, n: int, timeout: float = 20) -> None:
        poll_until(lambda: len(self.acked) >= n, timeout, f"{n} acked writes")


def cli_ok(cluster: Cluster, *args: str) -> str:
    r = cluster.cli(*args, timeout=120)
    assert r.returncode == 0, f"{args}: {r.stdout}\n{r.stderr}"
    return r.stdout


def assert_all_readable(kv: DataClient, expected: dict[bytes, bytes]) -> None:
    wrong = {k: v for k, v in expected.items() if kv.get(k) != v}
    assert not wrong, f"{len(wrong)} acknowledged writes lost or changed, e.g. {list(wrong)[:5]}"


def rows_held(kv: DataClient) -> int:
    """Rows on the primaries (tombstones included), summed over shards."""
    total = 0
    for shard in range(kv.routing().shards):
        info = kv.shard_infos(shard)[kv.routing().replicas[shard][0]]
        total += info.rows
    return total


def primary_of(cluster: Cluster, shard: int) -> str:
    return cluster.plan().routing[shard][0]


def every_shard_fully_in_sync(cluster: Cluster, agents: set[str], replicas: int) -> bool:
    plan = cluster.plan()
    statuses = cluster.statuses()
    for shard, holders in enumerate(plan.routing):
        if len(holders) != replicas or not set(holders) <= agents:
            return False
        for agent in holders:
            status = statuses.get(agent)
            if status is None or status.shards.get(shard) is None:
                return False
            if status.shards[shard].state not in ONLINE:
                return False
    return True


def freeze(cluster: Cluster, name: str) -> None:
    """SIGSTOP an agent and wait until every one of its threads has stopped: the signal is
    asynchronous, and a request sent right after it could still be served in full."""
    proc = cluster.procs[name]
    proc.stop()
    tasks = Path(f"/proc/{proc.pid}/task")

    def stopped() -> bool:
        states = []
        for stat in tasks.glob("*/stat"):
            with contextlib.suppress(OSError):
                states.append(stat.read_text().rpartition(")")[2].split()[0])
        return bool(states) and all(state in "tT" for state in states)

    poll_until(stopped, 10, f"{name} stopped")


def test_sigkill_agent_under_write_load_loses_no_acknowledged_write(cluster) -> None:
    kv = start(cluster)
    cli_ok(cluster, "load", "--keys", "20000", "--value-size", "64")
    writer = Writer(kv, "live-")
    writer.start()
    writer.wait_acks(200)
    cluster.procs["agent-2"].kill()
    survivors = set(AGENTS) - {"agent-2"}
    poll_until(lambda: cluster.plan().meta.members == tuple(sorted(survivors)), 15,
        "a plan without agent-2")
    writer.wait_acks(len(writer.acked) + 200)
    writer.stop()
    poll_until(lambda: cluster.settled(survivors), 60, "survivors converge")
    # The replicas agent-2 held were rebuilt: every shard is on all three survivors again.
    assert every_shard_fully_in_sync(cluster, survivors, 3)
    assert "every replica's digest is equal" in cli_ok(cluster, "verify")
    assert_all_readable(kv, writer.acked)
    sample = [load_key(i) for i in range(0, 20000, 37)]
    assert_all_readable(kv, {k: load_value(k, 64) for k in sample})
    assert rows_held(kv) >= 20000 + len(writer.acked)


def test_sigkill_primary_mid_write_costs_only_seconds(cluster) -> None:
    kv = start(cluster, shards=8)
    shard = 3
    victim = primary_of(cluster, shard)
    routing = kv.routing()
    keys = (k for k in (f"hot-{i:07d}".encode() for i in range(10**7))
            if kv.shard_of(k) == shard)
    assert routing.primary_address(shard)
    writer = Writer(kv, "hot-", keys)
    writer.start()
    writer.wait_acks(200)
    t0 = time.monotonic()
    cluster.procs[victim].kill()
    poll_until(lambda: primary_of(cluster, shard) != victim, 15, "a new primary for the shard")
    writer.wait_acks(len(writer.acked) + 200)
    writer.stop()
    print(f"\nlongest gap between acknowledged writes: {writer.longest_gap:.2f}s"
          f" (kill at +0, {time.monotonic() - t0:.1f}s of writes after)")
    assert writer.longest_gap < 6.0
    survivors = set(AGENTS) - {victim}
    poll_until(lambda: cluster.settled(survivors), 60, "survivors converge")
    assert_all_readable(kv, writer.acked)
    assert "every replica's digest is equal" in cli_ok(cluster, "verify")


def test_fifth_agent_takes_shards_with_data_make_before_break(cluster) -> None:
    kv = start(cluster)
    cli_ok(cluster, "load", "--keys", "4000", "--value-size", "64")
    snapshots: list[tuple] = []
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            plan = cluster.plan()
            snapshots.append((plan.routing, cluster.statuses()))
            time.sleep(0.05)  # a sampling period, not a wait for a condition

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    writer = Writer(kv, "during-move-")
    writer.start()
    writer.wait_acks(100)
    everyone = set(AGENTS) | {"agent-5"}
    cluster.start_agent("agent-5", session_timeout=SESSION)
    poll_until(lambda: cluster.settled(everyone), 60, "agent-5 takes its share")
    writer.wait_acks(len(writer.acked) + 100)
    writer.stop()
    watching.set()
    watcher.join(10)
    plan = cluster.plan()
    mine = set(plan.agents["agent-5"].replicas)
    assert mine, "agent-5 got no replicas"
    # Never fewer than R in-sync replicas, and agent-5 joins a shard only once ONLINE there.
    joined = [r for r, _ in snapshots if any("agent-5" in holders for holders in r)]
    assert joined and len(joined) < len(snapshots), "the watch saw no migration"
    for routing, statuses in snapshots:
        assert all(len(r) >= 3 for r in routing)
        for shard, holders in enumerate(routing):
            if "agent-5" in holders:
                assert statuses["agent-5"].shards[shard].state in ONLINE
    # Its shards came with their data, and replicas that moved away were deleted.
    infos = {s: kv.shard_infos(s) for s in mine}
    assert sum(i["agent-5"].rows for i in infos.values()) > 0
    for agent in everyone:
        held = StoreSet(cluster.workdir / agent / "shards").on_disk()
        assert held == set(plan.agents[agent].replicas), agent
    assert "every replica's digest is equal" in cli_ok(cluster, "verify")
    # Writes acknowledged while shards moved, some to agent-5's shards, are all there.
    moved = {k for k in writer.acked if kv.shard_of(k) in mine}
    print(f"\n{len(writer.acked)} writes acknowledged during the move, {len(moved)} to"
          f" agent-5's shards; {writer.failed} failed and were retried")
    assert moved, "no write landed on a shard that moved"
    assert_all_readable(kv, writer.acked)
    sample = [load_key(i) for i in range(0, 4000, 7)]
    assert_all_readable(kv, {k: load_value(k, 64) for k in sample})


def raw(address: str, method: str, path: str, body=None, token: str | None = None,
        timeout: float = 10) -> tuple[int, dict]:
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, {}


def test_frozen_primary_is_fenced_and_repaired_without_divergence(cluster) -> None:
    kv = start(cluster, shards=8)
    shard = 5
    key = next(k for k in (f"frozen-{i}".encode() for i in range(10**6))
               if kv.shard_of(k) == shard)
    kv.put(key, b"before")
    victim = primary_of(cluster, shard)
    address = kv.routing().addresses[victim]
    token = kv.token
    freeze(cluster, victim)
    # A write that reaches the frozen primary is handled the moment it wakes up.
    answers: list[int] = []
    late = threading.Thread(target=lambda: answers.append(raw(
        address, "PUT", key_path(shard, key), {"value": b64(b"stale")}, token, timeout=60)[0]))
    late.start()
    survivors = set(AGENTS) - {victim}
    poll_until(lambda: cluster.settled(survivors), 60,
        "the cluster fails over and re-replicates without the frozen agent")
    kv.put(key, b"after")
    cluster.procs[victim].cont()
    late.join(30)
    print(f"\nthe write held by the frozen primary got {answers}")
    assert answers and answers[0] != 200, f"the deposed primary acknowledged a write: {answers}"
    status, _ = raw(address, "PUT", key_path(shard, key), {"value": b64(b"stale2")}, token)
    assert status != 200
    poll_until(lambda: cluster.settled(set(AGENTS)), 60,
        "the thawed agent registers again and the cluster rebalances")
    assert kv.get(key) == b"after"
    assert "every replica's digest is equal" in cli_ok(cluster, "verify")
    assert "session lost" in cluster.procs[victim].output()


BAD_REQUESTS = [
    # (what, method, path, body, token, expected status)
    ("wrong token", "PUT", key_path(0, b"k"), {"value": b64(b"x")}, "wrong", 401),
    ("no token", "PUT", key_path(0, b"k"), {"value": b64(b"x")}, None, 401),
    ("not JSON", "PUT", key_path(0, b"k"), b"{nope", "TOKEN", 400),
    ("value not base64", "PUT", key_path(0, b"k"), {"value": "%%%"}, "TOKEN", 400),
    ("no value", "PUT", key_path(0, b"k"), {"v": "eA=="}, "TOKEN", 400),
    ("unknown shard", "PUT", key_path(999, b"k"), {"value": b64(b"x")}, "TOKEN", 404),
    ("oversized key", "PUT", key_path(0, b"k" * (MAX_KEY_BYTES + 1)), {"value": b64(b"x")},
     "TOKEN", 413),
    ("oversized value", "PUT", key_path(0, b"k"), {"value": b64(b"x" * (MAX_VALUE_BYTES + 1))},
     "TOKEN", 413),
    ("bad batch", "POST", "/v1/shards/0/batch", {"puts": [{"key": 1}]}, "TOKEN", 400),
    ("replicate, client token", "POST", "/v1/shards/0/replicate", {"rows": "x"}, "TOKEN", 403),
]


def test_bad_requests_get_4xx_and_change_nothing(cluster) -> None:
    kv = start(cluster, agents=AGENTS[:2], shards=1, replicas=2)
    kv.put(b"k", b"original")
    routing = kv.routing()
    addresses = [routing.addresses[a] for a in routing.replicas[0]]
    before = {a: i.digest for a, i in kv.shard_infos(0).items()}
    for what, method, path, body, token, expected in BAD_REQUESTS:
        token = kv.token if token == "TOKEN" else token
        for address in addresses:
            status, answer = raw(address, method, path, body, token)
            assert status == expected, f"{what} to {address}: {status} {answer}"
    assert {a: i.digest for a, i in kv.shard_infos(0).items()} == before
    assert kv.get(b"k") == b"original"


def test_cli_put_get_delete_verify(cluster) -> None:
    kv = start(cluster, agents=AGENTS[:2], shards=4, replicas=2)
    cli_ok(cluster, "put", "greeting", "hello world")
    assert cli_ok(cluster, "get", "greeting") == "hello world\n"
    cli_ok(cluster, "delete", "greeting")
    missing = cluster.cli("get", "greeting")
    assert missing.returncode == 1 and missing.stdout == ""
    assert "not found" in missing.stderr
    assert "4 shards verified" in cli_ok(cluster, "verify")
    # Arguments that are not UTF-8 (here the byte 0xff) are stored as the bytes given.
    cli_ok(cluster, "put", "\udcff-key", "\udcfe")
    assert kv.get(b"\xff-key") == b"\xfe"
    wrong = cluster.cli("get", "greeting", env={"SHARDKEEPER_TOKEN": "wrong", "PATH": ""})
    assert wrong.returncode == 1 and "401" in wrong.stderr


def test_agent_back_from_lost_serves_nothing_until_it_has_a_plan(cluster) -> None:
    kv = start(cluster, shards=8)
    shard = 2
    key = next(k for k in (f"stale-{i}".encode() for i in range(10**6))
               if kv.shard_of(k) == shard)
    kv.put(key, b"old")
    victim = primary_of(cluster, shard)
    address = kv.routing().addresses[victim]
    freeze(cluster, victim)
    survivors = set(AGENTS) - {victim}
    poll_until(lambda: cluster.settled(survivors), 60,
        "the cluster re-homes the frozen agent's replicas")
    assert victim not in cluster.plan().agents, "a departed agent holding nothing has no plan"
    kv.put(key, b"new")
    # No leader: nobody writes the returning agent a plan.
    assert cluster.procs["coord-1"].term() == 0
    no_plan = "serving nothing until the leader"
    seen = cluster.procs[victim].output().count(no_plan)  # a fresh agent logs it too
    cluster.procs[victim].cont()
    poll_until(lambda: victim in cluster.members(), 30, "the agent registers again")

    def read_old_value() -> tuple[int, dict]:
        return raw(address, "GET", key_path(shard, key), token=kv.token)

    poll_until(lambda: cluster.procs[victim].output().count(no_plan) > seen
             or read_old_value()[0] == 200, 10, "the agent finds it has no plan")
    status, body = read_old_value()
    assert (status, body.get("error")) == (503, "not_serving"), f"served stale data: {body}"
    assert raw(address, "GET", "/readyz", token=None)[0] == 503
    assert shard in StoreSet(cluster.workdir / victim / "shards").on_disk(), "data kept"
    cluster.start_coordinator("coord-1", session_timeout=SESSION)
    poll_until(lambda: cluster.settled(set(AGENTS)), 60,
        "a new leader places shards on the returning agent again")
    assert kv.get(key) == b"new"
    assert "every replica's digest is equal" in cli_ok(cluster, "verify")


class LateWrites:
    """PUTs sent to a frozen agent on connections it accepted (and kept alive) before it
    froze: on SIGCONT their handler threads wake with the request already in hand, racing
    the agent's discovery that its ZooKeeper session is gone."""

    def __init__(self, address: str, token: str, n: int):
        host, _, port = address.rpartition(":")
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.conns = [http.client.HTTPConnection(host, int(port), timeout=60) for _ in range(n)]
        for conn in self.conns:
            conn.request("GET", "/healthz", headers=self.headers)
            conn.getresponse().read()
        self.answers: list[tuple[int, dict]] = []
        self.threads: list[threading.Thread] = []

    def send(self, shard: int, keys: list[bytes], value: bytes) -> None:
        def put(conn: http.client.HTTPConnection, key: bytes) -> None:
            body = json.dumps({"value": b64(value)}).encode()
            conn.request("PUT", key_path(shard, key), body=body, headers=self.headers)
            response = conn.getresponse()
            self.answers.append((response.status, json.loads(response.read() or b"{}")))
            conn.close()

        for conn, key in zip(self.conns, keys, strict=True):
            thread = threading.Thread(target=put, args=(conn, key), daemon=True)
            thread.start()
            self.threads.append(thread)

    def join(self) -> list[tuple[int, dict]]:
        for thread in self.threads:
            thread.join(30)
        return self.answers


def test_demoted_primary_keeps_its_shard_and_repairs_what_it_alone_applied(cluster) -> None:
    kv = start(cluster, shards=8)
    # The frozen agent's replicas wait for it instead of moving: it gets its shards back.
    cli_ok(cluster, "config", "set", "rebalance_delay=600", "max_moves_per_agent=16")
    shard = 5
    keys = (k for k in (f"demoted-{i}".encode() for i in range(10**6)) if kv.shard_of(k) == shard)
    key, orphans = next(keys), [next(keys) for _ in range(8)]
    kv.put(key, b"before")
    victim = primary_of(cluster, shard)
    late = LateWrites(kv.routing().addresses[victim], kv.token, len(orphans))
    freeze(cluster, victim)
    late.send(shard, orphans, b"unacknowledged")
    survivors = set(AGENTS) - {victim}
    poll_until(lambda: cluster.settled(survivors) and primary_of(cluster, shard) != victim, 60,
        "the shard fails over; its replicas wait for the frozen agent")
    kv.put(key, b"after")
    thawed_at = len(cluster.procs[victim].output())
    cluster.procs[victim].cont()
    answers = late.join()
    # "replication_failed": it applied the row, then every forward was refused (fenced).
    alone = sum(1 for _, body in answers if body.get("error") == "replication_failed")
    seen = sorted(f"{status} {body.get('error')}" for status, body in answers)
    print(f"\nwrites held by the frozen primary: {seen}")
    assert len(answers) == len(orphans) and all(status != 200 for status, _ in answers)
    poll_until(lambda: cluster.settled(set(AGENTS))
             and all(len(r) == 3 for r in cluster.plan().routing), 60,
                 "the thawed agent takes its replicas back")
    assert victim in cluster.plan().routing[shard]
    since = cluster.procs[victim].output()[thawed_at:]
    assert f"shard {shard}: PRIMARY -> REPLICA" in since, "demoted in place, data kept"
    assert f"shard {shard}: PRIMARY -> DROPPING" not in since
    assert f"shard {shard}: OFFLINE -> BOOTSTRAPPING" not in since, "repaired, not re-copied"
    assert "every replica's digest is equal" in cli_ok(cluster, "verify")
    assert kv.get(key) == b"after"
    assert all(kv.get(k) is None for k in orphans), "unacknowledged rows it alone held survived"
    print(f"{alone} rows only the demoted primary held were repaired away")


def test_replica_back_from_a_lost_session_catches_up_before_it_counts(cluster) -> None:
    kv = start(cluster, shards=8)
    # The frozen agent's replicas wait for it: when it returns it holds its old data and is
    # listed as copying again. It must catch up before it counts as in sync, so `verify`
    # agrees the moment the cluster has converged, with no write after its return.
    cli_ok(cluster, "config", "set", "rebalance_delay=600", "max_moves_per_agent=16")
    plan = cluster.plan()
    victim = "agent-3"
    followed = [s for s, holders in enumerate(plan.routing) if victim in holders[1:]]
    assert followed, "the victim follows some primary"
    freeze(cluster, victim)
    survivors = set(AGENTS) - {victim}
    poll_until(lambda: cluster.settled(survivors), 60,
        "the shards fail over without the frozen agent")
    missed: dict[bytes, bytes] = {}
    for shard in followed:
        keys = (k for k in (f"missed-{shard}-{i}".encode() for i in range(10**6))
                if kv.shard_of(k) == shard)
        for _ in range(25):
            key = next(keys)
            kv.put(key, b"written while it was away")
            missed[key] = b"written while it was away"
    thawed_at = len(cluster.procs[victim].output())
    cluster.procs[victim].cont()
    poll_until(lambda: cluster.settled(set(AGENTS))
             and all(len(r) == 3 for r in cluster.plan().routing), 60,
                 "the thawed agent catches up and is counted in sync again")
    since = cluster.procs[victim].output()[thawed_at:]
    assert "session lost" in since
    assert all(victim in cluster.plan().routing[s] for s in followed), "it kept its replicas"
    for shard in followed:
        assert f"shard {shard}: REPLICA -> DROPPING" not in since, "caught up, not re-copied"
    verified = cluster.cli("verify", timeout=120)
    assert verified.returncode == 0, f"replicas differ with no write since the return:\n" \
        f"{verified.stdout}{verified.stderr}"
    assert_all_readable(kv, missed)


def test_replica_that_skipped_plans_fences_at_the_primarys_term(cluster) -> None:
    """A replica frozen (within its session) while the primary fails over and the plan
    moves on reads only the latest plan: it must fence at the new primary's term, not at
    the generation it read, or it refuses every forward and the shard takes no writes."""
    cluster.init(8, 3)
    cluster.start_coordinator("coord-1", session_timeout=SESSION)
    for name in ("agent-1", "agent-2"):
        cluster.start_agent(name, session_timeout=SESSION)
    cluster.start_agent("agent-3", session_timeout=30.0)  # outlives its freeze
    agents = {"agent-1", "agent-2", "agent-3"}
    poll_until(lambda: cluster.settled(agents), 30, "initial convergence")
    kv = DataClient(cluster.client, cluster.paths, deadline=20.0)
    # A shard that agent-3 follows last: the failover promotes the other survivor.
    shard = next(s for s, r in enumerate(cluster.plan().routing) if r[2] == "agent-3")
    old_primary, new_primary, _ = cluster.plan().routing[shard]
    key = next(k for k in (f"term-{i}".encode() for i in range(10**6)) if kv.shard_of(k) == shard)
    kv.put(key, b"before")
    term_before = cluster.plan().shards[shard].term
    freeze(cluster, "agent-3")
    cluster.procs[old_primary].kill()
    poll_until(lambda: primary_of(cluster, shard) == new_primary, 30,
               f"shard {shard} fails over to {new_primary}")
    failover = cluster.plan().generation
    # More plans that change agent-3's assignment, while it cannot read them.
    cluster.start_agent("agent-4", session_timeout=SESSION)
    poll_until(lambda: cluster.plan().agents["agent-3"].generation > failover, 30,
        "agent-3's plan changes again after the failover")
    term = cluster.plan().shards[shard].term
    assert term_before < term <= failover
    cluster.procs["agent-3"].cont()
    live = {"agent-3", "agent-4", new_primary}
    poll_until(lambda: cluster.settled(live), 60, "the cluster settles")
    kv.put(key, b"after")  # forwarded to every in-sync replica, agent-3 included if held
    assert kv.get(key) == b"after"
    assert "every replica's digest is equal" in cli_ok(cluster, "verify")


def test_agent_start_survives_a_connection_loss(cluster, monkeypatch, tmp_path) -> None:
    from kazoo.exceptions import ConnectionLoss

    from agents.runtime import Agent

    cluster.init(4, 1)
    agent = Agent(cluster.target, cluster.name, "agent-x", address="127.0.0.1:1",
                  data_dir=tmp_path / "agent-x", session_timeout=SESSION)
    real = agent.read_token
    failures = iter([ConnectionLoss()])

    def flaky_read_token() -> str:
        for exc in failures:
            raise exc
        return real()

    monkeypatch.setattr(agent, "read_token", flaky_read_token)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        poll_until(lambda: "agent-x" in cluster.members(), 20,
            "the agent registers after retrying its start-up")
    finally:
        agent.stop()
        thread.join(10)
    assert not thread.is_alive()
