"""The coordinator's metrics and readiness (coordinator/metrics.py), fed as the leader
shell feeds them, read back through the Prometheus text format a scraper parses."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from coordinator.decide import Memory, Outcome
from coordinator.metrics import LEADER_GAUGES, CoordinatorMetrics
from shardkeeper.config import ClusterConfig
from shardkeeper.layout import AuditEvent, PlanMeta
from shardkeeper.plan import PlanState, ShardPlan


def scrape(m: CoordinatorMetrics) -> dict[str, tuple[str, dict[tuple, float]]]:
    """name -> (type, {labels: value}) of every sample, as a scraper would read them."""
    out: dict[str, tuple[str, dict[tuple, float]]] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for sample in family.samples:
            values = out.setdefault(sample.name, (family.type, {}))[1]
            values[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(m: CoordinatorMetrics, name: str, **labels: str) -> float | None:
    found = scrape(m).get(name)
    return None if found is None else found[1].get(tuple(sorted(labels.items())))


def outcome(generation: int = 3, *, replicas: int = 2, written: bool = True,
            balanced: bool = True) -> Outcome:
    """A pass over 4 shards: one short of a replica, one with none, two copies running."""
    shards = (
        ShardPlan(("a", "b"), (), 1),
        ShardPlan(("b",), (("c", "b"),), 2),  # under-replicated, being copied to c
        ShardPlan((), (), 0),  # unavailable
        ShardPlan(("c", "a"), (("b", "c"),), 1),
    )
    meta = PlanMeta(generation=generation, epoch=7, leader="c1", shards=4, replicas=replicas,
                    members=("a", "b", "c"), chunks=1, shortfall=1,
                    summary={"unavailable": 1, "deferred": 5, "in_flight": 2,
                             "down": {"d": 100.0}})
    memory = Memory(plan=PlanState(meta=meta, shards=shards),
                    live_before=frozenset({"a", "b", "c"}), down={"d": 100.0},
                    config=ClusterConfig(shards=4, replicas=replicas))
    audit = (AuditEvent(1.0, "member-left", "d left", generation),
             AuditEvent(1.0, "plan", "generation 3", generation))
    return Outcome(memory, audit=audit, plan_written=written, balanced=balanced)


def test_a_standby_is_ready_once_connected_and_exports_no_cluster_gauges() -> None:
    m = CoordinatorMetrics()
    assert not m.readiness().ready and "not connected" in m.readiness().reason
    assert value(m, "shardkeeper_ready") == 0 and value(m, "shardkeeper_is_leader") == 0
    m.zk_connected(True)
    assert m.readiness().ready and "standby" in m.readiness().reason
    assert value(m, "shardkeeper_ready") == 1 and value(m, "shardkeeper_zk_connected") == 1
    assert not set(LEADER_GAUGES) & set(scrape(m)), "a standby's copy would count twice"


def test_a_leader_is_ready_only_with_a_committed_plan_and_its_latest_pass_good() -> None:
    m = CoordinatorMetrics()
    m.zk_connected(True)
    m.term_started(7)
    assert value(m, "shardkeeper_is_leader") == 1
    assert not m.readiness().ready and "no plan committed" in m.readiness().reason
    assert value(m, "shardkeeper_leader_epoch") == 7
    assert value(m, "shardkeeper_plan_generation") is None, "no plan yet: no generation"
    m.pass_done(Outcome(Memory()), 0.01)  # the settle gate of a new cluster: no plan yet
    assert not m.readiness().ready
    m.pass_done(outcome(written=False), 0.01)  # the stored plan was already right
    assert m.readiness().ready and "generation 3" in m.readiness().reason
    m.pass_failed("ConnectionLoss")
    assert not m.readiness().ready and "ConnectionLoss" in m.readiness().reason
    assert value(m, "shardkeeper_ready") == 0
    m.pass_done(outcome(4), 0.01)
    assert m.readiness().ready
    m.zk_connected(False)
    assert not m.readiness().ready, "a leader cut off from ZooKeeper is not ready"
    m.zk_connected(True)
    m.term_ended()
    assert m.readiness().ready and "standby" in m.readiness().reason
    assert value(m, "shardkeeper_is_leader") == 0
    assert value(m, "shardkeeper_plan_generation") is None


def test_the_leader_gauges_are_those_of_its_last_pass() -> None:
    m = CoordinatorMetrics()
    m.zk_connected(True)
    m.term_started(7)
    m.pass_done(outcome(), 0.02)
    assert {name: value(m, name) for name in LEADER_GAUGES} == {
        "shardkeeper_leader_epoch": 7,
        "shardkeeper_plan_generation": 3,
        "shardkeeper_shards": 4,
        "shardkeeper_members": 3,
        "shardkeeper_down_members": 1,
        "shardkeeper_under_replicated_shards": 2,  # shard 1 (one in sync), shard 2 (none)
        "shardkeeper_unavailable_shards": 1,
        "shardkeeper_copies_in_flight": 2,
        "shardkeeper_copies_deferred": 5,
        "shardkeeper_unplaced_replicas": 1,
    }
    m.pass_done(outcome(replicas=1), 0.02)
    assert value(m, "shardkeeper_under_replicated_shards") == 1, "R=1: only the empty shard"


def test_counters_follow_prometheus_conventions() -> None:
    m = CoordinatorMetrics()
    m.zk_connected(True)
    m.term_started(1)
    m.pass_done(outcome(), 0.003)
    m.pass_done(outcome(written=False, balanced=False), 0.7)
    m.pass_failed("KazooException")
    m.term_ended()
    m.term_started(2)
    m.answered("/api/status", 200)
    m.answered("/api/status", 200)
    m.answered("other", 404)
    samples = scrape(m)
    types = {name: kind for name, (kind, _) in samples.items()}
    assert types["shardkeeper_leader_terms_total"] == "counter"
    assert types["shardkeeper_pass_duration_seconds_bucket"] == "histogram"
    assert types["shardkeeper_is_leader"] == types["shardkeeper_leader_epoch"] == "gauge"
    assert value(m, "shardkeeper_leader_terms_total") == 2
    assert value(m, "shardkeeper_plan_writes_total") == 1
    assert value(m, "shardkeeper_placement_overruns_total") == 1
    assert value(m, "shardkeeper_pass_failures_total") == 1
    assert value(m, "shardkeeper_pass_duration_seconds_count") == 2
    assert value(m, "shardkeeper_pass_duration_seconds_bucket", le="0.005") == 1
    assert value(m, "shardkeeper_pass_duration_seconds_bucket", le="1.0") == 2
    assert value(m, "shardkeeper_audit_events_total", kind="member-left") == 2
    assert value(m, "shardkeeper_http_requests_total", route="/api/status", code="200") == 2
    assert value(m, "shardkeeper_http_requests_total", route="other", code="404") == 1
    for name, (kind, _) in samples.items():
        assert name.startswith("shardkeeper_"), name
        if kind == "counter" and not name.endswith("_created"):
            assert name.endswith("_total"), name


def test_each_coordinator_has_a_registry_of_its_own() -> None:
    one, two = CoordinatorMetrics(), CoordinatorMetrics()
    one.zk_connected(True)
    one.term_started(3)
    assert value(one, "shardkeeper_is_leader") == 1
    assert value(two, "shardkeeper_is_leader") == 0
