"""`coordinator run --http` against a real ZooKeeper with real processes: the API documents
are the CLI's, readiness follows leadership and ZooKeeper, nothing reveals the token, a
bad address fails at once; and the server's own mechanics (cache, worker cap, routes) on
an in-process server."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.http import PAGE_POLICY, ClusterReader, StatusApp, StatusServer
from coordinator.metrics import LEADER_GAUGES, CoordinatorMetrics
from shardkeeper.poll import poll_until
from tests.harness import Cluster, fetch

# Sessions of 3 s, not the harness's 1 s: on a loaded machine a 1 s session can expire and
# move leadership or membership in the middle of an assertion about them.
SESSION = 3.0
ROUTES = ("", "api/status", "api/shards", "api/events?limit=1000", "metrics", "healthz",
          "readyz")


def metrics(url: str) -> dict[str, float]:
    """The unlabelled samples of /metrics."""
    reply = fetch(url + "metrics")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
    return {s.name: s.value for f in text_string_to_metric_families(reply.body.decode())
            for s in f.samples if not s.labels}


def readyz(url: str) -> tuple[int, str]:
    reply = fetch(url + "readyz")
    return reply.status, json.loads(reply.body)["reason"]


def api(url: str, path: str) -> Any:
    reply = fetch(url + path)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "application/json"
    return json.loads(reply.body)


def cli_json(c: Cluster, *args: str) -> Any:
    r = c.cli(*args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def one_line_error(r: Any) -> str:
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def secrets(c: Cluster) -> list[str]:
    """Every secret string of the cluster's token znode (one token, or a JSON of several)."""
    raw = c.client.get(c.paths.token)[0].decode()
    try:
        found = json.loads(raw)
    except ValueError:
        return [raw]
    values = found.values() if isinstance(found, dict) else [found]
    return [v for v in values if isinstance(v, str) and len(v) >= 16] or [raw]


def test_the_api_serves_the_cli_documents_and_never_the_token(cluster: Cluster) -> None:
    cluster.init(16, 2)
    coordinator = cluster.start_coordinator("coord-1", SESSION, http="127.0.0.1:0")
    agents = {"agent-1", "agent-2"}
    for name in sorted(agents):
        cluster.start_agent(name, SESSION)
    url = coordinator.http_url()
    poll_until(lambda: cluster.settled(agents), 30, "a settled plan")
    # The same document as `status --json` (read a moment apart: polled until both agree).
    poll_until(lambda: api(url, "api/status") == cli_json(cluster, "status", "--json"), 20,
               "/api/status to equal `status --json`")
    status = api(url, "api/status")
    assert status["leader"] == "coord-1" and {m["id"] for m in status["members"]} == agents
    shards = api(url, "api/shards")
    listed = cli_json(cluster, "shards", "--json")
    assert shards["generation"] == listed["generation"] == status["generation"]
    assert [{"shard": r["shard"], "replicas": r["replicas"]} for r in shards["shards"]] == (
        listed["shards"])
    assert all(r["copying"] == [] for r in shards["shards"]), "settled: nothing copying"
    assert shards["down"] == {}
    last = [json.loads(line) for line in cluster.cli("events", "--json", "--limit", "3")
            .stdout.splitlines()]
    assert len(last) == 3
    poll_until(lambda: api(url, "api/events?limit=3")["events"] == last, 5,
               "the last 3 events as `events --json --limit 3`")
    everything = api(url, "api/events?limit=1000")["events"]
    assert everything[-3:] == last and len(everything) > 3
    for path in ROUTES:
        body = fetch(url + path).body.decode()
        for secret in secrets(cluster):
            assert secret not in body, f"/{path} reveals the token"


