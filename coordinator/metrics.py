"""One coordinator's Prometheus metrics and readiness, served by its --http (issue 12).

A ``CoordinatorMetrics`` has a ``CollectorRegistry`` of its own, not prometheus_client's
global one: tests (and an application embedding coordinators) run several in one process.
The coordinator shell (``coordinator.leader``) feeds it through a few marked hooks:
``zk_connected`` from its campaign session's listener, ``term_started`` and ``term_ended``
around a term of leadership, ``pass_done`` and ``pass_failed`` after each leader pass.
The HTTP side counts its answers with ``answered``.

The cluster's gauges (members, generation, copies, ...) are the leader's view from its
last pass, and only the leader exports them: a standby's stale copy would be counted
twice by ``sum()`` and alert on a cluster it does not run. Every coordinator exports
``shardkeeper_is_leader`` and its own counters. No metric carries a key, a value, an
address or a secret; label values come from bounded sets (audit event kinds, routes,
status codes). docs/operations.md ("Endpoints and metrics") lists every metric.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from coordinator.decide import Outcome

CONTENT_TYPE = CONTENT_TYPE_LATEST
# A pass on a quiet cluster takes a few milliseconds; placement stops at 0.5 s
# (PLACEMENT_BUDGET) and the first plan of 100,000 shards takes seconds.
PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# name -> help of the gauges only the leader exports (values from its last pass).
LEADER_GAUGES = {
    "shardkeeper_leader_epoch": "The epoch (fencing token) of this leader's term.",
    "shardkeeper_plan_generation": "Generation of the plan in force (written or adopted by"
    " this leader).",
    "shardkeeper_shards": "Shards S of the cluster.",
    "shardkeeper_members": "Live members the leader planned with in its last pass.",
    "shardkeeper_down_members": "Departed members the leader records down (for an hour after"
    " they left, or while they still hold replicas).",
    "shardkeeper_under_replicated_shards": "Shards with fewer than R replicas in sync in the"
    " plan in force.",
    "shardkeeper_unavailable_shards": "Shards with no live in-sync replica (no primary can"
    " serve them).",
    "shardkeeper_copies_in_flight": "Replicas being copied to a new agent (make-before-break).",
    "shardkeeper_copies_deferred": "Copies the placement wants that the throttle or"
    " maintenance holds back, as of the plan in force.",
    "shardkeeper_unplaced_replicas": "Replicas placement could not place: fewer usable"
    " members than R.",
}


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str  # what /readyz says: why it is ready, or why not


class CoordinatorMetrics:
    """The metrics of one coordinator process, and whether it is ready."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._is_leader = Gauge("shardkeeper_is_leader",
                                "1 while this coordinator leads the cluster, else 0.",
                                registry=r)
        self._zk = Gauge("shardkeeper_zk_connected",
                         "1 while the coordinator's ZooKeeper session is connected, else 0.",
                         registry=r)
        self._ready_gauge = Gauge("shardkeeper_ready", "1 while /readyz answers 200, else 0.",
                                  registry=r)
        self._terms = Counter("shardkeeper_leader_terms",
                              "Terms of leadership this process won.", registry=r)
        self._passes = Histogram(
            "shardkeeper_pass_duration_seconds",
            "Leader passes that committed (read, decide, fenced writes), by duration.",
            buckets=PASS_BUCKETS, registry=r)
        self._failures = Counter("shardkeeper_pass_failures",
                                 "Leader passes that failed and were retried after reloading"
                                 " the stored plan.", registry=r)
        self._plans = Counter("shardkeeper_plan_writes",
                              "Plan generations this process wrote.", registry=r)
        self._overruns = Counter(
            "shardkeeper_placement_overruns",
            "Passes whose placement ran out of its time budget (balance finished later).",
            registry=r)
        self._events = Counter("shardkeeper_audit_events",
                               "Audit log events this process wrote, by kind.", ["kind"],
                               registry=r)
        self._requests = Counter("shardkeeper_http_requests",
                                 "HTTP requests answered by --http, by route and status code.",
                                 ["route", "code"], registry=r)
        self._lock = threading.Lock()
        self._connected = False
        self._epoch: int | None = None  # None: not leading
        self._committed = False  # a pass of this term committed and a plan exists
        self._failure = ""  # why the term's latest pass failed, "" if it did not
        self._cluster: dict[str, float] = {}
        self._zk.set(0)
        self._is_leader.set(0)
        self._publish()
        r.register(_LeaderGauges(self._leader_values))

    # -- hooks of the coordinator shell ------------------------------------------------------
    def zk_connected(self, connected: bool) -> None:
        """The campaign session's state (CONNECTED or not), from its listener."""
        with self._lock:
            self._connected = connected
        self._zk.set(1 if connected else 0)
        self._publish()

    def term_started(self, epoch: int) -> None:
        with self._lock:
            self._epoch, self._committed, self._failure = epoch, False, ""
            self._cluster = {}
        self._terms.inc()
        self._is_leader.set(1)
        self._publish()

    def term_ended(self) -> None:
        with self._lock:
            self._epoch, self._committed, self._failure = None, False, ""
            self._cluster = {}
        self._is_leader.set(0)
        self._publish()

    def pass_done(self, outcome: Outcome, seconds: float) -> None:
        """A pass committed: its duration, what it wrote, and the cluster as it left it."""
        self._passes.observe(seconds)
        if outcome.plan_written:
            self._plans.inc()
        if not outcome.balanced:
            self._overruns.inc()
        for event in outcome.audit:
            self._events.labels(event.kind).inc()
        values = cluster_values(outcome)
        with self._lock:
            if self._epoch is None:
                return
            self._cluster = values
            self._committed = bool(values)
            self._failure = ""
        self._publish()

    def pass_failed(self, error: str) -> None:
        self._failures.inc()
        with self._lock:
            self._failure = error
        self._publish()

    # -- what the HTTP side asks ---------------------------------------------------------------
    def answered(self, route: str, status: int) -> None:
        self._requests.labels(route, str(status)).inc()

    def readiness(self) -> Readiness:
        """Ready: the campaign session is connected, and either this coordinator is a
        standby, or it leads and its latest pass of this term committed with a plan in
        force (written in this term, or found already right: the leader writes only what
        changed)."""
        with self._lock:
            if not self._connected:
                return Readiness(False, "not connected to ZooKeeper")
            if self._epoch is None:
                return Readiness(True, "standby: connected to ZooKeeper")
            if self._failure:
                return Readiness(False, f"leader (epoch {self._epoch}): its latest pass"
                                 f" failed ({self._failure}); retrying")
            if not self._committed:
                return Readiness(False, f"leader (epoch {self._epoch}): no plan committed in"
                                 " this term yet")
            generation = int(self._cluster["shardkeeper_plan_generation"])
            return Readiness(True, f"leader (epoch {self._epoch}): plan generation"
                             f" {generation} in force")

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _publish(self) -> None:
        self._ready_gauge.set(1 if self.readiness().ready else 0)

    def _leader_values(self) -> dict[str, float]:
        with self._lock:
            if self._epoch is None:
                return {}
            return {**self._cluster, "shardkeeper_leader_epoch": self._epoch}


