"""Placement: which agents hold each shard's replicas, primary first.

Pure code (plain data in, plain data out): no I/O, no clock, no ZooKeeper. The next plan
is a deterministic function of (previous plan, members, shards, replicas).

- Keys map to shards in :mod:`shardkeeper.ring` (xxhash64 onto S equal token ranges).
- Shards map to agents with :func:`place`: a new cluster is seeded from a hash; afterwards
  every valid replica stays where it is, orphaned replicas go to the agents furthest below
  their weighted fair share, and over- and under-loaded agents are levelled with as few
  moves as possible. Primaries are balanced by reordering replica lists.

Guarantees (docs/placement.md has the reasoning and the measured figures):

- no agent twice in a shard; draining and unknown agents hold nothing;
- every shard has min(R, eligible agents) replicas; the rest is reported as ``shortfall``;
- zones: no zone holds more than ``zone_cap`` replicas of a shard, which is 1 when there
  are at least R zones, and otherwise the smallest even spread the zones' sizes allow
  (ceil(R / zones) unless small zones force more). An agent without a zone is a zone of
  its own. The zone rule is never broken for balance;
- balance: every agent's replica count is within floor/ceil of its fair share
  (weight-proportional, capped at S per agent and at S * zone_cap per zone, see
  :func:`fair_shares`), and its primary count within floor/ceil of its primary share
  (weight-proportional over S, capped at the replicas it holds). Levelling is a search
  (direct moves, then chains of moves); should the zone rule leave no way to the bound,
  the zone rule wins and the plan stays valid;
- movement: a valid replica moves only when levelling needs it. After a single change:
  when an agent leaves, exactly its replicas move whenever that is possible at all; when
  one joins, at most the ceiling of its fair share moves. The tests check both against an
  exact (max-flow) oracle of what is possible.
"""

from __future__ import annotations

import heapq
import math
import random
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial, reduce
from itertools import chain, combinations, compress, islice
from operator import and_, eq, itemgetter, not_

import xxhash

__all__ = ["Member", "Placement", "fair_shares", "place"]


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


# ---------------------------------------------------------------------------------------
# The cluster model: who is eligible, zones, fair shares and integer quotas.


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
        self.fresh: dict[str, list[int]] = {}  # agent -> shards it was re-homed to this round
        self.previous: Sequence[Sequence[str]] = ()

    def original(self, s: int) -> Sequence[str]:
        """The agents that held shard s in `previous` (moves are counted against them)."""
        return self.previous[s] if s < len(self.previous) else ()

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


def _fits(row: Sequence[str], zones: Sequence[str], agent: str, z: str, cap: int) -> bool:
    if cap == 1:
        return z not in zones  # zone-less agents have unique zone keys: covers duplicates
    return agent not in row and zones.count(z) < cap


# ---------------------------------------------------------------------------------------
# Filling empty places: seeding a new cluster and re-homing orphaned replicas.


def jittered(counts: Iterable[tuple[str, int]], rnd: random.Random) -> list[str]:
    """A stream of agent slots: an agent with k slots gets one at a random point of each
    1/k-wide interval of [0, 1), and the stream is all slots in time order.

    Each agent's slots stay evenly spread (so one shard rarely draws an agent twice) while
    the neighbours of a slot are a fresh random mix (so an agent's peers are diverse)."""
    keys: list[float] = []
    owners: list[str] = []
    r = rnd.random
    for a, k in counts:
        if k > 0:
            step = 1.0 / k
            keys.extend([(j + r()) * step for j in range(k)])
            owners.extend([a] * k)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return list(map(owners.__getitem__, order))


