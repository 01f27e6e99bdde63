"""Znode codecs, paths and config validation: pure, no ZooKeeper."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardkeeper.config import ClusterConfig
from shardkeeper.layout import (
    ROUTING_CHUNK,
    AgentPlan,
    AgentStatus,
    Assignment,
    AuditEvent,
    Maintenance,
    MemberInfo,
    MoveRequest,
    Paths,
    PlanMeta,
    RoutingChunk,
    ShardStatus,
    decode_events,
    encode,
    encode_events,
)
from shardkeeper.vocab import ConfigError, CorruptZnode, Role


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
    plan = AgentPlan(
        generation=4,
        epoch=2,
        replicas={
            0: Assignment(Role.PRIMARY, peers=("a2",), bootstrapping=("a3",), term=3),
            17: Assignment(Role.REPLICA, primary="a2", term=4),
            18: Assignment(Role.REPLICA, primary="a2", source="a4", term=4),
        },
    )
    assert AgentPlan.decode("p", plan.encode()) == plan
    # Every assignment carries its primary's term (>= 1); anything else is corrupt.
    for bad in (["P", ["b"], []], ["R", "b"], ["R", "b", 0], ["P", ["b"], [], True],
                ["R", "b", 1, 2], ["P", [1], [], 1], ["R", "", 1]):
        with pytest.raises(CorruptZnode):
            AgentPlan.decode("p", encode({"generation": 1, "epoch": 1, "replicas": {"0": bad}}))
    meta = PlanMeta(4, 2, "c1", 64, 2, ("a1", "a2"), 1, 0, 1.5, {"in_flight": 3})
    assert PlanMeta.decode("p", meta.encode()) == meta
    chunk = RoutingChunk(4, ROUTING_CHUNK, (("a1", "a2"), ("a2",)),
                         bootstrapping={ROUTING_CHUNK + 1: (("a3", "a2"),)},
                         targets={ROUTING_CHUNK + 1: ("a2", "a3")})
    assert RoutingChunk.decode("p", chunk.encode()) == chunk
    assert Maintenance.decode("p", Maintenance("auto", 3.0, "x", ("a",)).encode()).missing == ("a",)
    assert MoveRequest.decode("p", MoveRequest(3, "a", "b").encode()) == MoveRequest(3, "a", "b")
    event = AuditEvent(1.0, "plan", "m", 2)
    assert AuditEvent.decode("p", event.encode()) == event
    batch = [AuditEvent(1.0, "member-left", "a left", 2),
             AuditEvent(1.0, "plan", "generation 2", 2)]
    assert decode_events("p", encode_events(batch)) == batch
    with pytest.raises(CorruptZnode, match="events must be objects"):
        decode_events("p", encode({"events": [1]}))
    st = AgentStatus("a1", 4, {3: ShardStatus("PRIMARY", 9), 5: ShardStatus("REPLICA", 7, True)})
    assert AgentStatus.decode("p", st.encode()) == st
    assert b"catching_up" in st.encode() and st.encode().count(b"catching_up") == 1
    in_sync = {s: x.in_sync for s, x in AgentStatus.decode("p", st.encode()).shards.items()}
    assert in_sync == {3: True, 5: False}
    assert not ShardStatus("BOOTSTRAPPING").in_sync and ShardStatus("REPLICA").in_sync
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
        (encode({"generation": 1, "epoch": 1, "replicas": {"x": ["P", [], []]}}), "bad shard"),
        (encode({"generation": 1, "epoch": 1, "replicas": {"1": "primary"}}), "bad assignment"),
        (encode({"generation": 1, "epoch": 1, "replicas": {"1": ["R"]}}), "bad assignment"),
        (encode({"generation": 1, "epoch": 1, "replicas": {"1": ["P", "a"]}}), "bad assignment"),
        (encode({"generation": 1, "epoch": 1, "replicas": {"1": ["R", "a", True]}}),
         "bad assignment"),
        (encode({"generation": 1, "epoch": 1, "replicas": {"1": ["P", [], [], -1]}}),
         "bad assignment"),
    ],
)
def test_corrupt_agent_plans_name_the_path_and_reason(data: bytes | None, reason: str) -> None:
    with pytest.raises(CorruptZnode, match=reason) as e:
        AgentPlan.decode("/shardkeeper/x/plan/agents/a1", data)
    assert str(e.value).startswith("/shardkeeper/x/plan/agents/a1: ")


def test_member_weight_must_be_positive() -> None:
    bad = encode({"id": "a", "address": "h:1", "weight": 0})
    with pytest.raises(CorruptZnode, match="weight must be in"):
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


def test_config_set_parses_types_and_refuses_bad_keys_and_shard_changes() -> None:
    cfg = ClusterConfig(shards=64, replicas=2)
    new = cfg.with_settings({"rebalance_delay": "30", "max_moves_total": "8", "replicas": "3"})
    assert (new.rebalance_delay, new.max_moves_total, new.replicas) == (30.0, 8, 3)
    with pytest.raises(ConfigError, match="unknown config key 'colour'"):
        cfg.with_settings({"colour": "red"})
    with pytest.raises(ConfigError, match="shards cannot change"):
        cfg.with_settings({"shards": "128"})
    with pytest.raises(ConfigError, match="max_moves_total must be an integer between 1 and"):
        cfg.with_settings({"max_moves_total": "many"})
    with pytest.raises(ConfigError, match="auto_maintenance_fraction must be between 0 and 1"):
        cfg.with_settings({"auto_maintenance_fraction": "1.5"})
    assert ClusterConfig.decode("c", new.encode()) == new


def test_a_leaving_member_and_the_leaders_answer_round_trip_tolerantly() -> None:
    info = MemberInfo("a1", "h:1", started=5.0)
    assert b"leaving" not in info.encode(), "unset: the znode older readers know"
    leaving = MemberInfo("a1", "h:1", started=5.0, leaving=True)
    assert MemberInfo.decode("/m", leaving.encode()) == leaving
    assert MemberInfo.decode("/m", encode({**json.loads(info.encode()), "leaving": 1})) == info
    meta = PlanMeta(3, 1, "c", 8, 2, ("a1",), 1,
                    summary={"leaving": {"a1": 2, "bad id!": 1, "a2": -1, "a3": True}})
    assert PlanMeta.decode("/meta", meta.encode()).leaving() == {"a1": 2}
    assert PlanMeta(3, 1, "c", 8, 2, ("a1",), 1, summary={"leaving": [1]}).leaving() == {}


_NAMES = st.sampled_from(["a1", "a-2", "b_3", "x.y", "agent-10"])
_ASSIGNMENTS = st.one_of(
    st.builds(lambda peers, copying, term: Assignment(
        Role.PRIMARY, peers=tuple(peers), bootstrapping=tuple(copying), term=term),
        st.lists(_NAMES, max_size=3), st.lists(_NAMES, max_size=2), st.integers(1, 10**12)),
    st.builds(lambda primary, source, term: Assignment(
        Role.REPLICA, primary=primary, source=source, term=term),
        _NAMES, st.one_of(st.none(), _NAMES), st.integers(1, 10**12)),
)


@settings(max_examples=300)
@given(st.integers(0, 10**12), st.integers(0, 10**9),
       st.dictionaries(st.integers(0, 999_999), _ASSIGNMENTS, max_size=30))
def test_an_agent_plan_encodes_to_the_bytes_of_the_generic_encoder(
        generation: int, epoch: int, replicas: dict[int, Assignment]) -> None:
    """AgentPlan.encode builds its JSON from cached per-assignment pieces (the leader
    rewrites plans of thousands of assignments): the same bytes as encoding the whole."""
    plan = AgentPlan(generation, epoch, replicas)
    whole = encode({"generation": generation, "epoch": epoch,
                    "replicas": {str(s): a.to_json() for s, a in replicas.items()}})
    assert plan.encode() == whole
    assert AgentPlan.decode("/p", plan.encode()) == plan
