"""The ZooKeeper layout of a cluster: every path and every znode encoding lives here.

Agents, coordinators and the CLI import this module and never build a path string or
parse znode bytes themselves. Every znode holds compact UTF-8 JSON. Decoders validate
what they read and raise :class:`CorruptZnode` with the path and the reason, so that a
damaged znode produces a clear error instead of a crash loop.

Layout under ``/shardkeeper/<cluster>`` (docs/architecture.md has the contracts):

    config                  persistent  admin        ClusterConfig
    token                   persistent  init         the data plane's cluster token
    peer_token              persistent  init         the data plane's peer token (agents only)
    token_rotation, peer_token_rotation
                            persistent  token rotate RotationStep, while a rotation is under way
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

from shardkeeper.vocab import HOLDING, CorruptZnode, Role, ShardState
from shardkeeper.znodejson import (  # noqa: F401 - the codecs' helpers, used by many
    MAX_SHARD,
    decode_object,
    encode,
)
from shardkeeper.znodejson import count as _count
from shardkeeper.znodejson import encode_with as _encode_with
from shardkeeper.znodejson import entries as _entries
from shardkeeper.znodejson import field as _field
from shardkeeper.znodejson import number as _number
from shardkeeper.znodejson import shard as _shard
from shardkeeper.znodejson import show as _show
from shardkeeper.znodejson import text as _text

STATES = frozenset(str(s) for s in ShardState)

ROOT = "/shardkeeper"
# Shards per routing chunk. At 100,000 shards, R=3 and 64-character agent ids a chunk
# stays near 100 KiB, well under the 256 KiB budget and jute.maxbuffer (1 MiB).
ROUTING_CHUNK = 512

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")



def valid_name(name: object) -> bool:
    return isinstance(name, str) and bool(_NAME.match(name))


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
    def token(self) -> str:
        """The cluster token for the data plane (raw bytes; protect it with a ZooKeeper ACL
        in production, or set SHARDKEEPER_TOKEN on every host instead)."""
        return f"{self.root}/token"

    @property
    def peer_token(self) -> str:
        """The peer token: agents' replication calls to each other carry it, clients never
        do (SHARDKEEPER_PEER_TOKEN on every agent host overrides it)."""
        return f"{self.root}/peer_token"

    def rotation(self, token_path: str) -> str:
        """The step of a rotation of ``token_path`` under way (`shardkeeper token rotate`)."""
        return f"{token_path}_rotation"

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
    def maintenance(self) -> str:
        return f"{self.admin}/maintenance"

    @property
    def drains(self) -> str:
        return f"{self.admin}/drain"

    def drain(self, agent: str) -> str:
        return f"{self.drains}/{agent}"

    @property
    def rebalance(self) -> str:
        return f"{self.admin}/rebalance"

    @property
    def moves(self) -> str:
        return f"{self.admin}/moves"

    @property
    def move_prefix(self) -> str:
        return f"{self.moves}/move-"

    @property
    def events(self) -> str:
        return f"{self.root}/events"

    @property
    def event_prefix(self) -> str:
        return f"{self.events}/event-"

    def persistent_dirs(self) -> list[str]:
        """Containers that must exist before agents and leaders use the cluster."""
        return [
            self.members,
            self.election,
            self.plan_agents,
            self.routing,
            self.status,
            self.admin,
            self.drains,
            self.moves,
            self.events,
        ]


def _names(path: str, value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(valid_name(a) for a in value):
        raise CorruptZnode(f"{path}: {what} must be a list of agent ids, got {_show(value)}")
    return tuple(value)


@dataclass(frozen=True)
class MemberInfo:
    """What an agent publishes in its ephemeral member znode.

    ``leaving``: the agent is shutting down (SIGTERM) and asks the leader to move its
    primaries to in-sync replicas before it closes its session (the graceful hand-off);
    the leader acknowledges in ``plan/meta``'s summary (``leaving``: agent -> primaries
    it keeps, having no in-sync replica elsewhere to give them to).
    """

    id: str
    address: str
    zone: str = ""
    weight: float = 1.0
    version: str = ""
    started: float = 0.0
    leaving: bool = False

    def encode(self) -> bytes:
        obj = {
            "id": self.id,
            "address": self.address,
            "zone": self.zone,
            "weight": self.weight,
            "version": self.version,
            "started": self.started,
        }
        if self.leaving:  # only when set: older readers see the znode they know
            obj["leaving"] = True
        return encode(obj)

    @classmethod
    def decode(cls, path: str, data: bytes | None) -> MemberInfo:
        obj = decode_object(path, data)
        weight = _number(path, obj, "weight")
        if not 0 < weight <= 1e6:
            raise CorruptZnode(f"{path}: weight must be in (0, 1e6], got {weight}")
        member = _text(path, obj, "id")
        if not valid_name(member):
            raise CorruptZnode(f"{path}: bad agent id {_show(member)}")
        zone = obj.get("zone") or ""
        if not isinstance(zone, str) or len(zone) > 64:
            raise CorruptZnode(f"{path}: bad zone {_show(zone)}")
        return cls(
            id=member,
            address=_text(path, obj, "address", limit=300),
            zone=zone,
            weight=weight,
            version=_text(path, obj, "version", "", limit=64),
            started=_number(path, obj, "started", 0.0),
            leaving=obj.get("leaving") is True,
        )


@dataclass(frozen=True)
class Assignment:
    """What the plan asks of one agent for one shard.

    A primary learns its in-sync ``peers`` (which must ack every write) and the replicas
    ``bootstrapping`` (which receive forwarded writes while they copy). A replica learns
    its ``primary`` and, while it must copy the shard, the ``source`` to copy from. Both
    learn the primary's ``term``: the plan generation that made it primary (>= 1).
    Encoded compactly, since an agent may hold thousands of shards:
    ``["P", [peers...], [bootstrapping...], term]`` or ``["R", primary, term]`` /
    ``["R", primary, term, source]``.
    """

    role: Role
    primary: str | None = None
    source: str | None = None
    peers: tuple[str, ...] = ()
    bootstrapping: tuple[str, ...] = ()
    term: int = 0

    def to_json(self) -> list[Any]:
        if self.role == Role.PRIMARY:
            return ["P", list(self.peers), list(self.bootstrapping), self.term]
        return ["R", self.primary, self.term] + ([self.source] if self.source else [])

    def json_text(self) -> str:
        """``to_json`` as compact JSON text, made once per instance (it is frozen): the
        leader re-encodes plans of thousands of assignments when one changes, and the
        others are the very objects of its previous plan."""
        text = self.__dict__.get("_text")
        if text is None:
            text = json.dumps(self.to_json(), separators=(",", ":"))
            object.__setattr__(self, "_text", text)
        return text

    @classmethod
    def from_json(cls, path: str, shard: str, raw: Any) -> Assignment:
        bad = CorruptZnode(f"{path}: bad assignment for shard {shard}: {raw!r}")
        if not isinstance(raw, list) or len(raw) < 3:
            raise bad
        head = raw[0]
        if head == "P" and len(raw) == 4 and _is_term(raw[3]) and all(
            isinstance(x, list) and all(valid_name(a) for a in x) for x in raw[1:3]
        ):
            return cls(Role.PRIMARY, peers=tuple(raw[1]), bootstrapping=tuple(raw[2]),
                       term=raw[3])
        if head == "R" and len(raw) in (3, 4) and valid_name(raw[1]) and _is_term(raw[2]) and (
            len(raw) == 3 or valid_name(raw[3])
        ):
            return cls(Role.REPLICA, primary=raw[1], source=raw[3] if len(raw) == 4 else None,
                       term=raw[2])
        raise bad


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_term(value: Any) -> bool:
    return _is_count(value) and value >= 1


@dataclass(frozen=True)
class AgentPlan:
    """One agent's target replicas: shard -> Assignment, written by the leader.

    ``generation`` is the plan generation in which this agent's assignment last changed;
    agents ignore an AgentPlan older than the one they applied.
    """

    generation: int
    epoch: int
    replicas: dict[int, Assignment] = field(default_factory=dict)

    def encode(self) -> bytes:
        """The same bytes as :func:`encode` of the whole object, built from each
        assignment's cached JSON: the leader rewrites an agent's plan of thousands of
        assignments when one of them changes, and most are the same objects as before."""
        fields = {"epoch": int(self.epoch), "generation": int(self.generation)}
        return _encode_with(fields, "replicas", self.replicas)

    @classmethod
    def decode(cls, path: str, data: bytes | None, previous: AgentPlan | None = None
               ) -> AgentPlan:
        """``previous``: the plan last decoded from the same znode; its unchanged
        assignments are taken over, the very objects (see :func:`_entries`)."""
        obj = decode_object(path, data)
        replicas, seen = _entries(
            path, _field(path, obj, "replicas", dict), previous,
            lambda shard, entry: Assignment.from_json(path, str(shard), entry))
        plan = cls(
            generation=_count(path, obj, "generation"),
            epoch=_count(path, obj, "epoch"),
            replicas=replicas,
        )
        object.__setattr__(plan, "_entries", seen)
        return plan


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
    summary: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return encode(
            {
                "summary": self.summary,
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
        shards = _count(path, obj, "shards")
        chunks = _count(path, obj, "chunks")
        if shards > MAX_SHARD + 1 or chunks != (shards + ROUTING_CHUNK - 1) // ROUTING_CHUNK:
            raise CorruptZnode(f"{path}: {shards} shards in {chunks} chunks do not add up")
        return cls(
            generation=_count(path, obj, "generation"),
            epoch=_count(path, obj, "epoch"),
            leader=_text(path, obj, "leader", limit=300),
            shards=shards,
            replicas=_count(path, obj, "replicas"),
            members=_names(path, obj.get("members"), "members"),
            chunks=chunks,
            shortfall=_count(path, obj, "shortfall", 0),
            created=_number(path, obj, "created", 0.0),
            summary=obj.get("summary") if isinstance(obj.get("summary"), dict) else {},
        )

    def leaving(self) -> dict[str, int]:
        """The leader's acknowledgement of leaving agents (summary ``leaving``): agent ->
        the primaries it keeps because no other in-sync replica can take them. Tolerant:
        the summary is advisory, so a malformed entry is simply absent."""
        raw = self.summary.get("leaving")
        if not isinstance(raw, dict):
            return {}
        return {a: n for a, n in raw.items() if valid_name(a) and _is_count(n)}


@dataclass(frozen=True)
class RoutingChunk:
    """The plan of shards ``first .. first + len(replicas) - 1``.

    ``replicas``: each shard's in-sync replicas, primary first (what clients route by).
    ``bootstrapping``: shard -> (agent, source) pairs still copying (sparse).
    ``targets``: shard -> the placement target, where it differs from ``replicas``
    (sparse), so that a new leader continues the moves in flight instead of re-deciding.
    """

    generation: int
    first: int
    replicas: tuple[tuple[str, ...], ...]
    bootstrapping: dict[int, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    targets: dict[int, tuple[str, ...]] = field(default_factory=dict)

    def encode(self) -> bytes:
        return encode(
            {
                "generation": self.generation,
                "first": self.first,
                "replicas": [list(r) for r in self.replicas],
                "bootstrapping": {
                    str(s): [list(p) for p in pairs]
                    for s, pairs in sorted(self.bootstrapping.items())
                },
                "targets": {str(s): list(t) for s, t in sorted(self.targets.items())},
            }
        )

    @classmethod
    def decode(cls, path: str, data: bytes | None) -> RoutingChunk:
        obj = decode_object(path, data)
        rows = _field(path, obj, "replicas", list)
        if len(rows) > ROUTING_CHUNK:
            raise CorruptZnode(f"{path}: {len(rows)} rows, at most {ROUTING_CHUNK}")
        replicas = tuple(_names(path, r, "replicas") for r in rows)
        boot: dict[int, tuple[tuple[str, str], ...]] = {}
        raw_boot = obj.get("bootstrapping") or {}
        if not isinstance(raw_boot, dict):
            raise CorruptZnode(f"{path}: bootstrapping must be an object")
        for key, pairs in raw_boot.items():
            if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(valid_name(x) for x in p)
                for p in pairs
            ):
                raise CorruptZnode(f"{path}: bad bootstrapping entry for shard {_show(key)}")
            boot[_shard(path, key)] = tuple((a, src) for a, src in pairs)
        targets: dict[int, tuple[str, ...]] = {}
        raw_targets = obj.get("targets") or {}
        if not isinstance(raw_targets, dict):
            raise CorruptZnode(f"{path}: targets must be an object")
        for key, agents in raw_targets.items():
            targets[_shard(path, key)] = _names(path, agents, "a target")
        return cls(
            generation=_count(path, obj, "generation"),
            first=_count(path, obj, "first"),
            replicas=replicas,
            bootstrapping=boot,
            targets=targets,
        )




@dataclass(frozen=True)
class ShardStatus:
    """One shard replica as its agent reports it. ``catching_up``: a replica that holds the
    shard but is still repairing or catching up, so not yet in sync (encoded only if set)."""

    state: str
    lsn: int = 0
    catching_up: bool = False
    reason: str = ""  # why it is in ERROR (a failed copy)

    @property
    def in_sync(self) -> bool:
        """Online and caught up: the one test the leader (joins) and `cluster.settled` use."""
        return self.state in HOLDING and not self.catching_up

    def encode(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"state": self.state, "lsn": self.lsn}
        if self.catching_up:
            entry["catching_up"] = True
        if self.reason:
            entry["reason"] = self.reason[:300]
        return entry

    def json_text(self) -> str:
        """``encode`` as JSON text, made once per instance (see Assignment.json_text)."""
        text = self.__dict__.get("_text")
        if text is None:
            text = encode(self.encode()).decode()
            object.__setattr__(self, "_text", text)
        return text


@dataclass(frozen=True)
class AgentStatus:
    """An agent's actual state: per shard its state (and LSN at the last state change)."""

    agent: str
    generation: int
    shards: dict[int, ShardStatus] = field(default_factory=dict)
    # Why the agent is not acting on its current plan znode ("" when it is): the leader
    # then writes that agent's plan afresh.
    refused: str = ""

    def errors(self) -> dict[int, str]:
        """shard -> reason, for the shards reported in ERROR; worked out once per
        instance (it is frozen), since the leader asks each pass and most report none."""
        found = self.__dict__.get("_errors")
        if found is None:
            found = {s: st.reason for s, st in self.shards.items() if st.state == "ERROR"}
            object.__setattr__(self, "_errors", found)
        return found

    def encode(self) -> bytes:
        """The same bytes as :func:`encode` of the whole object, from each entry's cached
        JSON: an agent reports hundreds of shards and most entries are the same objects
        as in its previous report."""
        fields: dict[str, Any] = {"agent": self.agent, "generation": self.generation}
        if self.refused:
            fields["refused"] = self.refused
        return _encode_with(fields, "shards", self.shards)

    @classmethod
    def decode(cls, path: str, data: bytes | None, previous: AgentStatus | None = None
               ) -> AgentStatus:
        """``previous``: the status last decoded from the same znode, whose unchanged
        entries are taken over instead of decoded again (see :func:`_entries`)."""
        obj = decode_object(path, data)

        def entry_of(shard: int, entry: Any) -> ShardStatus:
            state = entry.get("state") if isinstance(entry, dict) else None
            if not isinstance(state, str) or state not in STATES:
                raise CorruptZnode(f"{path}: bad entry for shard {shard}: {_show(entry)}")
            return ShardStatus(
                state=entry["state"],
                lsn=_count(path, entry, "lsn", 0),
                catching_up=entry.get("catching_up") is True,
                reason=_text(path, entry, "reason", "", limit=300),
            )

        shards, seen = _entries(path, _field(path, obj, "shards", dict), previous, entry_of)
        status = cls(
            agent=_text(path, obj, "agent", limit=64),
            generation=_count(path, obj, "generation"),
            shards=shards,
            refused=_text(path, obj, "refused", "", limit=1024),
        )
        object.__setattr__(status, "_entries", seen)
        return status


