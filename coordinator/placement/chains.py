"""Augmenting paths over agents: the part of levelling that direct moves cannot do.

A search never walks the shards: agents are the nodes, and what an agent could give to
another is read from per-agent counts kept up to date as replicas move, so one search
costs O(N * R) whatever S is; the moves it finds are then placed in shards. See
docs/placement.md for the argument and the complexity."""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain, compress, filterfalse, islice, repeat
from operator import eq, itemgetter, not_

import xxhash

from coordinator.placement.index import ReplicaIndex
from coordinator.placement.paths import FRESH, ORIGINAL, RETURN, Move, Step, augment, unwind

NO_COUNTS: Counter[str] = Counter()  # what an agent's expansion yields without counts


class LoadIndex(ReplicaIndex):
    """Levelling's searches and pushes over the replica index."""

    CHUNK = 512  # most replicas a bulk push moves between two questions to should_stop
    WALK_MAX = 4096  # a pool part walked with a stride up to this size, rotated beyond

    def search(
        self, sources: Sequence[str], is_source: Callable[[str], int], is_sink: Callable[[str], int]
    ) -> Iterator[list[Step]]:
        """Cheapest paths from sources to sinks, as steps (a, kind, b): a passes one of its
        replicas of that kind to b. Moving a FRESH replica is free (it was placed in this
        round, so it adds no move against `previous`), and so is a RETURN to an agent that
        held the shard in `previous`; an ORIGINAL one costs 1. The search runs level by
        level of cost. The first level that reaches a sink (is_sink(b) > 0: how many b can
        take) gives a path for every way into a sink it finds, until there are as many as
        the sinks can take in all, so that one search serves many
        units: the paths may share agents, and each is checked again when pushed.

        An agent, once reached, is never looked at again, and a zone whose agents are all
        reached is dropped: an expansion costs the zones it cannot reach (at most R - 1 with
        a zone cap of 1, since a zone blocked in every shard of a is in the first one), the
        agents it reaches and the sinks already found."""
        self.returning.clear()  # the other pools outlive the search (see _open)
        self.refilled.clear()
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
        hit: dict[str, list[str]] = {}  # zone -> its sinks reached
        hit_agents: set[str] = set()
        # The level is searched until there are as many paths as the sinks can take units
        # and their sources could fill the sinks: one source with one unit may reach many
        # sinks, and one with many units may reach them through agents with one shard each.
        root = dict.fromkeys(sources, "")  # "": a source is its own root
        rooted: set[str] = set()
        supply = 0

        level_of: dict[str, int] = {}
        expanded: list[list[tuple[str, int]]] = [[] for _ in levels]  # per level

        def reach(b: str, a: str, kind: int) -> None:
            reached[b] = (a, kind)
            level_of[b] = level
            root[b] = root[a] or a
            if b in sinks:
                hit.setdefault(self.zone[b], []).append(b)
                hit_agents.add(b)
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
            shut = (z in closed and z != za for z in chain(todo, hit))
            return all(shut) and not (self.returns.get(a) and kind == FRESH)

        while level < len(levels) and not found:
            queue = levels[level]
            a, counted = "", len(found)
            while queue:
                if len(found) > counted:  # the last expansion found paths: count its source
                    counted, source = len(found), root[a] or a
                    if source not in rooted:
                        rooted.add(source)
                        supply += is_source(source)
                    if supply >= need <= counted:
                        break
                a, kind = queue.popleft()
                if useless(a):
                    continue
                # Free steps back to agents that left a shard a holds.
                for b in self.returns.get(a, ()) if kind == FRESH else ():
                    if b not in reached:
                        del todo[self.zone[b]][b]
                        reach(b, a, RETURN)
                    elif b in hit_agents:
                        found.append((a, RETURN, b))
                if not self.held[kind][a]:
                    continue
                present = self._expand(a, kind)[1] if self.counted else NO_COUNTS
                while len(expanded) <= level:
                    expanded.append([])
                expanded[level].append((a, kind))
                for z, zone_sinks in hit.items():
                    room = self._room(a, kind, z)
                    if room <= 0:
                        continue
                    if present:
                        found.extend((a, kind, b) for b in zone_sinks if room - present[b] > 0)
                    else:  # zone cap 1: b is out only where its zone is
                        found.extend(zip(repeat(a), repeat(kind), zone_sinks))
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
        # One entry per (agent, sink) pair it can reach: after a big change most of them
        # belong to a source already spent, a sink already full or a pool gone dry (shared
        # by the sinks of a zone), all skipped with a set lookup. None of the three comes
        # back within a search unless something moves, so a search that pushes nothing
        # has not skipped a path that could be pushed.
        spent: set[str] = set()
        filled: set[str] = set()
        dry: set[tuple[str, int, str]] = set()
        for a, kind, b in found:
            if b in filled or a in spent:
                continue
            key = self._key(a, kind, b)
            if key in dry:
                continue
            steps = [*unwind(reached, a), (a, kind, b)]
            root = steps[0][0]
            if root in spent:
                continue
            if not is_sink(b):
                filled.add(b)
            elif not is_source(root):
                spent.add(root)
            else:
                for step in reversed(steps):  # each step must have a shard left
                    step_key = self._key(*step)
                    if step_key in dry or not self._open(*step):
                        dry.add(step_key)
                        break
                else:
                    yield steps
        # Then the same last steps from other sources: an agent next to a sink was reached
        # from one source only, and most sources share a few such agents after a big change.
        # The other sources of its level may step to it at the same cost: those whose
        # replicas it may take, or, when it was reached by a free return, those holding a
        # shard it may return to. The candidates are listed once per level and zone (those
        # with room in the zone); each (agent, kind) next to a sink scans them once, from a
        # cursor that later sinks of the same agent resume from (a source passed over was
        # spent or could not reach the agent); a last step whose shards ran out stops it.
        givers: dict[int, list[tuple[str, int]]] = {-1: [(a, RETURN) for a in sources]}
        lists: dict[tuple[int, str], list[tuple[str, int]]] = {}
        cursor: dict[tuple[str, int], int] = {}
        for x, kind, b in found:
            step = reached[x]
            if step is None or reached[step[0]] is not None or b in filled:
                continue
            key = self._key(x, kind, b)
            if key in dry:
                continue
            if not is_sink(b):
                filled.add(b)
                continue
            if not self._open(x, kind, b):
                dry.add(key)
                continue
            at = -1 if step[1] == RETURN else level_of[x]
            zx = self.zone[x]
            todo = lists.get((at, zx))
            if todo is None:
                if at not in givers:
                    givers[at] = [
                        e
                        for e in (expanded[at] if at < len(expanded) else ())
                        if reached[e[0]] is None
                    ]
                todo = givers[at]
                if at >= 0:
                    todo = [e for e in todo if self._room(e[0], e[1], zx) > 0]
                lists[at, zx] = todo
            k = cursor.get((x, kind), 0)
            while k < len(todo):
                a, akind = todo[k]
                k += 1
                if a in spent or a == step[0]:
                    continue
                if not is_source(a):
                    spent.add(a)
                    continue
                if (
                    x in self.returns.get(a, ())
                    if akind == RETURN
                    else self._room(a, akind, zx) - self._present(a, akind, x) > 0
                ):
                    yield [(a, akind, x), (x, kind, b)]
                    if not is_sink(b):
                        filled.add(b)
                    elif not self._open(x, kind, b):
                        dry.add(key)
                    else:
                        continue
                    k -= 1  # the same source may serve this agent's next sink
                    break
            cursor[x, kind] = k

    def _key(self, a: str, kind: int, b: str) -> tuple[str, int, str]:
        # With a zone cap of 1 the receivers of one zone share a pool: a giver with 10^5
        # shards and 10^3 receivers needs one set difference per zone, not per receiver.
        return (a, kind, self.zone[b] if self.cap == 1 and kind != RETURN else b)

    def _pool(self, a: str, kind: int, b: str) -> deque[int]:
        """The shards where a's replica of this kind may go to b, those a does not lead
        first (a primary that moves is a primary change as well). Pushes take them in turn,
        checking each again when its turn comes; paths and searches share them (a pool of
        free returns is made again in each search: returns come and go with every move)."""
        key = self._key(a, kind, b)
        pools = self.returning if kind == RETURN else self.pools
        pool = pools.get(key)
        if pool is None:
            pool = pools[key] = deque()
            self._fill(pool, a, kind, b)
        return pool

    def _fill(self, pool: deque[int], a: str, kind: int, b: str) -> None:
        """Those a does not lead first, each part in an order of its own for this giver and
        receiver (pool key) and the part's length (which each join changes): a walk in
        shard order with a stride and from an offset drawn from those, by C-level passes;
        past WALK_MAX shards (a giver with a large share, emptied in bulk) the part is
        rotated to that offset only, which keeps its shards in order.

        In plain shard order every agent that joins took the shards the one before it
        took, and held most of them with it; when one of the two left, the other was the
        source of most of its copies, at the throttle's few at a time (issue 14). Windows
        of consecutive shards were not enough with R zones: they met a later departure's
        orphans, re-homed in runs of shard numbers, and paired agents again."""
        shards = sorted(self._candidates(a, kind, b))
        heads = list(map(itemgetter(0), map(self.rows.__getitem__, shards)))
        led = list(map(eq, heads, repeat(a)))
        key = "/".join(map(str, self._key(a, kind, b)))
        for part in (list(compress(shards, map(not_, led))), list(compress(shards, led))):
            n = len(part)
            start, stride = 0, 1  # two or fewer: in order
            if n >= 3:
                h = xxhash.xxh64_intdigest(f"{key}/{n}".encode())
                start = (h >> 32) % n
                if n <= self.WALK_MAX:  # beyond, stride 1: the part rotated to start
                    stride = h % (n - 1) + 1
                    while math.gcd(stride, n) != 1:  # every shard once: prime to n
                        stride += 1
            steps = range(start, start + n * stride, stride)
            pool.extend(map(part.__getitem__, map(n.__rmod__, steps)))

    def _open(self, a: str, kind: int, b: str) -> bool:
        """Whether the pool still holds a shard where a's replica of this kind may go to b
        now. Moves can open shards to b after the pool was made (its zone leaves them):
        when the pool runs dry while a's counts say such a shard exists, it is made again,
        at most once per search."""
        pool, rows = self._pool(a, kind, b), self.rows
        while pool and not (a in rows[pool[0]] and self._fits(rows[pool[0]], a, b)):
            pool.popleft()
        if pool or kind == RETURN or (self.counted and (a, kind) not in self.stats):
            return bool(pool)
        key = self._key(a, kind, b)
        if (
            key in self.refilled
            or self._room(a, kind, self.zone[b]) - self._present(a, kind, b) <= 0
        ):
            return False
        self.refilled.add(key)
        self._fill(pool, a, kind, b)
        while pool and not (a in rows[pool[0]] and self._fits(rows[pool[0]], a, b)):
            pool.popleft()
        return bool(pool)

    def _take(self, a: str, kind: int, b: str, used: set[int]) -> int | None:
        """A shard where a's replica of this kind may go to b now, preferably one no other
        step uses and a does not lead. Before the pool is made a few of a's shards are
        tried: most often one fits and the pool (a pass over a's shards) is not needed."""
        rows = self.rows
        if kind != RETURN and self._key(a, kind, b) not in self.pools:
            for s in list(islice(self.held[kind][a], 16)):
                row = rows[s]
                if s not in used and row[0] != a and self._fits(row, a, b):
                    return s
        if not self._open(a, kind, b):
            return None
        pool = self._pool(a, kind, b)
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
        pushed = self._push_chunks(steps, source, sink) if self.cap == 1 else 0
        while True:
            if not (source(steps[0][0]) and sink(steps[-1][2])) or self.w.out_of_time():
                return pushed
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

    def _push_chunks(
        self, steps: list[Step], source: Callable[[str], int], sink: Callable[[str], int]
    ) -> int:
        """With a zone cap of 1, many units along the path at once: each step takes its
        shards from its pool, none that another step of the chunk takes, so the moves are
        in distinct shards and cannot invalidate one another (no untangling). Stops when a
        step has no such shard left; push then goes on unit by unit, untangling the steps
        that must share a shard."""
        rows = self.rows
        pushed = 0
        while not self.w.out_of_time():
            k = min(source(steps[0][0]), sink(steps[-1][2]), self.CHUNK)
            picks: list[tuple[deque[int], list[int]]] = []
            used: set[int] = set()
            for a, kind, b in steps:
                if k <= 0:
                    break
                self._open(a, kind, b)
                pool = self._pool(a, kind, b)
                got: list[int] = []
                skipped: list[int] = []
                while pool and len(got) < k:
                    s = pool.popleft()
                    if a in rows[s] and self._fits(rows[s], a, b):
                        (skipped if s in used else got).append(s)
                pool.extendleft(reversed(skipped))
                picks.append((pool, got))
                used.update(got)
                k = min(k, len(got))
            for pool, got in picks:  # what the chunk does not use goes back, in order
                pool.extendleft(reversed(got[max(k, 0) :]))
            if k <= 0:
                return pushed
            for (a, kind, b), (_, got) in zip(steps, picks, strict=True):
                self._move_chunk(got[:k], a, kind, b, track=True)
            pushed += k
        return pushed

    def _still(self, shards: list[int], a: str, kind: int, b: str) -> Iterable[int]:
        """Those of these shards (from a's pool of this kind for b) where a's replica may go
        to b now. With a zone cap of 1, by set lookups (C-level): a still holds it and b's
        zone is not there (a's own zone is, if b shares it: a is leaving)."""
        if self.fresh_only:  # its zone sets would need every agent's shards
            rows = self.rows
            return [s for s in shards if a in rows[s] and self._fits(rows[s], a, b)]
        ok: Iterable[int] = compress(shards, map(self.held[kind][a].__contains__, shards))
        if self.zone[b] != self.zone[a]:
            ok = filterfalse(self._full(self.zone[b]).__contains__, ok)
        return ok

    def _move_chunk(self, shards: list[int], a: str, kind: int, b: str, track: bool) -> None:
        """Move a's replicas of these shards (valid, of this kind) to b, as `move` does one
        by one (with `track`, a's leaving is offered back as a free return): the rows, sets
        and counts with `move_many`, then the free returns of the shards concerned."""
        if kind == RETURN:  # by the kind of a's replica in each shard
            fresh = self.held[FRESH][a]
            for part, k in (
                (list(filterfalse(fresh.__contains__, shards)), ORIGINAL),
                (list(filter(fresh.__contains__, shards)), FRESH),
            ):
                if part:
                    self._move_chunk(part, a, k, b, track)
            return
        gone = self.gone
        pending = list(filter(gone.__contains__, shards))
        for s in pending:  # the returns these shards offer change with their agents
            self._note_returns(s, False)
        self.move_many(shards, a, kind, b)
        for s in pending:
            if b in gone[s]:  # b came back
                self._gone(s, b, False)
        if track and kind == ORIGINAL:  # a held these in `previous`: it may come back
            for s in pending:
                self._gone(s, a, True)
            # The others offer a's return alone: in b's place if b took a's zone, else in
            # anyone's (zone cap 1: a's zone has left the shard).
            first = list(filterfalse(set(pending).__contains__, shards))
            gone.update(zip(first, map(dict.fromkeys, repeat((a,), len(first))), strict=True))
            if self.zone[a] == self.zone[b]:
                self.returns.setdefault(b, {}).setdefault(a, set()).update(first)
            else:
                returns, rows = self.returns, self.rows
                for s in first:
                    for p in rows[s]:
                        returns.setdefault(p, {}).setdefault(a, set()).add(s)
        for s in pending:
            if s in gone:
                self._note_returns(s, True)

    def _push_direct(
        self, a: str, kind: int, b: str, source: Callable[[str], int], sink: Callable[[str], int]
    ) -> int:
        """One step: straight from the pool, as many as the source and the sink allow (up
        to S after one weight change), with a zone cap of 1 a chunk at a time (moves in
        distinct shards from a to b cannot invalidate one another), between two questions
        to should_stop. Past max(4096, S / 8) such moves in one call they are no longer
        offered back as free returns: the bookkeeping would then cost more than the rare
        chain that uses one saves."""
        pool, rows = self._pool(a, kind, b), self.rows
        limit = max(4096, self.cl.shards // 8)
        left = min(source(a), sink(b))  # both count: one move lowers each by one
        pushed = 0
        while pushed < left and self._open(a, kind, b) and not self.w.out_of_time():
            if self.cap > 1:
                s = pool.popleft()
                if a in rows[s] and self._fits(rows[s], a, b):
                    self.direct += 1
                    self.move(s, a, b, track=self.direct <= limit)
                    pushed += 1
                continue
            track = self.direct < limit
            n = min(left - pushed, self.CHUNK, limit - self.direct if track else self.CHUNK)
            chunk: list[int] = []
            while pool and len(chunk) < n:
                taken = [pool.popleft() for _ in range(min(len(pool), n - len(chunk)))]
                chunk.extend(self._still(taken, a, kind, b))
            self._move_chunk(chunk, a, kind, b, track)
            self.direct += len(chunk)
            pushed += len(chunk)
        return pushed

    def augment(self, source: Callable[[str], int], sink: Callable[[str], int]) -> bool:
        """Move replicas along cheapest paths until no agent is a source. Returns False when
        some source has no path to a sink (its reachable agents hold all they can: the
        bound is out of reach, see docs/placement.md) or when time ran out."""
        if not self.fresh_only and self.cap == 1:
            self._direct(source, sink)
        return augment(self, self.cl.agents, source, sink)

    def _direct(self, source: Callable[[str], int], sink: Callable[[str], int]) -> None:
        """One-step moves from each source to the sinks it can give to, before any search,
        when no source has a free step (no FRESH replica, no shard to give back): every
        path then costs at least 1, as these do, so they are as cheap as any. They need no
        search, so no zone counts are built for them nor updated as they move (after one
        weight change they are nearly all the moves). Sinks are taken zone by zone, each
        zone's in a shared pool; the pools built cost at most 2 * S * R set lookups, past
        which the searches do the rest."""
        sources = [a for a in self.agents if source(a)]
        if any(self.held[FRESH][a] or self.returns.get(a) for a in sources):
            return
        sinks: dict[str, list[str]] = {}
        for b in self.agents:
            if sink(b):
                sinks.setdefault(self.zone[b], []).append(b)
        budget = 2 * self.cl.shards * self.cl.per_shard
        first = dict.fromkeys(sinks, 0)  # each zone's sinks before this one are full
        for a in sources:
            for z, members in sinks.items():
                if budget <= 0 or self.w.out_of_time():
                    return
                if not source(a):
                    break
                k = first[z]
                while k < len(members) and not sink(members[k]):
                    k += 1
                first[z] = k
                if k == len(members) or not self._open(a, ORIGINAL, members[k]):
                    continue
                budget -= len(self.held[ORIGINAL][a])
                for b in members[k:]:
                    if sink(b):
                        self._push_direct(a, ORIGINAL, b, source, sink)
                        if not (source(a) and self._open(a, ORIGINAL, b)):
                            break
