"""The status page in headless Chromium: against a real running cluster (an agent killed,
the page shows it down and then the new assignment), and against canned documents that
exercise every part of the page (copies, down members, alerts, events, a failing API).

Skipped only when chromium is missing and SHARDKEEPER_REQUIRE_BROWSER is not set (.ci/run
installs chromium and sets it)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from coordinator.http import StatusApp
from coordinator.metrics import CoordinatorMetrics
from shardkeeper.plan import PlanState
from shardkeeper.poll import TimedOut, poll_until
from tests.browser import PAGE_STATE, Browser, chromium_or_skip
from tests.harness import Cluster


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(chromium_or_skip(), tmp_path / "chromium")
    try:
        yield b
    finally:
        b.close()


def wait_page(b: Browser, condition: Callable[[dict[str, Any]], bool], timeout: float,
              what: str, shot: Path) -> dict[str, Any]:
    """Poll what the page shows until ``condition`` holds; on time-out, fail with the last
    state and leave a screenshot."""
    last: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        last.update(b.eval(PAGE_STATE))
        return dict(last) if condition(last) else None

    try:
        return poll_until(check, timeout, what, interval=0.1)
    except TimedOut as e:
        b.screenshot(shot)
        shown = {k: v for k, v in last.items() if k != "text"}
        raise AssertionError(f"{e}; the page shows {shown} (screenshot {shot})") from None


def shows_plan(page: dict[str, Any], plan: PlanState) -> bool:
    """The page's ring is exactly ``plan``: per shard its in-sync replicas, primary first."""
    return page["generation"] == str(plan.generation) and page["ring"] == {
        str(shard): list(replicas) for shard, replicas in enumerate(plan.routing)}


def test_the_page_shows_a_killed_agent_down_then_the_new_assignment(
        browser: Browser, cluster: Cluster, tmp_path: Path) -> None:
    cluster.init(16, 2)
    # Sessions of 3 s: on a loaded machine a 1 s session may expire and take a member away
    # mid-test; agent-3's death is seen at once anyway (its liveness link closes).
    coordinator = cluster.start_coordinator("coord-1", 3.0, http="127.0.0.1:0")
    agents = {name: cluster.start_agent(name, 3.0) for name in ("agent-1", "agent-2", "agent-3")}
    url = coordinator.http_url()
    poll_until(lambda: cluster.settled(set(agents)), 30, "the first plan, settled")
    before = cluster.plan()
    browser.goto(url)
    wait_page(browser, lambda p: shows_plan(p, before) and [m["state"] for m in
              p["members"].values()] == ["active"] * 3, 15, "the settled cluster",
              tmp_path / "before.png")

    agents["agent-3"].kill()
    page = wait_page(browser, lambda p: p["members"].get("agent-3", {}).get("state") == "down"
                     and p["down"] == ["agent-3"], 15, "agent-3 shown down", tmp_path / "down.png")
    assert page["error"] == ""

    poll_until(lambda: cluster.settled({"agent-1", "agent-2"}), 30, "agent-3's replicas re-homed")
    after = cluster.plan()
    assert after.generation > before.generation
    page = wait_page(browser, lambda p: shows_plan(p, after), 20, "the new assignment",
                     tmp_path / "after.png")
    assert not any("agent-3" in replicas for replicas in page["ring"].values())
    held = Counter(agent for replicas in after.routing for agent in replicas)
    assert {a: m["replicas"] for a, m in page["members"].items()} == {
        "agent-1": held["agent-1"], "agent-2": held["agent-2"], "agent-3": 0}
    assert page["members"]["agent-3"]["state"] == "down", "still shown down"
    assert any("member-left" in e and "agent-3" in e for e in page["events"])


# -- every part of the page, from canned documents -------------------------------------------

NOW = time.time()
STATUS = {
    "cluster": "canned", "leader": "coord-1", "epoch": 3, "generation": 7, "shards": 6,
    "replicas": 2, "under_replicated": 2, "shortfall": 0, "unavailable": 1, "balance": 1.2,
    "moves": {"in_flight": 2, "deferred": 1}, "draining": ["agent-2"],
    "maintenance": {"reason": "manual", "since": NOW - 60, "note": "kernel <b>upgrade</b>",
                    "missing": []},
    "members": [
        {"id": "agent-1", "address": "127.0.0.1:1", "zone": "a", "weight": 1.0, "replicas": 5,
         "primaries": 3, "copying": 1, "applied_generation": 7, "held": 4, "catching_up": 0,
         "state": "active"},
        {"id": "agent-2", "address": "127.0.0.1:2", "zone": "b", "weight": 1.0, "replicas": 4,
         "primaries": 1, "copying": 1, "applied_generation": 7, "held": 3, "catching_up": 1,
         "state": "draining"},
        # The shape the CLI gives a departed member.
        {"id": "agent-3", "address": "127.0.0.1:3", "zone": "c", "weight": 1.0, "replicas": 0,
         "primaries": 0, "copying": 0, "applied_generation": None, "held": 0,
         "catching_up": 0, "state": "down", "down_since": NOW - 30},
    ],
}
SHARDS = {
    "generation": 7,
    "down": {"agent-3": NOW - 30, "agent-4": NOW - 90},  # agent-4: only the leader's record
    "shards": [
        {"shard": 0, "replicas": ["agent-1", "agent-2"], "copying": []},
        {"shard": 1, "replicas": ["agent-2"],
         "copying": [{"agent": "agent-1", "source": "agent-2"}]},
        {"shard": 2, "replicas": [], "copying": []},
        {"shard": 3, "replicas": ["agent-1", "agent-3"], "copying": []},
        {"shard": 4, "replicas": ["agent-1", "agent-2"],
         "copying": [{"agent": "agent-2", "source": "agent-1"}]},
        {"shard": 5, "replicas": ["agent-2", "agent-1"], "copying": []},
    ],
}
EVENTS = {"events": [
    {"time": NOW - 90, "kind": "member-left", "message": "agent-4 left", "generation": 6},
    {"time": NOW - 30, "kind": "plan",
     "message": "generation 7: <script>window.injected = 1</script>", "generation": 7},
]}


