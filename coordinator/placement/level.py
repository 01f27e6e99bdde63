"""Levelling replica counts to within floor/ceil of the fair shares."""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from itertools import compress
from operator import not_

from coordinator.placement.model import Cluster, Work, primary_targets


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
