"""Augmenting paths over agents: the part of levelling that direct moves cannot do.

A search never walks the shards: agents are the nodes, and what an agent could give to
another is read from per-agent counts kept up to date as replicas move, so one search
costs O(N * R) whatever S is; the moves it finds are then placed in shards. See
docs/placement.md for the argument and the complexity."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain, islice
from typing import Protocol

from coordinator.placement.model import Work

# The kinds of replica a step moves: one held in `previous` (the move costs 1), one placed
# in this round (free), or any that goes back to an agent that held it in `previous` (free).
ORIGINAL, FRESH, RETURN = 0, 1, 2

Step = tuple[str, int, str]  # (from agent, kind of replica it gives up, to agent)
Move = tuple[int, str, str]  # (shard, from agent, to agent)


class LoadIndex:
    """The graph that levelling searches: agents are the nodes, and a can pass a replica to
    b when some shard that a holds would still obey the rules with b in a's place.

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
        # Zone members by hash rank: the first one found is not always the lowest id.
        self.by_zone = {z: sorted(m, key=cl.rank.__getitem__) for z, m in cl.by_zone.items()}
        held: tuple[dict[str, set[int]], dict[str, set[int]]] = (
            {a: set() for a in cl.agents},
            {a: set() for a in cl.agents},
        )
        self.held = held
        if not fresh_only:
            original = held[ORIGINAL]
            for s, row in enumerate(w.rows):
                for a in row:
                    original[a].add(s)
        # shard -> agents that held it in `previous` and left it in this round
        self.gone: dict[int, dict[str, None]] = {}
        # a -> b -> shards where b could come back in a's place (kept exact on every move)
        self.returns: dict[str, dict[str, set[int]]] = {}
        for s in sorted(w.touched):
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
        self.pools: dict[tuple[str, int, str], deque[int]] = {}  # see _pool; reset per search
        self.led: dict[str, set[int]] = {}  # see _led

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
        if i == 0 and self.led:
            if a in self.led:
                self.led[a].discard(s)
            if b in self.led:
                self.led[b].add(s)
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
        """How many of a's replicas of this kind sit in shards where zone z is not full."""
        return len(self.held[kind][a]) - self.stats[a, kind][0][z]

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

    def _led(self, a: str) -> set[int]:
        """The shards a leads (built on first use, then kept up to date by `move`)."""
        shards = self.led.get(a)
        if shards is None:
            rows = self.rows
            shards = self.led[a] = {s for h in self.held for s in h[a] if rows[s][0] == a}
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

    def search(
        self, sources: Sequence[str], is_source: Callable[[str], int], is_sink: Callable[[str], int]
    ) -> Iterator[list[Step]]:
        """Cheapest paths from sources to sinks, as steps (a, kind, b): a passes one of its
        replicas of that kind to b. Moving a FRESH replica is free (it was placed in this
        round, so it adds no move against `previous`), and so is a RETURN to an agent that
        held the shard in `previous`; an ORIGINAL one costs 1. The search runs level by
        level of cost. The first level that reaches a sink (a key of `sinks`, whose value
        is how many it can take) gives a path for every way into a sink it finds, until
        there are as many as the sinks can take in all, so that one search serves many
        units: the paths may share agents, and each is checked again when pushed.

        An agent, once reached, is never looked at again, and a zone whose agents are all
        reached is dropped: an expansion costs the zones it cannot reach (at most R - 1 with
        a zone cap of 1, since a zone blocked in every shard of a is in the first one), the
        agents it reaches and the sinks already found."""
        self.pools.clear()
        reached: dict[str, tuple[str, int] | None] = dict.fromkeys(sources)
        todo = {
            z: dict.fromkeys(b for b in members if b not in reached)
            for z, members in self.by_zone.items()
        }
        levels = [deque((a, FRESH) for a in sources)]
        if not self.fresh_only:
            levels.append(deque((a, ORIGINAL) for a in sources))
        level = 0
        found: list[Step] = []  # the last step of each path
        sinks = {b: n for b in self.agents if (n := is_sink(b))}
        need = sum(sinks.values())
        hit: dict[str, None] = {}  # sinks reached

        level_of: dict[str, int] = {}
        expanded: list[list[tuple[str, int]]] = [[] for _ in levels]  # per level

        def reach(b: str, a: str, kind: int) -> None:
            reached[b] = (a, kind)
            level_of[b] = level
            if b in sinks:
                hit[b] = None
                found.append((a, kind, b))
                return
            levels[level].append((b, FRESH))
            if not self.fresh_only:
                if len(levels) == level + 1:
                    levels.append(deque())
                levels[level + 1].append((b, ORIGINAL))

        # A zone holding `zone_cap` replicas of every shard takes nothing from outside: an
        # agent that could only reach such zones is not worth expanding.
        zone_load: Counter[str] = Counter()
        for a, n in self.w.load.items():
            if a in self.cl.member_set:
                zone_load[self.zone[a]] += n
        closed = {z for z, n in zone_load.items() if n >= self.cl.shards * self.cap}

        def useless(a: str) -> bool:
            za = self.zone[a]
            shut = (z in closed and z != za for z in chain(todo, map(self.zone.get, hit)))
            return all(shut) and not (self.returns.get(a) and kind == FRESH)

        while level < len(levels) and not found:
            queue = levels[level]
            while queue and len(found) < need:
                a, kind = queue.popleft()
                if useless(a):
                    continue
                # Free steps back to agents that left a shard a holds.
                for b in self.returns.get(a, ()) if kind == FRESH else ():
                    if b not in reached:
                        del todo[self.zone[b]][b]
                        reach(b, a, RETURN)
                    elif b in hit:
                        found.append((a, RETURN, b))
                if not self.held[kind][a]:
                    continue
                present = self._expand(a, kind)[1]
                while len(expanded) <= level:
                    expanded.append([])
                expanded[level].append((a, kind))
                for b in hit:
                    if self._room(a, kind, self.zone[b]) - present[b] > 0:
                        found.append((a, kind, b))
                for z in list(todo):
                    room = self._room(a, kind, z)
                    if room <= 0:
                        continue
                    members = todo[z]
                    for b in list(members):
                        if present and room - present[b] <= 0:
                            continue  # b already sits in every shard z has room in
                        del members[b]
                        reach(b, a, kind)
                    if not members:
                        del todo[z]
            level += 1
        for a, kind, b in found:
            yield [*unwind(reached, a), (a, kind, b)]
        # Then the same last steps from other sources: an agent next to a sink was reached
        # from one source only, and most sources share a few such agents after a big change.
        # The sources still able to give are kept in a list that drops the exhausted ones.
        givers: dict[int, list[tuple[str, int]]] = {}
        for x, kind, b in found:
            step = reached[x]
            if step is None or step[1] == RETURN or reached[step[0]] is not None:
                continue
            at = level_of[x]
            if at not in givers:
                givers[at] = [
                    e for e in (expanded[at] if at < len(expanded) else ()) if reached[e[0]] is None
                ]
            alive = [e for e in givers[at] if is_source(e[0])]
            givers[at] = alive
            zx = self.zone[x]
            for a, akind in alive:
                if not is_sink(b):
                    break
                if (
                    a != step[0]
                    and is_source(a)
                    and self._room(a, akind, zx) - self._expand(a, akind)[1][x] > 0
                ):
                    yield [(a, akind, x), (x, kind, b)]

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

    def _pool(self, a: str, kind: int, b: str) -> deque[int]:
        """The shards where a's replica of this kind may go to b, those a does not lead
        first (a primary that moves is a primary change as well). Pushes take them in turn,
        checking each again when its turn comes; the paths of one search share them."""
        # With a zone cap of 1 the receivers of one zone share a pool: a giver with 10^5
        # shards and 10^3 receivers needs one set difference per zone, not per receiver.
        key = (a, kind, self.zone[b] if self.cap == 1 and kind != RETURN else b)
        pool = self.pools.get(key)
        if pool is None:
            shards = self._candidates(a, kind, b)
            led = self._led(a)
            pool = self.pools[key] = deque([*sorted(shards - led), *sorted(shards & led)])
        return pool

    def _take(self, a: str, kind: int, b: str, used: set[int]) -> int | None:
        """A shard where a's replica of this kind may go to b now, preferably one no other
        step uses and a does not lead. A few of a's shards are tried first: most often one
        fits and the full pool (a pass over a's shards) is not needed."""
        rows = self.rows
        if kind != RETURN and (a, kind, b) not in self.pools:
            for s in list(islice(self.held[kind][a], 16)):
                row = rows[s]
                if s not in used and row[0] != a and self._fits(row, a, b):
                    return s
        pool = self._pool(a, kind, b)
        while pool and not (a in rows[pool[0]] and self._fits(rows[pool[0]], a, b)):
            pool.popleft()
        if not pool:
            return None
        for i, s in enumerate(islice(pool, len(used) + 1)):
            if s not in used and a in rows[s] and self._fits(rows[s], a, b):
                del pool[i]
                return s
        return pool.popleft()

    def _untangle(self, plan: list[Move]) -> list[Move] | None:
        """Check the moves in order against the rows as the earlier ones leave them. Two
        steps can only clash in one shard when each had no other choice; then the path has
        a shortcut (the first one's replica goes straight to the second one's receiver,
        valid in the flow network the agents' graph abstracts)."""
        while True:
            rows: dict[int, list[str]] = {}
            for k, (s, a, b) in enumerate(plan):
                row = rows.setdefault(s, list(self.rows[s]))
                if a in row and self._fits(row, a, b):
                    row[row.index(a)] = b
                    continue
                earlier = [i for i in range(k) if plan[i][0] == s]
                if not earlier:
                    return None
                i = earlier[-1]
                plan = [*plan[:i], (s, plan[i][1], b), *plan[k + 1 :]]
                break
            else:
                return plan

    def push(
        self, steps: list[Step], source: Callable[[str], int], sink: Callable[[str], int]
    ) -> int:
        """Move along the path as often as its source, its sink and every step allow.
        Returns how many replicas reached the sink."""
        if len(steps) == 1 and steps[0][1] != RETURN:
            return self._push_direct(*steps[0], source, sink)
        pushed = 0
        while True:
            plan: list[Move] = []
            used: set[int] = set()
            for a, kind, b in steps:
                s = self._take(a, kind, b, used)
                if s is None:
                    return pushed
                plan.append((s, a, b))
                used.add(s)
            moves = self._untangle(plan)
            if moves is None:
                return pushed
            for s, a, b in moves:
                self.move(s, a, b)
            pushed += 1
            if not (source(steps[0][0]) and sink(steps[-1][2])) or self.w.out_of_time():
                return pushed

    def _push_direct(
        self, a: str, kind: int, b: str, source: Callable[[str], int], sink: Callable[[str], int]
    ) -> int:
        """One step: straight from the pool, as many as the source and the sink allow (up
        to S after one weight change). Past max(4096, S / 8) such moves in one call they are
        no longer offered back as free returns: the bookkeeping would then cost more than
        the rare chain that uses one saves."""
        pool, rows = self._pool(a, kind, b), self.rows
        limit = max(4096, self.cl.shards // 8)
        left = min(source(a), sink(b))  # both count: one move lowers each by one
        pushed = 0
        while pool and pushed < left and not self.w.out_of_time():
            s = pool.popleft()
            if a in rows[s] and self._fits(rows[s], a, b):
                self.direct += 1
                self.move(s, a, b, track=self.direct <= limit)
                pushed += 1
        return pushed

    def augment(self, source: Callable[[str], int], sink: Callable[[str], int]) -> bool:
        """Move replicas along cheapest paths until no agent is a source. Returns False when
        some source has no path to a sink (its reachable agents hold all they can: the
        bound is out of reach, see docs/placement.md) or when time ran out."""
        return augment(self, self.cl.agents, source, sink)


class Graph(Protocol):
    w: Work

    def search(
        self, sources: Sequence[str], is_source: Callable[[str], int], is_sink: Callable[[str], int]
    ) -> Iterable[list[Step]]: ...

    def push(
        self, steps: list[Step], source: Callable[[str], int], sink: Callable[[str], int]
    ) -> int: ...


def augment(
    graph: Graph,
    agents: Sequence[str],
    source: Callable[[str], int],
    sink: Callable[[str], int],
) -> bool:
    """Push along the paths a search finds until no agent is a source. `source(a)` is how
    many units a may still give, `sink(b)` how many b may still take (0: none). Returns
    False when some source has no path to a sink (its reachable agents hold all they can:
    the bound is out of reach, see docs/placement.md) or when time ran out."""
    while sources := [a for a in agents if source(a)]:
        if graph.w.out_of_time():
            return False
        left = sum(map(sink, agents))
        pushed = 0
        for steps in graph.search(sources, source, sink):
            if source(steps[0][0]) and sink(steps[-1][2]):
                pushed += graph.push(steps, source, sink)
                if pushed >= left:
                    break
        if not pushed:
            return False
    return True


def unwind(reached: Mapping[str, tuple[str, int] | None], b: str) -> list[Step]:
    steps: list[Step] = []
    step = reached[b]
    while step is not None:
        a, kind = step
        steps.append((a, kind, b))
        b = a
        step = reached[b]
    steps.reverse()
    return steps
