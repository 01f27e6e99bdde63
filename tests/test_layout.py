"""Znode codecs, paths and config validation: pure, no ZooKeeper."""

from __future__ import annotations

import pytest

from coordinator.config import ClusterConfig, ConfigError
from coordinator.layout import (
    ROUTING_CHUNK,
    AgentPlan,
    AgentStatus,
    CorruptZnode,
    MemberInfo,
    Paths,
    PlanMeta,
    RoutingChunk,
    ShardStatus,
    encode,
)


def test_paths_live_under_the_cluster_root() -> None:
    p = Paths("prod")
    assert p.member("a1") == "/shardkeeper/prod/members/a1"
    assert p.plan_agent("a1") == "/shardkeeper/prod/plan/agents/a1"
    assert p.routing_chunk(3) == "/shardkeeper/prod/plan/routing/00003"
    assert p.epoch == "/shardkeeper/prod/epoch"
    assert all(d.startswith(p.root + "/") for d in p.persistent_dirs())


@pytest.mark.parametrize("name", ["", "a/b", "../x", "x" * 65, "-lead", "sp ace"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid cluster name"):
        Paths(name)


def test_codecs_round_trip() -> None:
    m = MemberInfo("a1", "127.0.0.1:7000", zone="z1", weight=2.0, version="0.1", started=5.0)
    assert MemberInfo.decode("p", m.encode()) == m
    plan = AgentPlan(generation=4, epoch=2, replicas={0: "primary", 17: "replica"})
    assert AgentPlan.decode("p", plan.encode()) == plan
    meta = PlanMeta(4, 2, "c1", 64, 2, ("a1", "a2"), 1, 0, 1.5)
    assert PlanMeta.decode("p", meta.encode()) == meta
    chunk = RoutingChunk(4, ROUTING_CHUNK, (("a1", "a2"), ("a2",)))
    assert RoutingChunk.decode("p", chunk.encode()) == chunk
    st = AgentStatus("a1", 4, {3: ShardStatus("PRIMARY", 9)})
    assert AgentStatus.decode("p", st.encode()) == st
    cfg = ClusterConfig(shards=64, replicas=3)
    assert ClusterConfig.decode("p", cfg.encode()) == cfg


@pytest.mark.parametrize(
    "data, reason",
    [
        (None, "empty znode"),
        (b"", "empty znode"),
        (b"\xff\xfe", "not valid JSON"),
        (b"{nope", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (encode({"generation": 1, "epoch": 1}), "missing field 'replicas'"),
        (encode({"generation": "1", "epoch": 1, "replicas": {}}), "wrong type"),
        (encode({"generation": True, "epoch": 1, "replicas": {}}), "must be a number"),
        (encode({"generation": 1, "epoch": 1, "replicas": {"x": "primary"}}), "bad replica"),
        (encode({"generation": 1, "epoch": 1, "replicas": {"1": "boss"}}), "bad replica"),
    ],
)
def test_corrupt_agent_plans_name_the_path_and_reason(data: bytes | None, reason: str) -> None:
    with pytest.raises(CorruptZnode, match=reason) as e:
        AgentPlan.decode("/shardkeeper/x/plan/agents/a1", data)
    assert str(e.value).startswith("/shardkeeper/x/plan/agents/a1: ")


def test_member_weight_must_be_positive() -> None:
    bad = encode({"id": "a", "address": "h:1", "weight": 0})
    with pytest.raises(CorruptZnode, match="weight must be > 0"):
        MemberInfo.decode("p", bad)


@pytest.mark.parametrize(
    "shards, replicas, message",
    [(0, 1, "shards must be between"), (8, 0, "replicas must be between"),
     (8, 17, "replicas must be between"), (True, 1, "must be an integer"),
     (8, 2.5, "must be an integer")],
)
def test_config_validation(shards: object, replicas: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ClusterConfig(shards=shards, replicas=replicas)  # type: ignore[arg-type]


def test_config_rejects_unknown_and_missing_keys() -> None:
    with pytest.raises(ConfigError, match="unknown config keys: colour"):
        ClusterConfig.from_dict({"shards": 1, "replicas": 1, "colour": "red"})
    with pytest.raises(ConfigError, match="missing 'replicas'"):
        ClusterConfig.from_dict({"shards": 1})
    with pytest.raises(CorruptZnode, match="/cfg: shards must be"):
        ClusterConfig.decode("/cfg", encode({"shards": -1, "replicas": 1}))
