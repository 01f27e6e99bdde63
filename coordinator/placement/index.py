"""Where every agent's replicas are, kept up to date as they move: what the levelling
searches (coordinator.placement.chains) read instead of walking the shards."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Sequence
from itertools import chain, compress, filterfalse, repeat
from operator import contains

from coordinator.placement.model import Work
from coordinator.placement.paths import FRESH, ORIGINAL, RETURN


class ReplicaIndex:
    """The state behind the graph that levelling searches: agents are the nodes, and a can
    pass a replica to b when some shard that a holds would still obey the rules with b in
    a's place.

    Per agent it keeps the shards it holds, split into ORIGINAL and FRESH replicas, and, once
    a search has expanded the agent, how many of those shards each zone blocks (the zone is
    full without the agent) and, with a zone cap above 1, how many each agent blocks (it is
    there already, in a zone with room). A move updates the counts of the R agents of its
    shard, so an edge test is O(1) and an expansion O(zones it cannot reach + agents it
    reaches); see docs/placement.md for why that bounds a search by O(N * R).

    It also knows which agents left a shard they held in `previous` during this round:
    a replica that goes back to such an agent is free (RETURN), whoever gives it up."""

    def __init__(self, w: Work, fresh_only: bool):
        cl = w.cl
        self.w, self.cl, self.rows, self.agents = w, cl, w.rows, cl.agents
        self.zone, self.cap = cl.zone, cl.zone_cap
        self.fresh_only = fresh_only
        # Per-agent zone counts for the searches, or (zone cap 1, every replica indexed,
        # so each zone's set of shards is exact) subset tests against the zones' sets.
        self.counted = cl.zone_cap > 1 or fresh_only
        # Zone members by hash rank: the first one found is not always the lowest id.
        self.by_zone = {z: sorted(m, key=cl.rank.__getitem__) for z, m in cl.by_zone.items()}
        held: tuple[dict[str, set[int]], dict[str, set[int]]] = (
            {a: set() for a in cl.agents},
            {a: set() for a in cl.agents},
        )
        self.held = held
        if not fresh_only:  # every (agent, shard) pair, C-level: S * R of them
            shards = chain.from_iterable(map(repeat, range(cl.shards), map(len, w.rows)))
            owners = map(held[ORIGINAL].__getitem__, chain.from_iterable(w.rows))
            deque(map(set.add, owners, shards), 0)
        # shard -> agents that held it in `previous` and left it in this round
        self.gone: dict[int, dict[str, None]] = {}
        # a -> b -> shards where b could come back in a's place (kept exact on every move)
        self.returns: dict[str, dict[str, set[int]]] = {}
        for s in w.sorted_touched():
            old, row = w.original(s), w.rows[s]
            for a in row:
                if a not in old:
                    held[ORIGINAL][a].discard(s)
                    held[FRESH][a].add(s)
            for a in old:
                if a in cl.member_set and a not in row:
                    self._gone(s, a, True)
        for s in self.gone:
            self._note_returns(s, True)
        # (agent, kind) -> in how many of the agent's shards with replicas of that kind each
        # zone blocks a move, and each agent does (zone cap above 1 only); built when a
        # search first expands them.
        self.stats: dict[tuple[str, int], tuple[Counter[str], Counter[str]]] = {}
        self.expanded: set[str] = set()  # agents with an entry in `stats`
        self.direct = 0  # moves made by _push_direct
        self.full: dict[str, set[int]] = {}  # see _full
        self.pools: dict[tuple[str, int, str], deque[int]] = {}  # see _pool and _open
        self.returning: dict[tuple[str, int, str], deque[int]] = {}  # RETURN's: per search
        self.refilled: set[tuple[str, int, str]] = set()  # see _open; reset per search

    def _blockers(self, row: Sequence[str], x: str) -> tuple[list[str], list[str]]:
        """What keeps another agent out of x's place in `row`: the zones that are full
        without x and, with a zone cap above 1, the agents already there."""
        zone, cap = self.zone, self.cap
        zones = [zone[y] for y in row if y != x]
        if cap == 1:
            return zones, []
        # R is small: list counts beat building a Counter per row.
        full = [z for i, z in enumerate(zones) if zones.index(z) == i and zones.count(z) >= cap]
        return full, [y for y in row if y != x and zones.count(zone[y]) < cap]

    def _expand(self, a: str, kind: int) -> tuple[Counter[str], Counter[str]]:
        st = self.stats.get((a, kind))
        if st is None:
            self.expanded.add(a)
            st = self.stats[a, kind] = (Counter(), Counter())
            rows, held = self.rows, self.held[kind][a]
            if self.cap == 1:
                # Every zone in a's rows blocks, but a's own (a is its only agent there).
                agents = chain.from_iterable(map(rows.__getitem__, held))
                st[0].update(map(self.zone.__getitem__, agents))
                st[0][self.zone[a]] -= len(held)
            else:
                for s in held:
                    full, present = self._blockers(rows[s], a)
                    st[0].update(full)
                    st[1].update(present)
        return st

    def _count(self, x: str, s: int, sign: int) -> None:
        st = self.stats.get((x, FRESH if s in self.held[FRESH][x] else ORIGINAL))
        if st is None:
            return
        full, present = self._blockers(self.rows[s], x)
        for z in full:
            st[0][z] += sign
        for y in present:
            st[1][y] += sign

    def move(self, s: int, a: str, b: str, track: bool = True) -> None:
        """Move a's replica of shard s to b, keeping the index up to date. This runs once
        per replica moved (up to S of them after one weight change), so the common zone
        cap of 1 takes a short path: only the zones of a and b change in the shard. Without
        `track`, a's leaving is not offered as a free return (bulk moves skip that)."""
        row = self.rows[s]
        i = row.index(a)
        fresh = self.held[FRESH]
        za, zb = self.zone[a], self.zone[b]
        if s in self.gone:
            self._note_returns(s, False)
        simple = self.cap == 1
        if simple:
            for x in row:
                if x in self.expanded:
                    st = self.stats.get((x, FRESH if s in fresh[x] else ORIGINAL))
                    if st is None:
                        continue
                    if x == a:  # plain loops: Counter.subtract checks types on every call
                        counts = st[0]
                        for y in row:
                            if y != a:
                                counts[self.zone[y]] -= 1
                    else:
                        st[0][za] -= 1
                        st[0][zb] += 1
        else:
            for x in row:
                self._count(x, s, -1)
        self.held[FRESH if s in fresh[a] else ORIGINAL][a].discard(s)
        self.w.replace(s, i, b)
        row = self.rows[s]
        if simple:  # a's zone leaves the shard, b's enters
            if za in self.full:
                self.full[za].discard(s)
            if zb in self.full:
                self.full[zb].add(s)
        else:
            for z in (za, zb):
                if z in self.full:
                    if sum(1 for y in row if self.zone[y] == z) >= self.cap:
                        self.full[z].add(s)
                    else:
                        self.full[z].discard(s)
        old = self.w.original(s)
        self.held[ORIGINAL if b in old else FRESH][b].add(s)
        if track and a in old:
            self._gone(s, a, True)
        if b in self.gone.get(s, ()):
            self._gone(s, b, False)
        if simple:
            if b in self.expanded:
                st = self.stats.get((b, FRESH if s in fresh[b] else ORIGINAL))
                if st is not None:
                    counts = st[0]
                    for y in row:
                        if y != b:
                            counts[self.zone[y]] += 1
        else:
            for x in row:
                self._count(x, s, +1)
        if s in self.gone:
            self._note_returns(s, True)

    def move_many(self, shards: list[int], a: str, kind: int, b: str) -> None:
        """Move a's replicas of `shards` (all of this kind, each valid for b) to b, as
        `move` would one by one, for a zone cap of 1, but for the free returns (`gone`,
        `returns`), which are the caller's (LoadIndex._move_chunk). A bulk push runs this
        once per chunk: the rows are edited with C-level passes and the sets and counts
        updated per chunk, per zone and per co-replica, not per replica."""
        rows, zone, w = self.rows, self.zone, self.w
        touched, previous = w.touched, w.previous
        za, zb = zone[a], zone[b]
        # C-level passes (map over the rows' own methods): a chunk can be 512 rows.
        first = list(filterfalse(touched.__contains__, shards))  # copied on first change
        if first:
            touched.update(first)
            copies = map(list, map(rows.__getitem__, first))
            deque(map(rows.__setitem__, first, copies), 0)
        edited = list(map(rows.__getitem__, shards))
        at = list(map(list.index, edited, repeat(a)))
        deque(map(list.__setitem__, edited, at, repeat(b)), 0)
        led = at.count(0)
        # The shards b held in `previous`: its replica there is ORIGINAL.
        if len(previous) >= self.cl.shards:
            old = map(previous.__getitem__, shards)
            back = list(compress(shards, map(contains, old, repeat(b))))
        else:
            back = [s for s in shards if s < len(previous) and b in previous[s]]
        n = len(shards)
        load = w.load
        load[a] -= n
        load[b] = load.get(b, 0) + n
        if led and w.pc:
            w.pc[a] -= led
            w.pc[b] = w.pc.get(b, 0) + led
        moved = set(shards)
        new = moved.difference(back) if back else moved  # b's FRESH replicas
        self.held[kind][a].difference_update(moved)
        self.held[ORIGINAL][b].update(back)
        self.held[FRESH][b].update(new)
        if za != zb:
            if za in self.full:
                self.full[za].difference_update(moved)
            if zb in self.full:
                self.full[zb].update(moved)
        if not self.expanded:
            return
        # The zones around a's and b's replicas, and what a's zone leaving and b's entering
        # each shard does to its other agents' counts.
        together = Counter(chain.from_iterable(map(rows.__getitem__, shards)))
        st = self.stats.get((a, kind))
        if st is not None:
            counts = st[0]
            for y, m in together.items():
                if y != b:
                    counts[zone[y]] -= m
        for bkind, part in ((ORIGINAL, back), (FRESH, new)):
            st = self.stats.get((b, bkind)) if part else None
            if st is not None:
                counts = st[0]
                peers = together
                if len(part) != n:
                    peers = Counter(chain.from_iterable(map(rows.__getitem__, part)))
                for y, m in peers.items():
                    if y != b:
                        counts[zone[y]] += m
        if za == zb:
            return
        fresh = self.held[FRESH]
        for y, m in together.items():
            if y == b or y not in self.expanded:
                continue
            f = len(fresh[y].intersection(moved)) if fresh[y] else 0
            for ykind, k in ((FRESH, f), (ORIGINAL, m - f)):
                st = self.stats.get((y, ykind)) if k else None
                if st is not None:
                    st[0][za] -= k
                    st[0][zb] += k

    def _gone(self, s: int, a: str, left: bool) -> None:
        """Record that a left shard s it held in `previous`, or came back to it."""
        if left:
            self.gone.setdefault(s, {})[a] = None
            return
        del self.gone[s][a]
        if not self.gone[s]:
            del self.gone[s]

    def _note_returns(self, s: int, add: bool) -> None:
        row = self.rows[s]
        zones = [self.zone[y] for y in row] if self.cap == 1 else []
        for b in self.gone.get(s, ()):
            if self.cap == 1:  # b fits in anyone's place, or only in its zone-mate's
                zb = self.zone[b]
                places: Sequence[str] = [row[zones.index(zb)]] if zb in zones else row
            else:
                places = [a for a in row if self._fits(row, a, b)]
            for a in places:
                if add:
                    self.returns.setdefault(a, {}).setdefault(b, set()).add(s)
                else:
                    shards = self.returns[a][b]
                    shards.discard(s)
                    if not shards:
                        del self.returns[a][b]

    def _room(self, a: str, kind: int, z: str) -> int:
        """How many of a's replicas of this kind sit in shards where zone z is not full.
        With a zone cap of 1 and every replica indexed, only whether there is one matters:
        a C-level subset test against the zone's shards (stopping at the first shard it
        lacks) tells, so no counts are kept for those searches (`counted`)."""
        if self.counted:
            return len(self.held[kind][a]) - self._expand(a, kind)[0][z]
        held = self.held[kind][a]
        if not held or z == self.zone[a]:  # a's own zone: a leaving makes room
            return len(held)
        return 0 if held.issubset(self._full(z)) else 1

    def _present(self, a: str, kind: int, x: str) -> int:
        """In how many of a's shards with a replica of this kind x sits already, in a zone
        with room (zone cap above 1 only: with a cap of 1 x's zone is full there)."""
        return self._expand(a, kind)[1][x] if self.cap > 1 else 0

    def _returns(self, a: str, b: str) -> Iterable[int]:
        """Shards b held in `previous` and left, that a holds now and b may take back."""
        return self.returns.get(a, {}).get(b, ())

    def _full(self, z: str) -> set[int]:
        """The shards where zone z holds `zone_cap` replicas (built on first use from the
        zone's agents' sets, then kept up to date by `move`)."""
        shards = self.full.get(z)
        if shards is None:
            held = [h[a] for a in self.cl.by_zone[z] for h in self.held]
            if self.cap == 1:
                shards = set().union(*held)
            else:
                counts = Counter(chain.from_iterable(held))
                shards = {s for s, n in counts.items() if n >= self.cap}
            self.full[z] = shards
        return shards

    def _candidates(self, a: str, kind: int, b: str) -> set[int]:
        """The shards where a's replica of this kind may go to b, by set arithmetic: those
        where b's zone is full (unless it is a's own, whose count a's leaving lowers) and,
        with a zone cap above 1, those b is in already are out."""
        if kind == RETURN:
            return set(self._returns(a, b))
        zb = self.zone[b]
        out = self.held[kind][a]
        if self.fresh_only:
            return out  # few, and the zone sets would need every agent's shards: check each
        if zb != self.zone[a]:
            out = out - self._full(zb)
        if self.cap > 1:
            out = out - self.held[ORIGINAL][b] - self.held[FRESH][b]
        return out

    def _fits(self, row: Sequence[str], a: str, b: str) -> bool:
        """Whether b may take a's place in `row` (run for every shard a push uses)."""
        if b in row:
            return False
        zone = self.zone
        zb = zone[b]
        room = self.cap
        for y in row:
            if y != a and zone[y] == zb:
                room -= 1
                if not room:
                    return False
        return True