def deal(w: Work, holes: Sequence[int], stream: Iterable[str]) -> tuple[list[int], list[str]]:
    """Fill each shard in `holes` up to per_shard replicas from `stream`, in order.

    A slot the shard cannot take (same agent, full zone) waits, by zone, and waiting slots
    are offered first to the next shards. Returns the shards still short and the slots left
    over."""
    zone, cap, load = w.cl.zone, w.cl.zone_cap, w.load
    per_shard = w.cl.per_shard
    slots = iter(stream)
    waiting: dict[str, deque[str]] = {}
    short: list[int] = []
    for s in holes:
        row = w.writable(s)
        zones = [zone[a] for a in row]
        need = per_shard - len(row)
        if waiting and need:
            for z in list(waiting):
                if zones.count(z) >= cap:
                    continue
                queue = waiting[z]
                for a in queue:
                    if a not in row:
                        queue.remove(a)
                        row.append(a)
                        zones.append(z)
                        load[a] = load.get(a, 0) + 1
                        need -= 1
                        break
                if not queue:
                    del waiting[z]
                if not need:
                    break
        for a in slots if need > 0 else ():
            z = zone[a]
            if (z not in zones) if cap == 1 else _fits(row, zones, a, z, cap):
                row.append(a)
                zones.append(z)
                load[a] = load.get(a, 0) + 1
                need -= 1
                if not need:
                    break
            elif z in waiting:
                waiting[z].append(a)
            else:
                waiting[z] = deque((a,))
        if need > 0:
            short.append(s)
    return short, [a for queue in waiting.values() for a in queue] + list(slots)


def fill_short(
    w: Work, holes: Sequence[int], short: Sequence[int], spare: list[str], base: Mapping[int, int]
) -> None:
    """Complete the shards the stream left short (its last slots did not fit them).

    A left-over slot that does not fit a short shard directly may swap with a replica placed
    in this same round in another hole (rows[t][base[t]:]): that costs no extra move. Only
    then does a shard take the allowed agent furthest below its fair share, and levelling
    repairs the difference."""
    cl, load, zone, cap = w.cl, w.load, w.cl.zone, w.cl.zone_cap

    def fits(row: Sequence[str], a: str, without: str | None = None) -> bool:
        zones = [zone[x] for x in row if x != without]
        return a != without and a not in row and zones.count(zone[a]) < cap

    def place_one(s: int) -> None:
        row = w.writable(s)
        spare.sort(key=lambda a: (load.get(a, 0) - cl.fair[a], cl.rank[a]))
        for k, b in enumerate(spare):
            if fits(row, b):
                row.append(b)
                load[b] = load.get(b, 0) + 1
                del spare[k]
                return
            for t in reversed(holes):
                other = w.rows[t]
                for i in range(base.get(t, 0), len(other)):
                    c = other[i]
                    if fits(row, c) and fits(other, b, without=c):
                        w.writable(t)[i] = b
                        row.append(c)
                        load[b] = load.get(b, 0) + 1
                        del spare[k]
                        return
        best = min(
            (a for a in cl.agents if fits(row, a)),
            key=lambda a: (load.get(a, 0) - cl.fair[a], cl.rank[a]),
        )
        row.append(best)
        load[best] = load.get(best, 0) + 1

    for s in short:
        while len(w.rows[s]) < cl.per_shard:
            place_one(s)


def seed_rows(cl: Cluster, rnd: random.Random) -> Work:
    """A new cluster: primaries dealt from one stream (so they start balanced), the other
    replicas from a second one; together they give each agent exactly its quota."""
    _, pq, _, _ = primary_targets(cl, cl.quota, cl.shards)
    primaries = jittered(((a, pq[a]) for a in cl.agents), rnd)
    others = jittered(((a, cl.quota[a] - pq[a]) for a in cl.agents), rnd)
    w = Work(cl, [[a] for a in primaries], dict(Counter(primaries)), set(range(cl.shards)))
    holes = range(cl.shards)
    short, spare = deal(w, holes, others)
    fill_short(w, holes, short, spare, {})
    return w