def test_readiness_and_leader_metrics_follow_leadership(cluster: Cluster) -> None:
    cluster.init(8, 1)
    first = cluster.start_coordinator("coord-1", SESSION, http="127.0.0.1:0")
    poll_until(lambda: cluster.leader() == "coord-1", 30, "coord-1 to lead")
    second = cluster.start_coordinator("coord-2", SESSION, http="127.0.0.1:0")
    leader, standby = first.http_url(), second.http_url()
    poll_until(lambda: readyz(standby)[0] == 200, 30, "the standby to be ready")
    assert "standby" in readyz(standby)[1]
    # A leader without members has no plan to run the cluster by: not ready.
    status, reason = readyz(leader)
    assert status == 503 and "no plan committed" in reason, reason
    assert metrics(leader)["shardkeeper_is_leader"] == 1
    assert metrics(leader)["shardkeeper_ready"] == 0
    cluster.start_agent("agent-1", SESSION)
    poll_until(lambda: cluster.settled({"agent-1"}), 30, "a plan")
    generation = cluster.plan().generation
    poll_until(lambda: readyz(leader)[0] == 200, 20, "the leader to be ready")
    seen = poll_until(lambda: (m := metrics(leader)).get("shardkeeper_plan_generation")
                      == generation and m, 20, "the leader's gauges")
    assert seen["shardkeeper_members"] == 1 and seen["shardkeeper_shards"] == 8
    assert seen["shardkeeper_under_replicated_shards"] == 0
    assert seen["shardkeeper_leader_epoch"] == cluster.epoch()
    assert seen["shardkeeper_plan_writes_total"] >= 1
    assert api(standby, "api/status")["generation"] == generation, "standbys serve it too"
    at_standby = metrics(standby)
    assert at_standby["shardkeeper_is_leader"] == 0 and at_standby["shardkeeper_ready"] == 1
    assert not set(LEADER_GAUGES) & set(at_standby), "only the leader exports cluster gauges"
    first.kill()
    poll_until(lambda: metrics(standby)["shardkeeper_is_leader"] == 1, 30, "coord-2 to lead")
    poll_until(lambda: readyz(standby)[0] == 200, 20, "the new leader to be ready")
    assert "leader" in readyz(standby)[1]
    # Nothing changed, so the new leader wrote no plan: it is ready with the plan in force.
    assert cluster.plan().generation == generation
    assert metrics(standby)["shardkeeper_plan_generation"] == generation


def test_without_zookeeper_a_coordinator_is_alive_and_not_ready(tmp_path: Path) -> None:
    with socket.socket() as hole:  # bound, never listening: connections are refused
        hole.bind(("127.0.0.1", 0))
        c = Cluster(f"127.0.0.1:{hole.getsockname()[1]}", tmp_path)
        try:
            url = c.start_coordinator("coord-1", http="127.0.0.1:0").http_url()
            assert fetch(url + "healthz").status == 200
            status, reason = readyz(url)
            assert status == 503 and "not connected to ZooKeeper" in reason
            reply = fetch(url + "api/status")
            assert reply.status == 503 and "cannot reach ZooKeeper" in json.loads(reply.body)[
                "error"]
            seen = metrics(url)
            assert (seen["shardkeeper_zk_connected"], seen["shardkeeper_ready"]) == (0, 0)
        finally:
            c.close()


def test_a_bad_http_address_fails_at_once_in_one_line(cluster: Cluster) -> None:
    r = cluster.cli("coordinator", "run", "--http", "127.0.0.1:http", timeout=30)
    assert r.returncode == 2 and "--http: bad port" in one_line_error(r)
    r = cluster.cli("coordinator", "run", env=cluster.env({"SHARDKEEPER_HTTP": "[::1"}),
                    timeout=30)
    assert r.returncode == 2 and "--http: unbalanced" in one_line_error(r)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = cluster.cli("coordinator", "run", "--http",
                        f"127.0.0.1:{taken.getsockname()[1]}", timeout=30)
    assert r.returncode == 1 and "Address already in use" in one_line_error(r)


