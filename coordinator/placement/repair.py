"""Repairing a replica layout whose primaries cannot be balanced.

Levelling chooses where replicas go without looking at primaries, and the primary bound
is a bipartite b-matching over that layout (each shard one primary among its replicas,
each agent within floor/ceil of its primary share): in small clusters the layout can make
it infeasible (S = 3, R = 2: two agents each holding one replica, of the same shard, each
with a primary share of exactly 1). When the primary searches (`balance_primaries`) leave
an agent outside its bound, no path of hand-overs exists, so the layout must change:
here replicas of two agents in two shards swap places, which keeps every replica count
(and so every fair share, quota and primary share) as it is, and the primary searches run
again. A swap is chosen to open a path the searches lacked, at the least extra movement.

Only runs when the primary bound was missed, which the generated histories and the
benchmarks never hit past a few dozen shards; its cost is O(S * R) per round plus the
candidate scan (bounded), with at most one round per primary missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from coordinator.placement.model import Bounds, Work, fits_row, primary_targets
from coordinator.placement.primaries import PrimaryIndex

# Candidate swaps looked at per missing primary once one has been found.
SCAN = 20_000


def _reach(rows: Sequence[Sequence[str]], start: Iterable[str], forward: bool) -> set[str]:
    """Agents reachable in the hand-over graph (a -> b: a leads a shard that b holds) from
    `start` (forward), or that reach `start` (backward)."""
    edges: dict[str, set[str]] = {}
    for row in rows:
        if not row:
            continue
        head = row[0]
        for b in row[1:]:
            if forward:
                edges.setdefault(head, set()).add(b)
            else:
                edges.setdefault(b, set()).add(head)
    seen = set(start)
    todo = list(seen)
    while todo:
        a = todo.pop()
        for b in edges.get(a, ()):
            if b not in seen:
                seen.add(b)
                todo.append(b)
    return seen


class _Swapper:
    def __init__(self, w: Work):
        self.w = w
        self.cl = w.cl
        self.rows = w.rows
        self.used: set[int] = set()  # shards already changed in this round

    def cost(self, a: str, s: int) -> int:
        """1 when a did not hold shard s in `previous` (a replica there counts as a move)."""
        return a not in self.w.original(s)

    def fits(self, row: Sequence[str], out: str, into: str) -> bool:
        cl = self.cl
        rest = [a for a in row if a != out]
        return fits_row(rest, [cl.zone[a] for a in rest], into, cl.zone[into], cl.zone_cap)

    def best(
        self, x: str, mine: Iterable[int], theirs: Iterable[tuple[int, int]]
    ) -> tuple[tuple[int, int, int, int, int], tuple[int, int, int, int]] | None:
        """The cheapest swap of x's replica at (s1, position i1) over `mine` (shards x holds,
        not as primary) with another agent's at (s2, position i2) over `theirs`, valid under
        the zone rule both ways: (its sort key, (s1, i1, s2, i2)), or None. The key starts
        with the moves the swap adds (-2 to 2)."""
        rows, cost = self.rows, self.cost
        found: tuple[tuple[int, int, int, int, int], tuple[int, int, int, int]] | None = None
        looked = 0
        theirs = list(theirs)
        for s1 in mine:
            if s1 in self.used:
                continue
            row1 = rows[s1]
            i1 = row1.index(x)
            for s2, i2 in theirs:
                if s2 == s1 or s2 in self.used:
                    continue
                row2 = rows[s2]
                z = row2[i2]
                if x in row2 or z in row1:
                    continue
                looked += 1
                if found is not None and looked > SCAN:
                    return found
                if not (self.fits(row2, z, x) and self.fits(row1, x, z)):
                    continue
                extra = cost(x, s2) + cost(z, s1) - cost(x, s1) - cost(z, s2)
                key = (extra, i2 != 0, s1, s2, i2)
                if found is None or key < found[0]:
                    found = (key, (s1, i1, s2, i2))
        return found

    def swap(self, s1: int, i1: int, s2: int, i2: int) -> None:
        """Exchange the replica at (s1, i1) with the one at (s2, i2); each keeps the other's
        position (role). Replica counts do not change."""
        w = self.w
        row1, row2 = w.writable(s1), w.writable(s2)
        a, b = row1[i1], row2[i2]
        row1[i1], row2[i2] = b, a
        for i, old, new in ((i1, a, b), (i2, b, a)):
            if i == 0:
                w.pc[old] -= 1
                w.pc[new] = w.pc.get(new, 0) + 1
        self.used.update((s1, s2))


def repair_primaries(w: Work) -> bool:
    """Swap replicas until every agent's primary count can be, and is, within floor/ceil of
    its primary share. Returns whether the bound was reached (False also when the time
    ran out, or when no swap of this kind helps)."""
    cl = w.cl
    _, _, lo, hi = primary_targets(cl, w.load, cl.shards)
    b = Bounds(w.pc, lo, hi)
    # Each round adds at least one primary to a short agent or removes one from an over
    # agent (or gives up), so the rounds are at most the total distance to the bounds.
    rounds = sum(map(b.short, cl.agents)) + sum(map(b.over, cl.agents)) + 1
    for _ in range(rounds):
        short = [a for a in cl.agents if b.under(a)]
        over = [a for a in cl.agents if b.over(a)]
        if not (short or over):
            return True
        if w.out_of_time():
            return False
        sw = _Swapper(w)
        rows = w.rows
        swapped = False
        if short:
            # Short agents lack a shard led by an agent that spare primaries reach: bring
            # each into one, in exchange for a replica of another agent there.
            reach = _reach(rows, [a for a in cl.agents if b.spare(a)], forward=True)
            targets = [
                (s, i)
                for s, row in enumerate(rows)
                if row and row[0] in reach
                for i in range(len(row))
                if i or b.spare(row[0])
            ]
            for x in short:
                for _ in range(b.short(x)):
                    if w.out_of_time():
                        return False
                    mine = [s for s, row in enumerate(rows) if x in row[1:]]
                    found = sw.best(x, mine, targets)
                    if found is None:
                        break
                    sw.swap(*found[1])
                    swapped = True
        else:
            # Over agents lead only shards whose replicas cannot pass a primary on to an
            # agent with room: bring such a replica into one of them.
            reach = _reach(rows, [a for a in cl.agents if b.room(a)], forward=False)
            theirs = [
                (s, i) for s, row in enumerate(rows) for i in range(1, len(row)) if row[i] in reach
            ]
            for a in over:
                led = [s for s, row in enumerate(rows) if row and row[0] == a]
                for _ in range(b.over(a)):
                    if w.out_of_time():
                        return False
                    # Swap a co-replica y of a shard a leads with an agent that reaches room,
                    # held elsewhere as a non-primary.
                    found = None
                    for y in sorted(
                        {c for s in led for c in rows[s][1:]}, key=lambda c: (cl.rank[c], c)
                    ):
                        mine = [s for s in led if y in rows[s]]
                        option = sw.best(y, mine, theirs)
                        if option is not None and (found is None or option[0] < found[0]):
                            found = option
                    if found is None:
                        break
                    sw.swap(*found[1])
                    swapped = True
        if not swapped:
            return False
        index = PrimaryIndex(w)
        index.augment(b.over, b.room)
        index.augment(b.spare, b.short)
    return not (any(map(b.under, cl.agents)) or any(map(b.over, cl.agents)))