def _suspects(rows: list, cl: Cluster) -> list[int]:
    """Shards whose row may break a rule. Most rows are valid, so they are screened with
    C-level passes over columns (row[j] of every shard) instead of a Python loop per row."""
    shards, per_shard, cap = cl.shards, cl.per_shard, cl.zone_cap
    groups = list(combinations(range(per_shard), cap + 1))
    if set(map(len, rows)) != {per_shard} or len(groups) > 64:
        valid = cl.member_set.issuperset
        zget = cl.zone.get
        zoned = cl.zoned or cap > 1
        found = []
        for s, row in enumerate(rows):
            broken = len(row) != per_shard or not valid(row) or len(set(row)) != per_shard
            if broken or (zoned and max(Counter(map(zget, row)).values()) > cap):
                found.append(s)
        return found
    flat = list(chain.from_iterable(rows))
    found_set: set[int] = set()
    gone = set(flat).difference(cl.member_set)
    if gone:
        found_set.update(compress(range(shards), map(not_, map(gone.isdisjoint, rows))))

    def all_equal(columns: list[list], group: Sequence[int]) -> Iterable[bool]:
        first = columns[group[0]]
        return reduce(partial(map, and_), (map(eq, first, columns[j]) for j in group[1:]))

    ids = [flat[j::per_shard] for j in range(per_shard)]
    # Zone-less agents have zone keys of their own: with cap 1, equal keys catch duplicates.
    if cl.zoned or cap > 1:
        keys = list(map(cl.zone.get, flat))
        zones = [keys[j::per_shard] for j in range(per_shard)]
    else:
        zones = ids
    if cap > 1:
        for pair in combinations(range(per_shard), 2):
            found_set.update(compress(range(shards), all_equal(ids, pair)))
    for group in groups:
        found_set.update(compress(range(shards), all_equal(zones, group)))
    return sorted(found_set)


def keep_valid(
    previous: Sequence[Sequence[str]], cl: Cluster
) -> tuple[Work, dict[int, int], list[int]]:
    """Keep every valid replica where it is: on an eligible agent, once per shard, within the
    zone cap and the replica count. Returns the work, the shards whose primary was dropped
    (-> how many of their replicas survived) and the shards short of replicas."""
    shards, per_shard, cap = cl.shards, cl.per_shard, cl.zone_cap
    rows = list(previous[:shards])
    if len(rows) < shards:
        rows.extend([()] * (shards - len(rows)))
    if not set(map(type, rows)) <= {tuple, list}:
        # A corrupt entry (None, a bare string) holds nothing rather than stopping the plan.
        rows = [r if isinstance(r, tuple | list) else () for r in rows]
    original = list(rows)
    touched: set[int] = set()
    headless: dict[int, int] = {}
    holes: list[int] = []
    zone = cl.zone
    for s in _suspects(rows, cl):
        row = rows[s]
        kept: list[str] = []
        zones: list[str] = []
        for a in row:
            if len(kept) < per_shard and a in cl.member_set:
                z = zone[a]
                if a not in kept and zones.count(z) < cap:
                    kept.append(a)
                    zones.append(z)
        if len(kept) != len(row):
            rows[s] = kept
            touched.add(s)
            if kept and kept[0] != row[0]:
                headless[s] = len(kept)
        if len(kept) < per_shard:
            holes.append(s)
    w = Work(cl, rows, dict(Counter(chain.from_iterable(rows))), touched)
    w.previous = original
    return w, headless, holes


def rehome_orphans(w: Work, holes: list[int], rnd: random.Random) -> None:
    """Fill the places of dropped replicas from the agents' deficits: first what lifts agents
    to the floor of their fair share, then up to their quota, so nothing needs levelling."""
    cl, load = w.cl, w.load
    if not holes:
        return
    floor_gap = [(a, cl.lo[a] - load.get(a, 0)) for a in cl.agents]
    quota_gap = [(a, cl.quota[a] - max(cl.lo[a], load.get(a, 0))) for a in cl.agents]
    stream = chain(jittered(floor_gap, rnd), jittered(quota_gap, rnd))
    base = {s: len(w.rows[s]) for s in holes}
    short, spare = deal(w, holes, stream)
    fill_short(w, holes, short, spare, base)
    for s in holes:
        for a in w.rows[s][base[s] :]:
            w.fresh.setdefault(a, []).append(s)


