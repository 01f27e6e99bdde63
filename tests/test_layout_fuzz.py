"""Every znode decoder against garbage: it returns a value or raises CorruptZnode, never
anything else (a crash in a leader or agent loop would be a crash loop), and what it
accepts re-encodes to something it accepts again."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardkeeper.config import ClusterConfig
from shardkeeper.layout import (
    AgentPlan,
    AgentStatus,
    Assignment,
    AuditEvent,
    Maintenance,
    MemberInfo,
    MoveRequest,
    PlanMeta,
    RotationStep,
    RoutingChunk,
    ShardStatus,
    decode_epoch,
    decode_events,
    encode,
)
from shardkeeper.vocab import CorruptZnode, Role

DECODERS = {
    "member": MemberInfo.decode,
    "agent plan": AgentPlan.decode,
    "plan meta": PlanMeta.decode,
    "routing chunk": RoutingChunk.decode,
    "status": AgentStatus.decode,
    "epoch": decode_epoch,
    "maintenance": Maintenance.decode,
    "move": MoveRequest.decode,
    "event": AuditEvent.decode,
    "events": decode_events,
    "config": ClusterConfig.decode,
    "rotation": RotationStep.decode,
}

VALID = {
    "member": MemberInfo("a1", "127.0.0.1:7001", "z1", 2.0, "1.0", 5.0).encode(),
    "agent plan": AgentPlan(3, 2, {0: Assignment(Role.PRIMARY, peers=("a2",), term=3),
                                   7: Assignment(Role.REPLICA, primary="a2", source="a3",
                                                 term=1)}).encode(),
    "plan meta": PlanMeta(4, 2, "c1", 600, 2, ("a1", "a2"), 2, 0, 1.5, {"x": 1}).encode(),
    "routing chunk": RoutingChunk(4, 512, (("a1", "a2"), ("a2",)),
                                  {513: (("a3", "a2"),)}, {512: ("a1", "a3")}).encode(),
    "status": AgentStatus("a1", 4, {0: ShardStatus("PRIMARY", 9),
                                    3: ShardStatus("REPLICA", 0, True)}, "why").encode(),
    "epoch": encode({"leader": "c1"}),
    "maintenance": Maintenance("auto", 1.0, "n", ("a1",)).encode(),
    "move": MoveRequest(3, "a1", "a2").encode(),
    "event": AuditEvent(1.0, "plan", "m", 2).encode(),
    "events": encode({"events": [AuditEvent(1.0, "plan", "m", 2).to_json()]}),
    "config": ClusterConfig(shards=8, replicas=2).encode(),
    "rotation": RotationStep("begun", "0a1b2c3d", 1.5).encode(),
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=8) | st.sampled_from(["0", "7", "²", "-1", "999999999"]), inner,
        max_size=4),
    max_leaves=20,
)
SLOW = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_or_corrupt(kind: str, data: bytes) -> object | None:
    try:
        return DECODERS[kind](f"/x/{kind}", data)
    except CorruptZnode:
        return None


def test_every_valid_encoding_decodes() -> None:
    for kind, data in VALID.items():
        assert decode_or_corrupt(kind, data) is not None, kind


@SLOW
@given(st.sampled_from(sorted(DECODERS)), st.binary(max_size=200))
def test_arbitrary_bytes(kind: str, data: bytes) -> None:
    decode_or_corrupt(kind, data)


@SLOW
@given(st.sampled_from(sorted(DECODERS)), json_values)
def test_arbitrary_json(kind: str, value: object) -> None:
    decode_or_corrupt(kind, json.dumps(value).encode())


@SLOW
@given(st.sampled_from(sorted(DECODERS)), st.data())
def test_one_field_of_a_valid_znode_replaced_by_garbage(kind: str, data: st.DataObject) -> None:
    obj = json.loads(VALID[kind])
    key = data.draw(st.sampled_from(sorted(obj)))
    obj[key] = data.draw(json_values)
    decode_or_corrupt(kind, json.dumps(obj).encode())


def nodes(value: object, path: tuple = ()) -> list[tuple]:
    """Every place in a JSON tree, as the path of keys/indexes that leads to it."""
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += nodes(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += nodes(v, path + (i,))
    return out


def replaced(value: object, path: tuple, new: object) -> object:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: replaced(value[head], rest, new)}
    copy = list(value)
    copy[head] = replaced(copy[head], rest, new)
    return copy


@SLOW
@given(st.sampled_from(sorted(DECODERS)), st.data())
def test_any_part_of_a_valid_znode_replaced_by_garbage(kind: str, data: st.DataObject) -> None:
    obj = json.loads(VALID[kind])
    where = data.draw(st.sampled_from(nodes(obj)))
    decode_or_corrupt(kind, json.dumps(replaced(obj, where, data.draw(json_values))).encode())


@SLOW
@given(st.sampled_from(sorted(DECODERS)), st.data())
def test_a_valid_znode_with_a_byte_flipped(kind: str, data: st.DataObject) -> None:
    raw = bytearray(VALID[kind])
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    decode_or_corrupt(kind, bytes(raw))


def test_hostile_shapes() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    huge = b'{"generation": ' + b"9" * 5000 + b', "epoch": 1, "replicas": {}}'
    for kind in DECODERS:
        for data in (deep, huge, b"\xff\xfe", b"{}", b"null", b'{"a": NaN}', b"1e999"):
            decode_or_corrupt(kind, data)
    forged = encode({"generation": 2**64, "epoch": 0, "replicas": {}})
    assert decode_or_corrupt("agent plan", forged) is None, "beyond any real generation"
    shard = encode({"generation": 1, "epoch": 1, "replicas": {"²": ["R", "a", 1]}})
    assert decode_or_corrupt("agent plan", shard) is None, "a non-ASCII digit is no shard"


@SLOW
@given(st.sampled_from(sorted(DECODERS)), st.data())
def test_what_decodes_re_encodes_to_itself(kind: str, data: st.DataObject) -> None:
    obj = json.loads(VALID[kind])
    key = data.draw(st.sampled_from(sorted(obj)))
    obj[key] = data.draw(json_values)
    value = decode_or_corrupt(kind, json.dumps(obj).encode())
    if value is None or kind in ("epoch", "events"):
        return
    again = decode_or_corrupt(kind, value.encode())
    assert again == value