def encode_epoch(leader: str, liveness: str = "") -> bytes:
    """The epoch znode's content: the leader's id, and where agents hold their liveness
    link to it (coordinator/liveness.py; "" when it serves none)."""
    return encode({"leader": leader, "liveness": liveness} if liveness else {"leader": leader})


def decode_epoch(path: str, data: bytes | None) -> str:
    return _text(path, decode_object(path, data), "leader", limit=300)


def decode_liveness(path: str, data: bytes | None) -> str:
    """The leader's liveness address from the epoch znode, "" if none."""
    return _text(path, decode_object(path, data), "liveness", "", limit=300)


@dataclass(frozen=True)
class Maintenance:
    """Maintenance mode: no moves, primaries still fail over. ``reason`` is "manual" or
    "auto" (entered by the mass-departure guard, which also leaves it on its own when
    enough of the ``missing`` members return)."""

    reason: str
    since: float
    note: str = ""
    missing: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return encode({"reason": self.reason, "since": self.since, "note": self.note,
                       "missing": list(self.missing)})

    @classmethod
    def decode(cls, path: str, data: bytes | None) -> Maintenance:
        obj = decode_object(path, data)
        return cls(
            reason=_text(path, obj, "reason", limit=64),
            since=_number(path, obj, "since"),
            note=_text(path, obj, "note", "", limit=4096),
            missing=_names(path, obj.get("missing", []), "missing"),
        )


