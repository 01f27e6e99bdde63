"""Issue 12, the agent's part: /healthz, /readyz and /metrics on the data-plane port, without
a token and without a key, value or secret in them; requests counted by route template."""

from __future__ import annotations

import http.client
import random

from prometheus_client.parser import text_string_to_metric_families

from agents.dataplane.repair import copy_shard
from agents.shardsm import ShardState
from shardkeeper.peer import PeerClient
from shardkeeper.wire import key_path, shard_path
from tests import dataplane_support
from tests.dataplane_support import PEER_TOKEN, SHARD, TOKEN, follow, lead, load, raw

cluster = dataplane_support.cluster
trio = dataplane_support.trio

ROUTES = {"keys", "batch", "replicate", "rows", "snapshot", "digest", "repair", "healthz",
          "readyz", "metrics", "other"}


def scrape(address: str) -> tuple[str, dict[tuple[str, tuple], float]]:
    """The /metrics text, fetched without a token, and its samples by (name, labels)."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    assert response.status == 200 and response.getheader("Content-Type").startswith(
        "text/plain")
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def requests_counted(samples: dict, route: str, code: int) -> float:
    key = ("shardkeeper_dataplane_requests_total", (("code", str(code)), ("route", route)))
    return samples.get(key, 0.0)


def test_health_and_readiness_need_no_token_and_follow_the_runtime(cluster, trio):
    p, *_ = trio
    assert raw(p.address, "GET", "/healthz", token=None)[:2] == (
        200, {"status": "ok", "serving": True, "writable": True, "shards": 1})
    assert raw(p.address, "GET", "/readyz", token=None)[:2] == (
        503, {"status": "not_ready", "error": "not_ready",
              "reason": "the agent has not read its plan yet"})
    p.plane.metrics.ready(True)
    assert raw(p.address, "GET", "/readyz", token=None)[:2] == (200, {"status": "ready"})
    p.plane.metrics.ready(False, "no plan read in this ZooKeeper session yet")
    status, body, _ = raw(p.address, "GET", "/readyz", token="anything")
    assert (status, body["reason"]) == (503, "no plan read in this ZooKeeper session yet")
    for path in ("/healthz", "/readyz", "/metrics"):
        status, body, headers = raw(p.address, "POST", path, b"", token=None)
        assert (status, body["error"], headers["Allow"]) == (405, "method_not_allowed", "GET")
        assert raw(p.address, "GET", path, b"{}", token=None)[0] == 400


def test_requests_are_counted_by_route_template_and_code(cluster, trio):
    p, r1, _ = trio
    _, before = scrape(p.address)
    for i in range(5):
        cluster.client.put(p.address, SHARD, f"k{i}".encode(), b"v")
    cluster.client.get(p.address, SHARD, b"k1")
    raw(p.address, "GET", key_path(SHARD, b"k1"), token="wrong")
    raw(p.address, "GET", shard_path(SHARD, "rows"), token=TOKEN)
    rng = random.Random(5)
    for _ in range(40):  # every odd path counts under one label value
        raw(p.address, "GET", "/" + "/".join(str(rng.randrange(10**6)) for _ in range(3)))
    _, after = scrape(p.address)

    def delta(route: str, code: int) -> float:
        return requests_counted(after, route, code) - requests_counted(before, route, code)

    assert (delta("keys", 200), delta("keys", 401), delta("rows", 403)) == (6, 1, 1)
    assert delta("other", 404) == 40 and delta("metrics", 200) == 1
    routes = {dict(labels)["route"] for name, labels in after
              if name == "shardkeeper_dataplane_requests_total"}
    assert routes <= ROUTES
    seconds = sum(v for (name, labels), v in after.items()
                  if name == "shardkeeper_dataplane_request_seconds_count"
                  and dict(labels)["route"] == "keys")
    assert seconds == sum(v for (name, labels), v in after.items()
                          if name == "shardkeeper_dataplane_requests_total"
                          and dict(labels)["route"] == "keys")
    # The replica counted the forwards it took, with the peer token.
    _, replica = scrape(r1.address)
    assert requests_counted(replica, "replicate", 200) == 5


def test_metrics_reveal_no_key_value_or_token(cluster, trio):
    p, *_ = trio
    cluster.client.put(p.address, SHARD, b"secret-key", b"secret-value")
    raw(p.address, "GET", key_path(SHARD, b"secret-key"), token="a-guessed-token")
    text, _ = scrape(p.address)
    for secret in ("secret-key", "secret-value", TOKEN, PEER_TOKEN, "a-guessed-token",
                   "c2VjcmV0"):  # base64 of "secret"
        assert secret not in text


def test_the_runtime_feeds_replicas_and_zookeeper_state(cluster, trio):
    p, *_ = trio
    p.plane.metrics.replicas({"PRIMARY": 3, "REPLICA": 5})
    p.plane.metrics.zk_connected(True)
    _, samples = scrape(p.address)
    by_state = {dict(labels)["state"]: v for (name, labels), v in samples.items()
                if name == "shardkeeper_replicas"}
    assert by_state["PRIMARY"] == 3 and by_state["REPLICA"] == 5
    assert set(by_state) >= {str(s) for s in ShardState}
    assert sum(by_state.values()) == 8, "states not named are 0"
    assert samples[("shardkeeper_zk_connected", ())] == 1
    p.plane.metrics.replicas({"REPLICA": 1})
    p.plane.metrics.zk_connected(False)
    _, samples = scrape(p.address)
    assert samples[("shardkeeper_replicas", (("state", "PRIMARY"),))] == 0
    assert samples[("shardkeeper_zk_connected", ())] == 0
    # And what the server knows of itself.
    assert samples[("shardkeeper_dataplane_connections", ())] >= 1
    assert samples[("shardkeeper_dataplane_busy_workers", (("lane", "peer"),))] == 0


def test_bootstrap_bytes_count_the_image_and_the_rows_a_copy_downloads(cluster, trio):
    p, *_ = trio
    load(cluster.client, p, 1_000, batch=250)  # small calls: within the client's time-out
    new = cluster.start("new")
    follow(new, p, 1, state=ShardState.BOOTSTRAPPING)
    lead(p, 1, in_sync=trio[1:], bootstrapping=(new,))
    client = PeerClient(PEER_TOKEN, on_download=new.plane.metrics.downloaded)
    result = copy_shard(new.store, SHARD, p.address, client,
                        image_path=new.stores.incoming_path(SHARD))
    new.store.set_meta("bootstrap_cursor", 0)  # and once more, row by row
    copy_shard(new.store, SHARD, p.address, client, page_size=500)
    _, samples = scrape(new.address)
    snapshot = samples[("shardkeeper_bootstrap_bytes_total", (("kind", "snapshot"),))]
    rows = samples[("shardkeeper_bootstrap_bytes_total", (("kind", "rows"),))]
    assert snapshot == result.image_bytes > 0
    assert rows > 1_000 * len(b"k000000v0"), "every row's key and value came as rows pages"
    _, source = scrape(p.address)  # each agent has a registry of its own
    assert source[("shardkeeper_bootstrap_bytes_total", (("kind", "snapshot"),))] == 0
