"""Filling empty places: seeding a new cluster, keeping the valid replicas of the previous
plan and re-homing the orphaned ones."""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import partial, reduce
from itertools import chain, combinations, compress
from operator import and_, eq, not_

from coordinator.placement.model import Cluster, Work, fits_row, primary_targets


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
    # zone -> waiting agent -> its slots: a shard skips at most the R agents it already has.
    waiting: dict[str, dict[str, int]] = {}
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
                a = next((a for a in queue if a not in row), None)
                if a is not None:
                    queue[a] -= 1
                    if not queue[a]:
                        del queue[a]
                    row.append(a)
                    zones.append(z)
                    load[a] = load.get(a, 0) + 1
                    need -= 1
                if not queue:
                    del waiting[z]
                if not need:
                    break
        for a in slots if need > 0 else ():
            z = zone[a]
            if (z not in zones) if cap == 1 else fits_row(row, zones, a, z, cap):
                row.append(a)
                zones.append(z)
                load[a] = load.get(a, 0) + 1
                need -= 1
                if not need:
                    break
            else:
                queue = waiting.setdefault(z, {})
                queue[a] = queue.get(a, 0) + 1
        if need > 0:
            short.append(s)
    left = [a for queue in waiting.values() for a, n in queue.items() for _ in range(n)]
    return short, left + list(slots)


def fill_short(w: Work, short: Sequence[int]) -> None:
    """Complete the shards the stream left short (its last slots did not fit them): each
    takes the allowed agent furthest below its fair share. Agents wait in one heap per zone
    and the zones in a heap of their best agents, so a shard passes over the few zones it
    has no room for, never over their agents one by one (a merged zone can hold hundreds).
    The levelling that follows trades these replicas around for free (they are new in this
    round), so no search for a better fit is needed here."""
    cl, load, zone, cap = w.cl, w.load, w.cl.zone, w.cl.zone_cap
    fair, rank = cl.fair, cl.rank

    def key(a: str) -> tuple[float, int, str]:
        return (load.get(a, 0) - fair[a], rank[a], a)

    agents = {z: [key(a) for a in members] for z, members in cl.by_zone.items()}
    for heap in agents.values():
        heapq.heapify(heap)
    zones = [(heap[0], z) for z, heap in agents.items()]
    heapq.heapify(zones)
    for s in short:
        row = w.writable(s)
        while len(row) < cl.per_shard:
            passed = []
            while True:
                best, z = heapq.heappop(zones)
                heap = agents[z]
                if heap[0] != best:  # stale: the zone's best agent changed
                    heapq.heappush(zones, (heap[0], z))
                    continue
                if sum(1 for x in row if zone[x] == z) < cap:
                    taken = [heapq.heappop(heap) for _ in range(min(len(heap), len(row) + 1))]
                    pick = next((e for e in taken if e[2] not in row), None)
                    for e in taken:
                        if e is not pick:
                            heapq.heappush(heap, e)
                    if pick is not None:
                        break
                passed.append((heap[0], z))
            a = pick[2]
            row.append(a)
            load[a] = load.get(a, 0) + 1
            heapq.heappush(heap, key(a))
            heapq.heappush(zones, (heap[0], z))
            for entry in passed:
                heapq.heappush(zones, entry)


def seed_rows(cl: Cluster, rnd: random.Random) -> Work:
    """A new cluster: primaries dealt from one stream (so they start balanced), the other
    replicas from a second one; together they give each agent exactly its quota."""
    _, pq, _, _ = primary_targets(cl, cl.quota, cl.shards)
    primaries = jittered(((a, pq[a]) for a in cl.agents), rnd)
    others = jittered(((a, cl.quota[a] - pq[a]) for a in cl.agents), rnd)
    w = Work(cl, [[a] for a in primaries], dict(Counter(primaries)), set(range(cl.shards)))
    holes = range(cl.shards)
    short, _ = deal(w, holes, others)
    fill_short(w, short)
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
    short, _ = deal(w, holes, stream)
    fill_short(w, short)
