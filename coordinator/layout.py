"""The ZooKeeper layout of a cluster: every path and every znode encoding lives here.

Agents, coordinators and the CLI import this module and never build a path string or
parse znode bytes themselves. Every znode holds compact UTF-8 JSON. Decoders validate
what they read and raise :class:`CorruptZnode` with the path and the reason, so that a
damaged znode produces a clear error instead of a crash loop.

Layout under ``/shardkeeper/<cluster>`` (see ARCHITECTURE.md):

    config                  persistent  admin        ClusterConfig
    members/<agent>         ephemeral   agent        MemberInfo
    election/...            recipe      candidates   kazoo Election
    epoch                   persistent  new leader   leader id; its zk version is the fencing token
    plan/meta               persistent  leader       PlanMeta
    plan/agents/<agent>     persistent  leader       AgentPlan
    plan/routing/<chunk>    persistent  leader       RoutingChunk (ROUTING_CHUNK shards each)
    status/<agent>          ephemeral   agent        AgentStatus
    admin/...               persistent  admin        maintenance flag, drain set, moves
    events/...              seq         leader       audit log
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

ROOT = "/shardkeeper"
# Shards per routing chunk. At 100,000 shards, R=3 and 64-character agent ids a chunk
# stays near 100 KiB, well under the 256 KiB budget and jute.maxbuffer (1 MiB).
ROUTING_CHUNK = 512

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

ROLE_PRIMARY = "primary"
ROLE_REPLICA = "replica"
ROLES = (ROLE_PRIMARY, ROLE_REPLICA)


class CorruptZnode(ValueError):
    """A znode's content could not be decoded; the message names the path and the reason."""