@dataclass(frozen=True)
class RotationStep:
    """A token rotation under way: ``step`` is "begun" (the token znode lists the old token,
    then the new) or "switched" (the new, then the old); ``new`` the new token's fingerprint
    (``shardkeeper.token.fingerprint``), never the token."""

    step: str
    new: str
    since: float

    STEPS = ("begun", "switched")

    def encode(self) -> bytes:
        return encode({"step": self.step, "new": self.new, "since": self.since})

    @classmethod
    def decode(cls, path: str, data: bytes | None) -> RotationStep:
        obj = decode_object(path, data)
        step = _text(path, obj, "step", limit=16)
        if step not in cls.STEPS:
            raise CorruptZnode(f"{path}: step {_show(step)} is not one of {', '.join(cls.STEPS)}")
        return cls(step, _text(path, obj, "new", limit=64), _number(path, obj, "since"))


@dataclass(frozen=True)
class MoveRequest:
    """`shardkeeper move SHARD --from A --to B`, carried out (or refused) by the leader."""

    shard: int
    source: str
    dest: str

    def encode(self) -> bytes:
        return encode({"shard": self.shard, "from": self.source, "to": self.dest})

    @classmethod
    def decode(cls, path: str, data: bytes | None) -> MoveRequest:
        obj = decode_object(path, data)
        return cls(
            shard=_count(path, obj, "shard"),
            source=_text(path, obj, "from", limit=64),
            dest=_text(path, obj, "to", limit=64),
        )


@dataclass(frozen=True)
class AuditEvent:
    """One entry of the audit log under events/."""

    time: float
    kind: str
    message: str
    generation: int = 0

    def encode(self) -> bytes:
        return encode(self.to_json())

    @classmethod
    def decode(cls, path: str, data: bytes | None) -> AuditEvent:
        obj = decode_object(path, data)
        return cls(
            time=_number(path, obj, "time"),
            kind=_text(path, obj, "kind", limit=64),
            message=_text(path, obj, "message", limit=65536),
            generation=_count(path, obj, "generation", 0),
        )

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "kind": self.kind, "message": self.message,
                "generation": self.generation}


def encode_events(events: list[AuditEvent]) -> bytes:
    """One audit znode holds every decision of one leader pass (one write per pass)."""
    return encode({"events": [e.to_json() for e in events]})


def decode_events(path: str, data: bytes | None) -> list[AuditEvent]:
    obj = decode_object(path, data)
    entries = _field(path, obj, "events", list)
    if not all(isinstance(e, dict) for e in entries):
        raise CorruptZnode(f"{path}: events must be objects")
    return [AuditEvent.decode(path, encode(e)) for e in entries]
