"""The cluster model: members, the plan value, eligibility, zones, zone caps, fair shares,
integer quotas; and the plan being built (:class:`Work`), which every phase edits."""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, islice, repeat
from operator import itemgetter, ne

import xxhash


@dataclass(frozen=True)
class Member:
    id: str
    zone: str = ""  # "" = no zone: the agent is a failure domain of its own
    weight: float = 1.0  # > 0
    draining: bool = False  # draining members get target 0 and never receive a new replica


@dataclass(frozen=True)
class Placement:
    replicas: tuple[tuple[str, ...], ...]  # index = shard; agent ids, primary first
    shortfall: int  # replicas that could not be placed (R > eligible agents)
    moves: int = 0  # replicas on an agent that did not hold that shard in `previous`
    primary_changes: int = 0  # shards whose primary differs from `previous` (if it had one)
    complete: bool = True  # False: `should_stop` cut levelling short (valid, balance may be off)


@dataclass(frozen=True)
class Cluster:
    shards: int
    per_shard: int  # replicas placed per shard: min(R, eligible agents)
    agents: tuple[str, ...]  # eligible agents, sorted by id
    member_set: frozenset[str]
    weight: Mapping[str, float]
    zone: Mapping[str, str]  # zone key per agent; zone-less agents get a key of their own
    zone_cap: int  # most replicas of one shard in one zone
    fair: Mapping[str, float]
    quota: Mapping[str, int]  # integer targets: largest remainder of `fair`, summing to S*per_shard
    lo: Mapping[str, int]
    hi: Mapping[str, int]
    rank: Mapping[str, int]  # hash of the id: breaks ties without favouring low ids
    zoned: bool  # some agent has a zone
    by_zone: Mapping[str, tuple[str, ...]]


def _validate(members: Sequence[Member], shards: int, replicas: int) -> None:
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    seen: set[str] = set()
    for m in members:
        if not isinstance(m.id, str) or not m.id:
            raise ValueError(f"member id must be a non-empty string, got {m.id!r}")
        if m.id in seen:
            raise ValueError(f"member {m.id!r} is listed twice")
        seen.add(m.id)
        if not (isinstance(m.weight, int | float) and math.isfinite(m.weight) and m.weight > 0):
            raise ValueError(
                f"member {m.id!r}: weight must be a finite number > 0, got {m.weight!r}"
            )


def zone_key(member: Member) -> str:
    # Prefixes keep a zone name from colliding with the id of a zone-less agent.
    return sys.intern("z:" + member.zone) if member.zone else "a:" + member.id