def validate_name(kind: str, name: str) -> str:
    """Cluster and agent names become znode names: keep them short and path-safe."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"invalid {kind} {name!r}: use 1-64 characters from letters, digits, '_', '.', '-',"
            " starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Paths:
    """Every znode path of one cluster."""

    cluster: str

    def __post_init__(self) -> None:
        validate_name("cluster name", self.cluster)

    @property
    def root(self) -> str:
        return f"{ROOT}/{self.cluster}"

    @property
    def config(self) -> str:
        return f"{self.root}/config"

    @property
    def members(self) -> str:
        return f"{self.root}/members"

    def member(self, agent: str) -> str:
        return f"{self.members}/{agent}"

    @property
    def election(self) -> str:
        return f"{self.root}/election"

    @property
    def epoch(self) -> str:
        return f"{self.root}/epoch"

    @property
    def plan(self) -> str:
        return f"{self.root}/plan"

    @property
    def plan_meta(self) -> str:
        return f"{self.plan}/meta"

    @property
    def plan_agents(self) -> str:
        return f"{self.plan}/agents"

    def plan_agent(self, agent: str) -> str:
        return f"{self.plan_agents}/{agent}"

    @property
    def routing(self) -> str:
        return f"{self.plan}/routing"

    def routing_chunk(self, chunk: int) -> str:
        return f"{self.routing}/{chunk:05d}"

    @property
    def status(self) -> str:
        return f"{self.root}/status"

    def agent_status(self, agent: str) -> str:
        return f"{self.status}/{agent}"

    @property
    def admin(self) -> str:
        return f"{self.root}/admin"

    @property
    def events(self) -> str:
        return f"{self.root}/events"

    def persistent_dirs(self) -> list[str]:
        """Containers that must exist before agents and leaders use the cluster."""
        return [
            self.members,
            self.election,
            self.plan_agents,
            self.routing,
            self.status,
            self.admin,
            self.events,
        ]


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def decode_object(path: str, data: bytes | None) -> dict[str, Any]:
    if not data:
        raise CorruptZnode(f"{path}: empty znode")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptZnode(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CorruptZnode(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _field(path: str, obj: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in obj:
        raise CorruptZnode(f"{path}: missing field {key!r}")
    value = obj[key]
    # bool is an int subclass: a JSON true must not pass as a count.
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise CorruptZnode(f"{path}: field {key!r} must be a number, got {value!r}")
    if not isinstance(value, kind):
        raise CorruptZnode(f"{path}: field {key!r} has the wrong type ({value!r})")
    return value


@dataclass(frozen=True)
class MemberInfo:
    """What an agent publishes in its ephemeral member znode."""

    id: str
    address: str
    zone: str = ""
    weight: float = 1.0
    version: str = ""
    started: float = 0.0

    def encode(self) -> bytes:
        return encode(
            {
                "id": self.id,
                "address": self.address,
                "zone": self.zone,
                "weight": self.weight,
                "version": self.version,
                "started": self.started,
            }
        )

    @classmethod
    def decode(cls, path: str, data: bytes | None) -> MemberInfo:
        obj = decode_object(path, data)
        weight = float(_field(path, obj, "weight", (int, float)))
        if weight <= 0:
            raise CorruptZnode(f"{path}: weight must be > 0, got {weight}")
        return cls(
            id=_field(path, obj, "id", str),
            address=_field(path, obj, "address", str),
            zone=obj.get("zone", "") or "",
            weight=weight,
            version=str(obj.get("version", "")),
            started=float(obj.get("started", 0.0)),
        )


@dataclass(frozen=True)
class AgentPlan:
    """One agent's target replicas: shard -> role, written by the leader.

    ``generation`` is the plan generation in which this agent's assignment last changed;
    agents ignore an AgentPlan older than the one they applied.
    """

    generation: int
    epoch: int
    replicas: dict[int, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return encode(
            {
                "generation": self.generation,
                "epoch": self.epoch,
                "replicas": {str(s): role for s, role in sorted(self.replicas.items())},
            }
        )

    @classmethod
    def decode(cls, path: str, data: bytes | None) -> AgentPlan:
        obj = decode_object(path, data)
        raw = _field(path, obj, "replicas", dict)
        replicas: dict[int, str] = {}
        for key, role in raw.items():
            if not key.isdigit() or role not in ROLES:
                raise CorruptZnode(f"{path}: bad replica entry {key!r}: {role!r}")
            replicas[int(key)] = role
        return cls(
            generation=_field(path, obj, "generation", int),
            epoch=_field(path, obj, "epoch", int),
            replicas=replicas,
        )


@dataclass(frozen=True)
class PlanMeta:
    generation: int
    epoch: int
    leader: str
    shards: int
    replicas: int
    members: tuple[str, ...]
    chunks: int
    shortfall: int = 0
    created: float = 0.0

    def encode(self) -> bytes:
        return encode(
            {
                "generation": self.generation,
                "epoch": self.epoch,
                "leader": self.leader,
                "shards": self.shards,
                "replicas": self.replicas,
                "members": list(self.members),
                "chunks": self.chunks,
                "shortfall": self.shortfall,
                "created": self.created,
            }
        )

    @classmethod
    def decode(cls, path: str, data: bytes | None) -> PlanMeta:
        obj = decode_object(path, data)
        return cls(
            generation=_field(path, obj, "generation", int),
            epoch=_field(path, obj, "epoch", int),
            leader=_field(path, obj, "leader", str),
            shards=_field(path, obj, "shards", int),
            replicas=_field(path, obj, "replicas", int),
            members=tuple(_field(path, obj, "members", list)),
            chunks=_field(path, obj, "chunks", int),
            shortfall=int(obj.get("shortfall", 0)),
            created=float(obj.get("created", 0.0)),
        )


@dataclass(frozen=True)
class RoutingChunk:
    """Replica lists (primary first) of shards ``first .. first + len(replicas) - 1``."""

    generation: int
    first: int
    replicas: tuple[tuple[str, ...], ...]

    def encode(self) -> bytes:
        return encode(
            {
                "generation": self.generation,
                "first": self.first,
                "replicas": [list(r) for r in self.replicas],
            }
        )

    @classmethod
    def decode(cls, path: str, data: bytes | None) -> RoutingChunk:
        obj = decode_object(path, data)
        rows = _field(path, obj, "replicas", list)
        if not all(isinstance(r, list) and all(isinstance(a, str) for a in r) for r in rows):
            raise CorruptZnode(f"{path}: replicas must be lists of agent ids")
        return cls(
            generation=_field(path, obj, "generation", int),
            first=_field(path, obj, "first", int),
            replicas=tuple(tuple(r) for r in rows),
        )


def chunk_routing(
    replicas: tuple[tuple[str, ...], ...],
) -> list[tuple[tuple[str, ...], ...]]:
    """Split a routing table into ROUTING_CHUNK-sized slices: returns each chunk's rows."""
    return [replicas[i : i + ROUTING_CHUNK] for i in range(0, len(replicas), ROUTING_CHUNK)]


@dataclass(frozen=True)
class ShardStatus:
    state: str
    lsn: int = 0


@dataclass(frozen=True)
class AgentStatus:
    """An agent's actual state: per shard its state (and LSN at the last state change)."""

    agent: str
    generation: int
    shards: dict[int, ShardStatus] = field(default_factory=dict)

    def encode(self) -> bytes:
        return encode(
            {
                "agent": self.agent,
                "generation": self.generation,
                "shards": {
                    str(s): {"state": st.state, "lsn": st.lsn}
                    for s, st in sorted(self.shards.items())
                },
            }
        )

    @classmethod
    def decode(cls, path: str, data: bytes | None) -> AgentStatus:
        obj = decode_object(path, data)
        raw = _field(path, obj, "shards", dict)
        shards: dict[int, ShardStatus] = {}
        for key, entry in raw.items():
            if not key.isdigit() or not isinstance(entry, dict) or "state" not in entry:
                raise CorruptZnode(f"{path}: bad shard entry {key!r}")
            shards[int(key)] = ShardStatus(state=str(entry["state"]), lsn=int(entry.get("lsn", 0)))
        return cls(
            agent=_field(path, obj, "agent", str),
            generation=_field(path, obj, "generation", int),
            shards=shards,
        )


def encode_epoch(leader: str) -> bytes:
    return encode({"leader": leader})


def decode_epoch(path: str, data: bytes | None) -> str:
    return _field(path, decode_object(path, data), "leader", str)