# ---------------------------------------------------------------------------------------
# Levelling replica counts to within floor/ceil of the fair shares.


def _receiver(
    heap: list, row: Sequence[str], donor: str, cl: Cluster, load: Mapping, limit: Mapping
) -> str | None:
    """Pop the agent furthest below its fair share (and below its `limit`) that may replace
    `donor` in `row`."""
    zone, cap, fair, hi = cl.zone, cl.zone_cap, cl.fair, limit
    zones = [zone[a] for a in row if a != donor]
    skipped = []
    found = None
    while heap:
        entry = heapq.heappop(heap)
        gap, _, b = entry
        if load.get(b, 0) >= hi[b] or gap != load.get(b, 0) - fair[b]:
            continue  # stale entry
        if b not in row and zones.count(zone[b]) < cap:
            found = b
            break
        skipped.append(entry)
    for entry in skipped:
        heapq.heappush(heap, entry)
    return found


def shed_overload(w: Work, over: list[str], pshare: Mapping[str, float], strict: bool) -> bool:
    """One pass over the shards moving replicas off agents above the ceiling of their fair
    share, each to the allowed agent furthest below its own.

    When `strict`, only agents below their floor receive (a shard that cannot give to one
    is passed over: another shard of the same donor may), and a primary is handed over only
    by an agent with primaries to spare to one short of them: both avoid moves that a later
    step would have to undo. Returns whether anything moved."""
    cl, load, pc = w.cl, w.load, w.pc
    fair, rank = cl.fair, cl.rank
    hi = cl.lo if strict else cl.hi
    donors = set(over)
    heap = [(load.get(b, 0) - fair[b], rank[b], b) for b in cl.agents if load.get(b, 0) < hi[b]]
    heapq.heapify(heap)
    if not heap:
        return False
    moved = False
    shards, rows = w.scan(heap[0][1])
    for s in compress(shards, map(not_, map(donors.isdisjoint, rows))):
        row = w.rows[s]
        spots = [i for i, a in enumerate(row) if a in donors]
        if spots[0] == 0 and pc.get(row[0], 0) <= pshare[row[0]]:
            spots.append(spots.pop(0))
        for i in spots:
            a = row[i]
            b = _receiver(heap, row, a, cl, load, hi)
            if b is None:
                continue
            if i == 0 and strict and pc.get(b, 0) >= pshare[b]:
                heapq.heappush(heap, (load.get(b, 0) - fair[b], rank[b], b))
                continue
            w.replace(s, i, b)
            moved = True
            if load[a] <= cl.hi[a]:
                donors.discard(a)
            if load[b] < hi[b]:
                heapq.heappush(heap, (load[b] - fair[b], rank[b], b))
            break
        if not donors or not heap:
            break
    return moved


def fill_underload(w: Work, under: list[str], pshare: Mapping[str, float]) -> bool:
    """For each agent below the floor of its fair share, take replicas from agents above
    their floor, the most loaded first. Returns whether anything moved."""
    cl, load, pc = w.cl, w.load, w.pc
    zone, cap, fair, lo = cl.zone, cl.zone_cap, cl.fair, cl.lo
    moved = False
    for b in sorted(under, key=lambda b: (load.get(b, 0) - fair[b], cl.rank[b])):
        zb = zone[b]
        shards, rows = w.scan(cl.rank[b])
        for s, row in zip(shards, rows, strict=True):
            if load.get(b, 0) >= lo[b]:
                break
            if b in row:
                continue
            same = sum(1 for a in row if zone[a] == zb)
            best = None
            for i, a in enumerate(row):
                if load[a] > lo[a] and (zone[a] == zb or same < cap):
                    # Prefer the most loaded; hand over a primary only if it is spare here.
                    spare = i == 0 and pc.get(a, 0) > pshare[a] and pc.get(b, 0) < pshare[b]
                    key = (i != 0 or spare, load[a] - fair[a])
                    if best is None or key > best[0]:
                        best = (key, i)
            if best is None:
                continue
            w.replace(s, best[1], b)
            moved = True
    return moved