def cluster_values(outcome: Outcome) -> dict[str, float]:
    """The leader gauges after a pass; empty while there is no plan yet (a new cluster
    waiting for members, or no usable config)."""
    memory = outcome.memory
    plan = memory.plan
    meta = plan.meta
    if meta is None:
        return {}
    replicas = memory.config.replicas if memory.config else meta.replicas
    summary = meta.summary
    return {
        "shardkeeper_plan_generation": plan.generation,
        "shardkeeper_shards": meta.shards,
        "shardkeeper_members": len(memory.live_before),
        "shardkeeper_down_members": len(memory.down),
        "shardkeeper_under_replicated_shards": sum(
            1 for p in plan.shards if len(p.replicas) < replicas),
        "shardkeeper_unavailable_shards": _count(summary.get("unavailable")),
        "shardkeeper_copies_in_flight": sum(len(p.bootstrapping) for p in plan.shards),
        "shardkeeper_copies_deferred": _count(summary.get("deferred")),
        "shardkeeper_unplaced_replicas": meta.shortfall,
    }


def _count(value: object) -> int:
    # plan/meta's summary is free-form JSON (an older leader may not have written a key).
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class _LeaderGauges(Collector):
    """The leader-only gauges, built at scrape time: absent while not leading."""

    def __init__(self, values):
        self._values = values

    def collect(self) -> Iterator[GaugeMetricFamily]:
        values = self._values()
        for name, help_text in LEADER_GAUGES.items():
            if name in values:
                yield GaugeMetricFamily(name, help_text, value=values[name])

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Registering must not call collect() (auto_describe would, before any term).
        return iter(())