def zone_cap(zone_sizes: Sequence[int], per_shard: int) -> int:
    """Smallest per-zone cap that still lets every shard have per_shard replicas."""
    if per_shard <= 0:
        return 1
    cap = -(-per_shard // len(zone_sizes))
    while sum(min(cap, n) for n in zone_sizes) < per_shard:
        cap += 1
    return cap


def water_fill(total: float, weights: Sequence[float], caps: Sequence[float]) -> list[float]:
    """Split total in proportion to weights with no item above its cap (progressive filling).

    Assumes total <= sum(caps)."""
    order = sorted(range(len(weights)), key=lambda i: (caps[i] / weights[i], i))
    out = [0.0] * len(weights)
    left = float(total)
    weight_left = math.fsum(weights)
    for k, i in enumerate(order):
        if left >= caps[i] * weight_left / weights[i]:
            out[i] = float(caps[i])
            left -= caps[i]
            weight_left -= weights[i]
            continue
        level = left / weight_left
        for j in order[k:]:
            out[j] = min(float(caps[j]), level * weights[j])
        break
    return out


def _snap(x: float) -> float:
    # Float noise must not turn an exact share like 1024 into [1023, 1024] or [1024, 1025].
    r = round(x)
    return float(r) if abs(x - r) <= 1e-9 * max(1.0, abs(x)) else x


def zone_fair_shares(
    agents: Sequence[str],
    weight: Mapping[str, float],
    zone: Mapping[str, str],
    total: int,
    shards: int,
    cap: int,
) -> dict[str, float]:
    """Weight-proportional shares of total, at most `shards` per agent and
    `shards * min(cap, zone size)` per zone (the most a zone can hold under the zone rule)."""
    by_zone: dict[str, list[str]] = {}
    for a in agents:
        by_zone.setdefault(zone[a], []).append(a)
    zone_total = {z: shards * min(cap, len(m)) for z, m in by_zone.items()}
    fair: dict[str, float] = {}
    # A zone of one agent can hold no more than the agent itself: only larger zones can bind.
    open_zones = list(by_zone) if any(len(m) > 1 for m in by_zone.values()) else []
    if not open_zones:
        ws = [weight[a] for a in agents]
        fair.update(zip(agents, water_fill(total, ws, [shards] * len(ws)), strict=True))
    left = float(total)
    while open_zones:
        members = [a for z in open_zones for a in by_zone[z]]
        ws = [weight[a] for a in members]
        shares = dict(zip(members, water_fill(left, ws, [shards] * len(ws)), strict=True))
        full = [
            z
            for z in open_zones
            if sum(shares[a] for a in by_zone[z]) > zone_total[z] * (1 + 1e-12)
        ]
        if not full:
            fair.update(shares)
            break
        # A zone over its capacity is capped; its surplus goes to the other zones.
        for z in full:
            ws = [weight[a] for a in by_zone[z]]
            shares = water_fill(zone_total[z], ws, [shards] * len(ws))
            fair.update(zip(by_zone[z], shares, strict=True))
            left -= zone_total[z]
            open_zones.remove(z)
    return {a: _snap(fair[a]) for a in agents}


def largest_remainder(
    fair: Mapping[str, float],
    total: int,
    rank: Mapping[str, int],
    group: Mapping[str, str] | None = None,
    group_cap: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Integers within floor/ceil of `fair` summing to `total`, the +1s going to the largest
    fractional parts, never pushing a group (zone) above its cap."""
    q = {a: math.floor(f) for a, f in fair.items()}
    left = total - sum(q.values())
    room: dict[str, int] = {}
    if group is not None and group_cap is not None:
        for a, n in q.items():
            room[group[a]] = room.get(group[a], group_cap[group[a]]) - n
    order = sorted(fair, key=lambda a: (q[a] - fair[a], rank[a]))
    # The second pass only matters if float noise left the fractional parts short of `left`.
    for exact_ok in (False, True):
        for a in order:
            if left <= 0:
                return q
            if (fair[a] > q[a] or exact_ok) and (group is None or room[group[a]] > 0):
                q[a] += 1
                left -= 1
                if group is not None:
                    room[group[a]] -= 1
    return q


def cluster_model(members: Sequence[Member], shards: int, replicas: int) -> Cluster:
    _validate(members, shards, replicas)
    eligible = sorted((m for m in members if not m.draining), key=lambda m: m.id)
    agents = tuple(m.id for m in eligible)
    weight = {m.id: float(m.weight) for m in eligible}
    zone = {m.id: zone_key(m) for m in eligible}
    rank = {a: xxhash.xxh64_intdigest(a.encode()) for a in agents}
    per_shard = min(replicas, len(agents))
    sizes = Counter(zone.values())
    cap = zone_cap(list(sizes.values()), per_shard) if agents else 1
    total = shards * per_shard
    fair = zone_fair_shares(agents, weight, zone, total, shards, cap)
    zone_total = {z: shards * min(cap, n) for z, n in sizes.items()}
    quota = largest_remainder(fair, total, rank, zone, zone_total)
    lo = {a: min(quota[a], math.floor(fair[a])) for a in agents}
    hi = {a: max(quota[a], math.ceil(fair[a])) for a in agents}
    by_zone: dict[str, list[str]] = {}
    for a in agents:
        by_zone.setdefault(zone[a], []).append(a)
    return Cluster(
        shards=shards,
        per_shard=per_shard,
        agents=agents,
        member_set=frozenset(agents),
        weight=weight,
        zone=zone,
        zone_cap=cap,
        fair=fair,
        quota=quota,
        lo=lo,
        hi=hi,
        rank=rank,
        zoned=any(m.zone for m in eligible),
        by_zone={z: tuple(m) for z, m in by_zone.items()},
    )


def fair_shares(members: Sequence[Member], shards: int, replicas: int) -> dict[str, float]:
    """Each member's fair share of the S * min(R, eligible) replicas (0.0 when draining).

    place() keeps every agent's replica count within floor/ceil of this figure."""
    cl = cluster_model(members, shards, replicas)
    return {m.id: cl.fair.get(m.id, 0.0) for m in members}


def primary_targets(
    cl: Cluster, load: Mapping[str, int], primaries: int
) -> tuple[dict[str, float], dict[str, int], dict[str, int], dict[str, int]]:
    """Primary shares: weight-proportional over the shards, capped at the replicas held."""
    agents = cl.agents
    caps = [load.get(a, 0) for a in agents]
    shares = water_fill(primaries, [cl.weight[a] for a in agents], caps)
    share = {a: _snap(f) for a, f in zip(agents, shares, strict=True)}
    q = largest_remainder(share, primaries, cl.rank)
    lo = {a: min(q[a], math.floor(share[a])) for a in agents}
    hi = {a: max(q[a], math.ceil(share[a])) for a in agents}
    return share, q, lo, hi


# ---------------------------------------------------------------------------------------
# The plan being built. A row is the replica list of one shard: agent ids, primary first.
# Rows taken unchanged from `previous` stay the caller's objects (often tuples); a row is
# copied into a list the first time it changes and its shard is recorded in `touched`, so a
# membership change costs time in proportion to what changes, not to S * R.


class Work:
    """The rows being planned and the counts that the steps keep up to date."""

    def __init__(self, cl: Cluster, rows: list, load: dict[str, int], touched: set[int]):
        self.cl = cl
        self.rows = rows
        self.load = load
        self.touched = touched
        self.pc: dict[str, int] = {}  # primaries per agent, kept up to date once counted
        self.previous: Sequence[Sequence[str]] = ()
        self.should_stop: Callable[[], bool] | None = None
        self.cut_short = False
        self._heads: list[str | None] | None = None  # see previous_heads
        self._sorted: list[int] | None = None  # see sorted_touched

    def out_of_time(self) -> bool:
        """Whether the caller's `should_stop` asked to stop; once it has, it stays so.
        Asked only between steps that leave the plan valid."""
        if not self.cut_short and self.should_stop is not None and self.should_stop():
            self.cut_short = True
        return self.cut_short

    def original(self, s: int) -> Sequence[str]:
        """The agents that held shard s in `previous` (moves are counted against them)."""
        return self.previous[s] if s < len(self.previous) else ()

    def sorted_touched(self) -> list[int]:
        """The touched shards in order (made again only when more were touched since:
        `touched` only grows)."""
        if self._sorted is None or len(self._sorted) != len(self.touched):
            self._sorted = sorted(self.touched)
        return self._sorted

    def previous_heads(self) -> list[str | None]:
        """Each shard's primary in `previous` (None: it had none), made once per call."""
        if self._heads is None:
            heads = list(map(next, map(iter, self.previous[: self.cl.shards]), repeat(None)))
            self._heads = heads + [None] * (self.cl.shards - len(heads))
        return self._heads

    def new_primaries(self, shards: Sequence[int]) -> list[bool]:
        """For each of these shards, whether its primary differs from `previous`' (or it had
        none): C-level passes, as a change can touch every row."""
        old = map(self.previous_heads().__getitem__, shards)
        return list(map(ne, old, map(itemgetter(0), map(self.rows.__getitem__, shards))))

    def writable(self, s: int) -> list[str]:
        row = self.rows[s]
        if s not in self.touched:
            row = self.rows[s] = list(row)
            self.touched.add(s)
        return row

    def count_primaries(self) -> None:
        self.pc = dict(Counter(map(itemgetter(0), filter(None, self.rows))))

    def replace(self, s: int, i: int, b: str) -> None:
        """Move the replica at position i of shard s to agent b (b takes over its role)."""
        row = self.writable(s)
        a = row[i]
        row[i] = b
        self.load[a] -= 1
        self.load[b] = self.load.get(b, 0) + 1
        if i == 0 and self.pc:
            self.pc[a] -= 1
            self.pc[b] = self.pc.get(b, 0) + 1

    def promote(self, s: int, b: str) -> None:
        """Make b, already a replica of shard s, its primary; the others keep their order."""
        row = self.writable(s)
        a = row[0]
        row.remove(b)
        row.insert(0, b)
        self.pc[a] -= 1
        self.pc[b] = self.pc.get(b, 0) + 1

    def scan(self, start: int) -> tuple[Iterable[int], Iterable[Sequence[str]]]:
        """Shard numbers and rows, cyclically from `start` (rows read lazily: a row replaced
        while scanning is seen as it is when reached)."""
        n = self.cl.shards
        start %= n
        return chain(range(start, n), range(start)), chain(
            islice(self.rows, start, None), islice(self.rows, 0, start)
        )


@dataclass(frozen=True)
class Bounds:
    """Where each agent's count (replicas, or primaries) must end: within [lo, hi]."""

    count: Mapping[str, int]
    lo: Mapping[str, int]
    hi: Mapping[str, int]

    def over(self, a: str) -> int:
        """How far a is above its ceiling (0 at or below it)."""
        return max(0, self.count.get(a, 0) - self.hi[a])

    def under(self, a: str) -> bool:
        return self.count.get(a, 0) < self.lo[a]

    def room(self, a: str) -> int:
        """How many more a may take before its ceiling (0 at or above it)."""
        return max(0, self.hi[a] - self.count.get(a, 0))

    def short(self, a: str) -> int:
        """How many a lacks to reach its floor (0 at or above it)."""
        return max(0, self.lo[a] - self.count.get(a, 0))

    def spare(self, a: str) -> int:
        """How many a may give before its floor (0 at or below it)."""
        return max(0, self.count.get(a, 0) - self.lo[a])


def fits_row(row: Sequence[str], zones: Sequence[str], agent: str, z: str, cap: int) -> bool:
    if cap == 1:
        return z not in zones  # zone-less agents have unique zone keys: covers duplicates
    return agent not in row and zones.count(z) < cap