def _load_chain(
    w: Work, held: Mapping[str, list[int]], sources: list[str], is_sink: Callable[[str], bool]
) -> list[tuple[int, str, str]] | None:
    """Cheapest chain a0 -> a1 -> ... -> ak of moves, each in a different shard (a_i's replica
    there goes to a_{i+1}), from a source to a sink; the agents between keep their count.

    The cost of a chain is the moves it adds against `previous`: a step onto an agent that
    held the shard before, or off a replica placed this round, adds none. Search is a
    0-1 BFS, so a free detour is preferred to a shorter chain that moves one more replica.
    A step is checked against its shard as the earlier steps of the chain left it."""
    cl = w.cl
    zone, cap = cl.zone, cl.zone_cap
    dist: dict[str, int] = dict.fromkeys(sources, 0)
    parent: dict[str, tuple[str, int] | None] = dict.fromkeys(sources)
    done: set[str] = set()
    queue = deque(sources)
    best: str | None = None
    while queue:
        a = queue.popleft()
        if a in done:
            continue
        if best is not None and dist[a] >= dist[best]:
            break
        done.add(a)
        path = _unwind(parent, a)
        for s in held.get(a, ()):
            row = _as_left_by(w.rows[s], s, path)
            old = w.original(s)
            paid = a in old
            zones = Counter(zone[x] for x in row if x != a)
            for z, members in cl.by_zone.items():
                if zones.get(z, 0) >= cap:
                    continue
                for b in members:
                    if b in done or b in row:
                        continue
                    d = dist[a] + (1 if paid and b not in old else 0)
                    if d >= dist.get(b, d + 1):
                        continue
                    dist[b] = d
                    parent[b] = (a, s)
                    if is_sink(b):
                        if d == dist[a]:
                            return _unwind(parent, b)
                        if best is None or d < dist[best]:
                            best = b
                    elif d == dist[a]:
                        queue.appendleft(b)
                    else:
                        queue.append(b)
    return _unwind(parent, best) if best is not None else None


def _unwind(parent: Mapping[str, tuple[str, int] | None], b: str) -> list[tuple[int, str, str]]:
    """The chain of moves (shard, from, to) that reaches b, first move first."""
    steps: list[tuple[int, str, str]] = []
    step = parent[b]
    while step is not None:
        steps.append((step[1], step[0], b))
        b = step[0]
        step = parent[b]
    steps.reverse()
    return steps


def _as_left_by(row: Sequence[str], s: int, path: list[tuple[int, str, str]]) -> Sequence[str]:
    for t, x, y in path:
        if t == s:
            row = [y if a == x else a for a in row]
    return row


def augment_load(
    w: Work,
    sources_of: Callable[[], list[str]],
    is_sink: Callable[[str], bool],
    held: dict[str, list[int]] | None = None,
) -> bool:
    """Move replicas along chains (see _load_chain) until no source is left; only the
    replicas in `held` (agent -> shards) if given, else any. Returns False if some source
    has no chain: then the zone rule makes the bound unreachable."""
    sources = sources_of()
    if not sources:
        return True
    if held is None:
        held = {}
        for s, row in enumerate(w.rows):
            for a in row:
                held.setdefault(a, []).append(s)
    while sources:
        moves = _load_chain(w, held, sources, is_sink)
        if moves is None:
            return False
        for s, a, b in moves:
            w.replace(s, w.rows[s].index(a), b)
            held[a].remove(s)
            held.setdefault(b, []).append(s)
        sources = sources_of()
    return True


