"""One agent's Prometheus metrics and readiness, served on its data-plane port (issue 12).

Each ``PlaneMetrics`` has a ``CollectorRegistry`` of its own, not prometheus_client's global
one: tests (and an application embedding agents) run several agents in one process. The
data plane records its requests; the agent runtime feeds what only it knows through
``replicas``, ``zk_connected`` and ``ready``; copies record the bytes they download through
``downloaded`` (the agent's peer client calls it). Label values are bounded sets: the route
template and the status code of a request, never its path; a replica state. No metric
carries a key, a value or a token.

docs/dataplane.md lists every metric.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from agents.shardsm import ShardState

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Requests are answered in well under a millisecond when idle; forwards wait on replicas,
# and snapshots stream for seconds.
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)
DOWNLOADS = ("snapshot", "rows")


class PlaneMetrics:
    """The metrics of one agent, and whether it is ready."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._replicas = Gauge(
            "shardkeeper_replicas", "Shard replicas this agent holds, by local state.",
            ["state"], registry=self.registry)
        self._zk = Gauge(
            "shardkeeper_zk_connected",
            "1 while the agent's ZooKeeper connection is up (CONNECTED), else 0.",
            registry=self.registry)
        self._downloaded = Counter(
            "shardkeeper_bootstrap_bytes",
            "Bytes of shard data downloaded from peers to copy or catch up a replica, by kind:"
            " snapshot (store file images) or rows (rows pages).",
            ["kind"], registry=self.registry)
        self._requests = Counter(
            "shardkeeper_dataplane_requests",
            "Data-plane requests answered, by route template and HTTP status code.",
            ["route", "code"], registry=self.registry)
        self._seconds = Histogram(
            "shardkeeper_dataplane_request_seconds",
            "Time from a request's complete head to its answer handed to the kernel, by route.",
            ["route"], buckets=REQUEST_BUCKETS, registry=self.registry)
        self._refused = Counter(
            "shardkeeper_plans_refused",
            "Plan znode reads not acted on because they could not be trusted (forged,"
            " from an old epoch, uncommitted or older than the plan applied); every replica"
            " was kept.", registry=self.registry)
        self._ready_gauge = Gauge(
            "shardkeeper_ready", "1 while /readyz answers 200, else 0.", registry=self.registry)
        for state in ShardState:
            self._replicas.labels(str(state)).set(0)
        for kind in DOWNLOADS:
            self._downloaded.labels(kind)
        self._zk.set(0)
        self._lock = threading.Lock()
        self._ready = False
        self._reason = "the agent has not read its plan yet"
        # Label children looked up once: a request pays for two increments, not for lookups.
        self._children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    # -- what the runtime knows --------------------------------------------------------------

    def replicas(self, counts: Mapping[str, int]) -> None:
        """The agent's replicas by state (every state not named is set to 0)."""
        for state in {*map(str, ShardState), *counts}:
            self._replicas.labels(state).set(counts.get(state, 0))

    def plan_refused(self) -> None:
        self._refused.inc()

    def zk_connected(self, connected: bool) -> None:
        self._zk.set(1 if connected else 0)

    def ready(self, ready: bool, reason: str = "") -> None:
        """Whether the agent has read its plan in the current session and serves it; the
        reason is what /readyz says while it is not."""
        with self._lock:
            self._ready = ready
            self._reason = "" if ready else reason or "not ready"
        self._ready_gauge.set(1 if ready else 0)

    def readiness(self) -> tuple[bool, str]:
        with self._lock:
            return self._ready, self._reason

    # -- what the data plane knows -----------------------------------------------------------

    def downloaded(self, kind: str, size: int) -> None:
        """``size`` bytes of shard data arrived from a peer (``kind`` snapshot or rows)."""
        if kind in DOWNLOADS and size > 0:
            self._downloaded.labels(kind).inc(size)

    def observe(self, route: str, status: int, seconds: float) -> None:
        children = self._children.get((route, status))
        if children is None:
            children = (self._requests.labels(route, str(status)), self._seconds.labels(route))
            self._children[(route, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def watch_server(self, stats: Callable[[], Mapping[str, int]]) -> None:
        """Gauges read at scrape time from the server's ``stats()``: open connections, busy
        workers per lane, client body bytes in flight."""
        self.registry.register(_ServerCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ServerCollector(Collector):
    def __init__(self, stats: Callable[[], Mapping[str, int]]):
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._stats()
        yield GaugeMetricFamily("shardkeeper_dataplane_connections",
                                "Open data-plane connections.", value=stats["connections"])
        busy = GaugeMetricFamily("shardkeeper_dataplane_busy_workers",
                                 "Data-plane workers answering a request, by lane.",
                                 labels=["lane"])
        for name, value in sorted(stats.items()):
            if name.startswith("busy_"):
                busy.add_metric([name.removeprefix("busy_")], value)
        yield busy
        yield GaugeMetricFamily("shardkeeper_dataplane_buffered_bytes",
                                "Bytes of client request bodies announced and not yet answered.",
                                value=stats["buffered_bytes"])
