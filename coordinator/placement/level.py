"""Levelling replica counts to within floor/ceil of the fair shares.

Replicas placed in this round trade places first (free); then cheap direct moves, one
bounded pass each; whatever is left moves along augmenting paths over agents
(:mod:`coordinator.placement.chains`).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from itertools import compress, islice
from operator import not_

from coordinator.placement.chains import LoadIndex
from coordinator.placement.model import Bounds, Cluster, Work, primary_targets


def _receiver(
    heap: list, row: Sequence[str], donor: str, cl: Cluster, load: Mapping, limit: Mapping
) -> str | None:
    """Pop the agent furthest below its fair share (and below its `limit`) that may replace
    `donor` in `row`. Gives up after a few agents that do not fit (a zone full in this row
    can hold many of them): the chains catch what this misses."""
    zone, cap, fair, hi = cl.zone, cl.zone_cap, cl.fair, limit
    zones = [zone[a] for a in row if a != donor]
    skipped = []
    found = None
    while heap and len(skipped) < 8 + 2 * len(row):
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
    step would have to undo. The pass looks at a few donor rows per replica to shed, not at
    all of them (where the zone rule bars most moves, the chains do the rest). Returns
    whether anything moved."""
    cl, load, pc = w.cl, w.load, w.pc
    fair, rank = cl.fair, cl.rank
    hi = cl.lo if strict else cl.hi
    donors = set(over)
    budget = 4 * sum(load[a] - cl.hi[a] for a in over) + 64
    heap = [(load.get(b, 0) - fair[b], rank[b], b) for b in cl.agents if load.get(b, 0) < hi[b]]
    heapq.heapify(heap)
    if not heap:
        return False
    moved = False
    shards, rows = w.scan(heap[0][1])
    for s in islice(compress(shards, map(not_, map(donors.isdisjoint, rows))), budget):
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
    their floor, the most loaded first. An agent looks at a few rows per replica it lacks,
    not at all of them (where the zone rule bars it from most rows, the chains serve it).
    Returns whether anything moved."""
    cl, load, pc = w.cl, w.load, w.pc
    zone, cap, fair, lo = cl.zone, cl.zone_cap, cl.fair, cl.lo
    moved = False
    for b in sorted(under, key=lambda b: (load.get(b, 0) - fair[b], cl.rank[b])):
        zb = zone[b]
        shards, rows = w.scan(cl.rank[b])
        budget = 4 * (lo[b] - load.get(b, 0)) + 64
        for s, row in islice(zip(shards, rows, strict=False), budget):
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


def level_load(w: Work) -> bool:
    """Bring every agent within floor/ceil of its fair share with as few moves as possible.
    Returns whether the bound was reached: False when the zone rule makes it unreachable,
    or when `w` ran out of time (the plan is valid either way)."""
    cl = w.cl
    b = Bounds(w.load, cl.lo, cl.hi)

    def unbalanced() -> tuple[list[str], list[str]]:
        return [a for a in cl.agents if b.over(a)], [a for a in cl.agents if b.under(a)]

    todo_over, todo_under = unbalanced()
    if not (todo_over or todo_under):
        return True
    if w.touched and not w.out_of_time():
        # Replicas placed in this round can trade places among themselves for free.
        fresh = LoadIndex(w, fresh_only=True)
        fresh.augment(b.over, b.room)
        fresh.augment(b.spare, b.short)
        todo_over, todo_under = unbalanced()
        if not (todo_over or todo_under):
            return True
    if w.out_of_time():
        return False
    # Direct passes cost a few row visits per replica to move, the index one pass over the
    # rows to build: the passes win for small imbalances (a join, a leave), the index for
    # large ones (a weight raised a hundredfold).
    gap = sum(w.load.get(a, 0) - cl.hi[a] for a in todo_over)
    gap += sum(cl.lo[a] - w.load.get(a, 0) for a in todo_under)
    if gap * 64 <= cl.shards:
        pshare = primary_targets(cl, cl.quota, cl.shards)[0]
        w.count_primaries()
        if todo_over:
            shed_overload(w, todo_over, pshare, strict=True)
            if todo_over := unbalanced()[0]:
                shed_overload(w, todo_over, pshare, strict=False)
        if todo_under := unbalanced()[1]:
            fill_underload(w, todo_under, pshare)
        todo_over, todo_under = unbalanced()
        if not (todo_over or todo_under):
            return True
    index = LoadIndex(w, fresh_only=False)
    if todo_over and todo_under:
        index.augment(b.over, b.short)
    reached = index.augment(b.over, b.room)
    return index.augment(b.spare, b.short) and reached