def level_load(w: Work) -> bool:
    """Bring every agent within floor/ceil of its fair share with as few moves as possible:
    shed what is above a ceiling, then fill what is below a floor. Returns whether the bound
    was reached (False only when the zone rule makes it unreachable)."""
    cl, load = w.cl, w.load
    lo, hi = cl.lo, cl.hi

    def over() -> list[str]:
        return [a for a in cl.agents if load.get(a, 0) > hi[a]]

    def under() -> list[str]:
        return [a for a in cl.agents if load.get(a, 0) < lo[a]]

    def spare() -> list[str]:
        return [a for a in cl.agents if load.get(a, 0) > lo[a]] if under() else []

    if w.fresh and (over() or under()):
        # Replicas re-homed in this round can trade places among themselves for free.
        augment_load(w, over, lambda b: load.get(b, 0) < hi[b], w.fresh)
        augment_load(w, spare, lambda b: load.get(b, 0) < lo[b], w.fresh)
    reached = True
    if over() or under():
        pshare = primary_targets(cl, cl.quota, cl.shards)[0]
        w.count_primaries()
        while (todo := over()) and shed_overload(w, todo, pshare, strict=True):
            pass
        if over() and under():
            augment_load(w, over, lambda b: load.get(b, 0) < lo[b])
        while (todo := over()) and shed_overload(w, todo, pshare, strict=False):
            pass
        if over():
            reached = augment_load(w, over, lambda b: load.get(b, 0) < hi[b])
        while (todo := under()) and fill_underload(w, todo, pshare):
            pass
        if under():
            reached = augment_load(w, spare, lambda b: load.get(b, 0) < lo[b]) and reached
    return reached


# ---------------------------------------------------------------------------------------
# Primaries: a primary change only reorders a shard's row.


def choose_lost_primaries(w: Work, headless: Mapping[int, int], share: Mapping[str, float]):
    """A shard whose primary left gets, among its surviving replicas (the coordinator
    promotes one of those at once anyway), the one furthest below its primary share."""
    pc, rank = w.pc, w.cl.rank
    for s in sorted(headless):
        row = w.rows[s]
        pc[row[0]] -= 1
    for s in sorted(headless):
        row = w.rows[s]
        survivors = row[: headless[s]] or row
        b = min(survivors, key=lambda a: (pc.get(a, 0) - share[a], rank[a]))
        pc[row[0]] += 1
        if b != row[0]:
            w.promote(s, b)


def hand_over(w: Work, over: set[str], hi: Mapping[str, int], share: Mapping[str, float]) -> None:
    """One pass: a shard led by an agent above its ceiling passes the primary role to the
    replica furthest below its share that is below its own ceiling."""
    pc = w.pc
    shards, rows = w.scan(w.cl.rank[min(over)])
    for s in compress(shards, map(over.__contains__, map(itemgetter(0), rows))):
        row = w.rows[s]
        a = row[0]
        best = None
        for b in row[1:]:
            if pc.get(b, 0) < hi[b] and (
                best is None or pc.get(b, 0) - share[b] < pc.get(best, 0) - share[best]
            ):
                best = b
        if best is None:
            continue
        w.promote(s, best)
        if pc[a] <= hi[a]:
            over.discard(a)
            if not over:
                return


def take_over(w: Work, under: set[str], lo: Mapping[str, int], share: Mapping[str, float]) -> None:
    """One pass: an agent below its floor becomes primary of a shard it holds whose primary
    is above its own floor."""
    pc = w.pc
    shards, rows = w.scan(w.cl.rank[min(under)])
    for s in compress(shards, map(not_, map(under.isdisjoint, rows))):
        row = w.rows[s]
        a = row[0]
        if a in under or pc[a] <= lo[a]:
            continue
        b = min((b for b in row[1:] if b in under), key=lambda b: pc.get(b, 0) - share[b])
        w.promote(s, b)
        if pc[b] >= lo[b]:
            under.discard(b)
            if not under:
                return


