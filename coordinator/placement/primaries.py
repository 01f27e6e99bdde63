"""Primaries: a primary change only reorders a shard's row."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from itertools import compress
from operator import itemgetter, not_

from coordinator.placement.model import Work, primary_targets


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