class Canned:
    """Serves the real page and canned API documents; ``failing`` answers api/status 503."""

    def __init__(self, status: dict[str, Any] = STATUS, shards: dict[str, Any] = SHARDS
                 ) -> None:
        self.docs = {"/api/status": status, "/api/shards": shards, "/api/events": EVENTS}
        self.failing = False
        self.hits: Counter[str] = Counter()
        page = StatusApp(CoordinatorMetrics(), None).page  # type: ignore[arg-type]
        canned = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                canned.hits[path] += 1
                if path == "/":
                    self._send(200, "text/html; charset=utf-8", page)
                elif path == "/api/status" and canned.failing:
                    self._send(503, "application/json",
                               b'{"error": "cannot reach ZooKeeper (canned)"}')
                elif path in canned.docs:
                    self._send(200, "application/json", json.dumps(canned.docs[path]).encode())
                else:
                    self._send(404, "application/json", b'{"error": "not found"}')

            def _send(self, status: int, kind: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_page_draws_every_part_of_the_documents(browser: Browser, tmp_path: Path) -> None:
    canned = Canned()
    try:
        browser.goto(canned.url)
        page = wait_page(browser, lambda p: p["generation"] == "7", 10, "the canned documents",
                         tmp_path / "canned.png")
        assert page["ring"] == {str(r["shard"]): r["replicas"] for r in SHARDS["shards"]}
        assert browser.eval("document.querySelectorAll('#ring path.arc.missing').length") == 3
        assert browser.eval("[...document.querySelectorAll('#ring path.arc.down')]"
                            ".map(p => p.dataset.shard)") == ["3"], "agent-3's arc, shown down"
        assert sorted(page["copies"]) == [[1, "agent-1", "agent-2"], [4, "agent-2", "agent-1"]]
        assert page["copyList"] == ["shard 1: agent-1 copying from agent-2",
                                    "shard 4: agent-2 copying from agent-1"]
        assert {a: m["state"] for a, m in page["members"].items()} == {
            "agent-1": "active", "agent-2": "draining", "agent-3": "down", "agent-4": "down"}
        assert page["down"] == ["agent-3", "agent-4"]
        alerts = " | ".join(page["alerts"])
        assert "UNAVAILABLE: 1 shards" in alerts and "kernel <b>upgrade</b>" in alerts
        assert "2 shards under-replicated" in alerts
        # Newest first; markup in a message is shown as text, never run.
        assert "plan" in page["events"][0] and "<script>" in page["events"][0]
        assert "member-left" in page["events"][1]
        assert browser.eval("window.injected === undefined")
        bars = browser.eval("[...document.querySelectorAll('tr[data-member=\"agent-1\"] .bar"
                            " span')].map(s => s.style.width)")
        assert bars[:3] == ["60%", "20%", "20%"], "primaries, other replicas, copying of 5"
        assert browser.eval("performance.getEntriesByType('resource')"
                            ".every(e => e.name.startsWith(location.origin))")
        assert canned.hits["/api/shards"] == 1, "shards are read again only on a new generation"

        canned.failing = True
        page = wait_page(browser, lambda p: "cannot reach ZooKeeper" in p["error"], 10,
                         "the error shown", tmp_path / "failing.png")
        assert page["generation"] == "7" and page["down"] == ["agent-3", "agent-4"], (
            "the last documents stay on screen")
        assert "stale: cannot reach ZooKeeper (canned)" in page["text"]

        canned.docs["/api/status"] = {**STATUS, "generation": 8}
        canned.docs["/api/shards"] = {**SHARDS, "generation": 8, "down": {}}
        canned.failing = False
        page = wait_page(browser, lambda p: p["generation"] == "8" and not p["error"], 10,
                         "recovery with a new generation", tmp_path / "recovered.png")
        assert page["down"] == ["agent-3"], "agent-4 no longer recorded down"
        assert canned.hits["/api/shards"] == 2
    finally:
        canned.close()


def test_a_large_cluster_draws_a_bounded_ring(browser: Browser, tmp_path: Path) -> None:
    """200,000 shards, R=3: 2,048 arcs per ring (each for 98 shards), drawn in time."""
    agents = [f"agent-{i}" for i in range(1, 301)]
    rows = [{"shard": s, "replicas": [agents[(s + k * 7) % 300] for k in range(3)],
             "copying": []} for s in range(200_000)]
    members = [{**STATUS["members"][0], "id": a, "state": "active"} for a in agents]
    status = {**STATUS, "shards": 200_000, "replicas": 3, "members": members, "generation": 9}
    canned = Canned(status, {"generation": 9, "down": {}, "shards": rows})
    try:
        browser.goto(canned.url)
        wait_page(browser, lambda p: p["generation"] == "9", 20, "the large documents",
                  tmp_path / "large.png")
        arcs = browser.eval("document.querySelectorAll('#ring path.arc').length")
        assert arcs == 3 * 2041, "ceil(200,000 / 2,048) = 98 shards an arc: 2,041 arcs a ring"
        assert "Each arc stands for 98 shards" in browser.eval("$('ring-note').textContent")
        assert browser.eval("document.querySelectorAll('#members tr').length") == 300
    finally:
        canned.close()