def _primary_chain(
    w: Work, led: Mapping[str, list[int]], sources: list[str], is_sink: Callable[[str], bool]
) -> list[tuple[int, str]] | None:
    """Shortest chain of hand-overs a0 -> a1 -> ... -> ak (a_i leads a shard that a_{i+1}
    holds) from a source to a sink. The shards differ: each has one primary."""
    parent: dict[str, tuple[str, int] | None] = dict.fromkeys(sources)
    queue = deque(sources)
    while queue:
        a = queue.popleft()
        for s in led.get(a, ()):
            for b in w.rows[s][1:]:
                if b in parent:
                    continue
                parent[b] = (a, s)
                if is_sink(b):
                    steps = []
                    step = parent[b]
                    while step is not None:
                        steps.append((step[1], b))
                        b = step[0]
                        step = parent[b]
                    return steps
                queue.append(b)
    return None


def augment_primaries(
    w: Work, sources_of: Callable[[], list[str]], is_sink: Callable[[str], bool]
) -> bool:
    sources = sources_of()
    if not sources:
        return True
    led: dict[str, list[int]] = {}
    for s, row in enumerate(w.rows):
        if row:
            led.setdefault(row[0], []).append(s)
    while sources:
        steps = _primary_chain(w, led, sources, is_sink)
        if steps is None:
            return False
        for s, b in steps:
            led[w.rows[s][0]].remove(s)
            led.setdefault(b, []).append(s)
            w.promote(s, b)
        sources = sources_of()
    return True


def balance_primaries(w: Work, headless: Mapping[int, int]) -> bool:
    """Every agent's primary count within floor/ceil of its primary share, changing as few
    primaries as possible. Returns whether the bound was reached."""
    cl, pc = w.cl, w.pc
    share, _, lo, hi = primary_targets(cl, w.load, cl.shards)
    w.count_primaries()
    pc = w.pc
    choose_lost_primaries(w, headless, share)

    def over() -> list[str]:
        return [a for a in cl.agents if pc.get(a, 0) > hi[a]]

    def under() -> list[str]:
        return [a for a in cl.agents if pc.get(a, 0) < lo[a]]

    def spare() -> list[str]:
        return [a for a in cl.agents if pc.get(a, 0) > lo[a]] if under() else []

    reached = True
    if todo := over():
        hand_over(w, set(todo), hi, share)
        reached = augment_primaries(w, over, lambda b: pc.get(b, 0) < hi[b])
    if todo := under():
        take_over(w, set(todo), lo, share)
        reached = augment_primaries(w, spare, lambda b: pc.get(b, 0) < lo[b]) and reached
    return reached


# ---------------------------------------------------------------------------------------


def _seed(shards: int, replicas: int) -> int:
    return xxhash.xxh64_intdigest(f"shardkeeper/placement/{shards}/{replicas}".encode())


def place(
    previous: Sequence[Sequence[str]] | None,
    members: Sequence[Member],
    shards: int,
    replicas: int,
) -> Placement:
    """The target placement: for each shard 0..shards-1, its replicas' agent ids, primary
    first. `previous` is the last placement (or None for a new cluster); it may name agents
    that are gone and may be shorter or longer than `shards`."""
    cl = cluster_model(members, shards, replicas)
    shortfall = shards * (replicas - cl.per_shard)
    if not cl.agents:
        return Placement(((),) * shards, shortfall, 0, 0)
    rnd = random.Random(_seed(shards, replicas))
    headless: dict[int, int] = {}
    if previous is None or not any(previous[:shards]):
        w = seed_rows(cl, rnd)
    else:
        w, headless, holes = keep_valid(previous, cl)
        rehome_orphans(w, holes, rnd)
    level_load(w)
    balance_primaries(w, headless)
    out = tuple(map(tuple, w.rows))
    moves, primary_changes = _changes(w, out)
    return Placement(out, shortfall, moves, primary_changes)


def _changes(w: Work, out: Sequence[tuple[str, ...]]) -> tuple[int, int]:
    moves = 0
    primary_changes = 0
    for s in w.touched:
        old = w.original(s)
        new = out[s]
        moves += len(set(new).difference(old))
        if old and new and old[0] != new[0]:
            primary_changes += 1
    return moves, primary_changes