# -- the server itself, in this process, on the test's ZooKeeper --------------------------

@pytest.fixture()
def server(cluster: Cluster) -> Any:
    s = StatusServer("127.0.0.1", 0, CoordinatorMetrics(),
                     ClusterReader(cluster.target, cluster.paths), workers=2).start()
    try:
        yield s
    finally:
        s.stop()


def test_routes_methods_and_errors(cluster: Cluster, server: StatusServer) -> None:
    url = f"http://{server.address}/"
    reply = fetch(url + "api/status")
    assert reply.status == 503 and "no config" in json.loads(reply.body)["error"]
    cluster.init(4, 1)
    poll_until(lambda: fetch(url + "api/status").status == 200, 5, "the cache to expire")
    page = fetch(url)
    assert page.status == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"] == PAGE_POLICY
    assert b"api/status" in page.body
    head = fetch(url + "healthz", method="HEAD")
    assert head.status == 200 and head.body == b"" and int(head.headers["content-length"]) > 0
    missing = fetch(url + "nope")
    assert missing.status == 404 and "/api/status" in json.loads(missing.body)["routes"]
    posted = fetch(url + "api/status", method="POST")
    assert posted.status == 405 and posted.headers["allow"] == "GET, HEAD"
    for limit in ("0", "1001", "x", "-1"):
        assert fetch(url + f"api/events?limit={limit}").status == 400, limit
    assert api(url, "api/events")["events"] == [], "no leader yet: an empty log"
    counts = {(dict(s.labels)["route"], dict(s.labels)["code"]): s.value
              for f in text_string_to_metric_families(fetch(url + "metrics").body.decode())
              for s in f.samples if s.name == "shardkeeper_http_requests_total"}
    assert counts[("other", "404")] == 1 and counts[("other", "405")] == 1
    assert counts[("/api/events", "400")] == 4


def test_many_requests_read_zookeeper_once_per_period(cluster: Cluster,
                                                      server: StatusServer) -> None:
    cluster.init(4, 1)
    url = f"http://{server.address}/"
    started = time.monotonic()
    replies: list[int] = []

    def tab() -> None:
        for _ in range(15):
            replies.append(fetch(url + "api/status").status)

    tabs = [threading.Thread(target=tab) for _ in range(4)]
    for t in tabs:
        t.start()
    for t in tabs:
        t.join(60)
    elapsed = time.monotonic() - started
    assert replies == [200] * 60
    # One read per 0.5 s period at most (plus the one in progress at the end).
    assert server.reader.reads <= int(elapsed / 0.5) + 2, (server.reader.reads, elapsed)
    assert server.reader.reads < 60


def test_the_worker_cap_holds_requests_until_a_worker_is_free(server: StatusServer) -> None:
    url = f"http://{server.address}/"
    host, port = server.address.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port))) for _ in range(2)]  # both workers
    answered: list[int] = []
    waiting = threading.Thread(target=lambda: answered.append(fetch(url + "healthz").status))
    waiting.start()
    waiting.join(0.5)
    assert answered == [], "answered while every worker was held"
    idle[0].close()  # that worker sees the connection end and is free again
    waiting.join(10)
    assert answered == [200]
    idle[1].close()


def test_the_page_is_self_contained() -> None:
    """No CDN, font or image from elsewhere: the page works offline (the CSP enforces it
    in the browser; this reads the file)."""
    page = StatusApp(CoordinatorMetrics(), None).page.decode()  # type: ignore[arg-type]
    for needle in ("src=", "@import", "url(", "<link rel=\"stylesheet", "//cdn"):
        assert needle not in page, needle
    for link in (p.split('"')[0] for p in page.split('href="')[1:]):
        assert link.startswith("data:"), link
    addresses = {w.strip("\"'`;,)") for w in page.split() if "://" in w}
    assert addresses <= {"http://www.w3.org/2000/svg"}, addresses  # the SVG namespace
