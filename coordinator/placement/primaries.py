"""Primaries: a primary change only reorders a shard's row."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain, compress, repeat
from operator import contains, itemgetter, not_

from coordinator.placement.model import Bounds, Work, primary_targets
from coordinator.placement.paths import FRESH, ORIGINAL, Step, augment, unwind


def choose_lost_primaries(w: Work, headless: Mapping[int, int], share: Mapping[str, float]):
    """A shard whose primary left gets, among its surviving replicas (the coordinator
    promotes one of those at once anyway), the one furthest below its primary share."""
    pc, rank = w.pc, w.cl.rank
    for s in sorted(headless):
        row = w.rows[s]
        pc[row[0]] -= 1
    for s in sorted(headless):
        row = w.rows[s]
        # Levelling may have moved a survivor since keep_valid counted them: ask `previous`.
        old = w.original(s)
        survivors = [a for a in row if a in old] or row
        b = min(survivors, key=lambda a: (pc.get(a, 0) - share[a], rank[a]))
        pc[row[0]] += 1
        if b != row[0]:
            w.promote(s, b)


def hand_over(
    w: Work,
    over: set[str],
    hi: Mapping[str, int],
    share: Mapping[str, float],
    among: Sequence[int],
) -> None:
    """One pass over `among`: a shard led by an agent above its ceiling passes the primary
    role to the replica furthest below its share that is below its own ceiling."""
    pc = w.pc
    # C-level screen, read lazily: each row as it is when reached, `over` as it shrinks.
    leaders = map(itemgetter(0), map(w.rows.__getitem__, among))
    for s in compress(among, map(over.__contains__, leaders)):
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


def take_over(
    w: Work,
    under: set[str],
    lo: Mapping[str, int],
    share: Mapping[str, float],
    among: Sequence[int],
) -> None:
    """One pass over `among`: an agent below its floor becomes primary of a shard it holds
    whose primary is above its own floor."""
    pc = w.pc
    # C-level screen, read lazily: each row as it is when reached, `under` as it shrinks.
    for s in compress(among, map(not_, map(under.isdisjoint, map(w.rows.__getitem__, among)))):
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


class PrimaryIndex:
    """The graph that primary chains search: agents are the nodes, and a can hand a primary
    over to b when a leads a shard that b holds. A hand-over in a shard whose primary is
    already new in this round (or that had none) adds no primary change: those shards are
    FRESH, the others ORIGINAL. Per agent: the shards it leads of each kind and, once a
    search has expanded it, how many of them each other agent holds (kept up to date on
    every hand-over), so a search costs O(edges among the agents it reaches), never a pass
    over the shards."""

    # Leaders of more shards, or asked for a fifth co-replica, have their pools built for
    # every co-replica at once.
    WHOLE = 64

    def __init__(self, w: Work):
        self.w, self.rows, self.agents = w, w.rows, w.cl.agents
        self.heads = w.previous_heads()
        self.led: tuple[dict[str, set[int]], dict[str, set[int]]] = (
            {a: set() for a in self.agents},
            {a: set() for a in self.agents},
        )
        original, fresh = self.led
        heads = list(map(next, map(iter, w.rows), repeat(None)))
        if None in heads:  # rows are never empty when there are agents, but be safe
            heads = [a for a in heads if a is not None]
            shards: Iterable[int] = (s for s, row in enumerate(w.rows) if row)
        else:
            shards = range(len(heads))
        deque(map(set.add, map(original.__getitem__, heads), shards), 0)  # C-level
        touched = w.sorted_touched()  # the other rows are `previous`' own: same primary
        moved = list(compress(touched, w.new_primaries(touched)))
        leaders = list(map(itemgetter(0), map(w.rows.__getitem__, moved)))
        deque(map(set.discard, map(original.__getitem__, leaders), moved), 0)  # C-level
        deque(map(set.add, map(fresh.__getitem__, leaders), moved), 0)
        self.peers: dict[tuple[str, int], Counter[str]] = {}
        self.pools: dict[tuple[str, int], dict[str, deque[int]]] = {}  # see _pool
        self.whole: set[tuple[str, int]] = set()  # pools sorted by every co-replica at once

    def _kind(self, s: int) -> int:
        return ORIGINAL if self.heads[s] == self.rows[s][0] else FRESH

    def _expand(self, a: str, kind: int) -> Counter[str]:
        peers = self.peers.get((a, kind))
        if peers is None:
            rows = self.rows
            led = self.led[kind][a]
            others = map(itemgetter(slice(1, None)), map(rows.__getitem__, led))
            peers = self.peers[a, kind] = Counter(chain.from_iterable(others))
        return peers

    def promote(self, s: int, b: str) -> None:
        """Make b primary of shard s (Work.promote), keeping the led sets, the co-replica
        counts and the pools up to date. Runs once per primary handed over (tens of
        thousands after one weight change): plain loops, no helper calls."""
        w = self.w
        row = w.writable(s)
        a = row[0]
        head = self.heads[s]
        kind = ORIGINAL if head == a else FRESH
        peers = self.peers.get((a, kind))
        if peers is not None:  # plain loops: Counter.subtract checks types on every call
            for x in row[1:]:
                peers[x] -= 1
        self.led[kind][a].discard(s)
        row.remove(b)
        row.insert(0, b)
        pc = w.pc
        pc[a] -= 1
        pc[b] = pc.get(b, 0) + 1
        kind = ORIGINAL if head == b else FRESH
        self.led[kind][b].add(s)
        peers = self.peers.get((b, kind))
        if peers is not None:
            for x in row[1:]:
                peers[x] += 1
        pools = self.pools.get((b, kind))
        if pools is not None:
            if (b, kind) in self.whole:
                for x in row[1:]:
                    pools.setdefault(x, deque()).append(s)
            else:
                for x in row[1:]:
                    if x in pools:
                        pools[x].append(s)

    def search(
        self, sources: Sequence[str], is_source: Callable[[str], int], is_sink: Callable[[str], int]
    ) -> Iterator[list[Step]]:
        """Paths from sources to sinks with the fewest ORIGINAL hand-overs (those add a
        primary change), as steps (a, kind, b), searched level by level of that cost; as
        for replicas (chains.LoadIndex.search), the first level that reaches a sink gives a
        path for every way into a sink it finds, up to what the sinks can take.

        An agent reached from several sources at the same level keeps them all, and a path
        is given from each through it into a sink: after a big change most sources share a
        few agents next to the sinks, and one search then serves all of them."""
        parent: dict[str, tuple[str, int] | None] = dict.fromkeys(sources)
        level_of: dict[str, int] = dict.fromkeys(sources, 0)
        also: dict[str, list[tuple[str, int]]] = {}  # further parents at the same level
        levels = [deque((a, FRESH) for a in sources), deque((a, ORIGINAL) for a in sources)]
        found: list[Step] = []
        sinks = {b: n for b in self.agents if (n := is_sink(b))}
        need = sum(sinks.values())
        # The level is searched until there are as many paths as the sinks can take units
        # and their sources could fill the sinks: one source with one primary to spare may
        # reach ten sinks, and one with many through agents that share one shard with each.
        root = dict.fromkeys(sources, "")  # "": a source is its own root
        rooted: set[str] = set()
        supply = 0
        wanted = set(self.agents).difference(sources)  # not reached, or a sink
        level = 0
        while level < len(levels) and not found:
            queue = levels[level]
            a, counted = "", len(found)
            while queue:
                if len(found) > counted:  # the last expansion found paths: count its source
                    counted, origin = len(found), root[a] or a
                    if origin not in rooted:
                        rooted.add(origin)
                        supply += is_source(origin)
                    if supply >= need <= counted:
                        break
                a, kind = queue.popleft()
                if not self.led[kind][a]:
                    continue
                source = parent[a] is None  # only sources serve as further parents
                peers = self._expand(a, kind)
                # Past the sources, only agents not reached yet and sinks matter: a C-level
                # filter skips the others (most of an agent's peers, after a few levels).
                for b in peers if source else filter(wanted.__contains__, peers):
                    if peers[b] <= 0:
                        continue
                    if b in parent:
                        if parent[b] is None:
                            continue
                        if b in sinks:
                            found.append((a, kind, b))
                        elif source and level_of[b] == level:
                            also.setdefault(b, []).append((a, kind))
                        continue
                    parent[b] = (a, kind)
                    level_of[b] = level
                    root[b] = root[a] or a
                    if b in sinks:
                        found.append((a, kind, b))
                        continue
                    wanted.discard(b)
                    queue.append((b, FRESH))
                    if len(levels) <= level + 1:
                        levels.append(deque())
                    levels[level + 1].append((b, ORIGINAL))
            level += 1
        # Sources with nothing left to give, full sinks and steps with no shard left (a
        # path's first steps are shared by the paths into every sink next to its last
        # agent) are skipped with a set lookup.
        spent: set[str] = set()
        filled: set[str] = set()
        dry: set[Step] = set()
        for a, kind, b in found:
            if b in filled or (a, kind, b) in dry:
                continue
            steps = [*unwind(parent, a), (a, kind, b)]
            if steps[0][0] in spent:
                continue
            if not is_sink(b):
                filled.add(b)
            elif not is_source(steps[0][0]):
                spent.add(steps[0][0])
            else:
                for step in reversed(steps):
                    if step in dry or not self._has(*step):
                        dry.add(step)
                        break
                else:
                    yield steps
        cursor: dict[str, int] = {}
        for a, kind, b in found:
            alternatives = also.get(a, ())
            if not (alternatives and is_sink(b) and self._has(a, kind, b)):
                continue
            # The next sink of a resumes where this one stopped: a parent passed over had
            # run out of primaries to give or of shards that a holds.
            k = cursor.get(a, 0)
            while k < len(alternatives):
                p, pkind = alternatives[k]
                if parent[p] is None and is_source(p) and self._has(p, pkind, a):
                    yield [(p, pkind, a), (a, kind, b)]
                    # Go on while the last step has shards left and b room.
                    if not (is_sink(b) and self._has(a, kind, b)):
                        break
                k += 1
            cursor[a] = k

    def _pool(self, a: str, kind: int, b: str) -> deque[int]:
        """The shards of this kind that a leads and b holds. A leader of many shards (S/2
        of them after one weight change; it may give to a thousand agents) has all of its
        sorted by co-replica in one pass, the first time a search needs one; for the others
        each co-replica's are picked out when first needed (C-level, a few dozen shards). A
        shard a comes to lead later is appended, and one it no longer leads (with this
        kind) is dropped when its turn comes. A row's agents do not change while primaries
        are balanced, so b still holds every shard listed."""
        key = (a, kind)
        by_peer = self.pools.get(key)
        if by_peer is None:
            by_peer = self.pools[key] = {}
        pool = by_peer.get(b)
        if pool is None:
            led = self.led[kind][a]
            if key not in self.whole and (len(led) > self.WHOLE or len(by_peer) >= 4):
                # Every co-replica's at once (those already made are complete): the
                # (co-replica, shard) pairs row by row, dealt out with C-level passes.
                self.whole.add(key)
                order = sorted(led)
                others = list(map(itemgetter(slice(1, None)), map(self.rows.__getitem__, order)))
                peers = list(chain.from_iterable(others))
                shards = list(chain.from_iterable(map(repeat, order, map(len, others))))
                if by_peer:
                    new = list(map(not_, map(by_peer.__contains__, peers)))
                    peers, shards = list(compress(peers, new)), list(compress(shards, new))
                for x in dict.fromkeys(peers):
                    by_peer[x] = deque()
                deque(map(deque.append, map(by_peer.__getitem__, peers), shards), 0)
                pool = by_peer.setdefault(b, deque())
            else:
                pool = by_peer[b] = deque()
                if key not in self.whole:
                    order = sorted(led)
                    holds = map(contains, map(self.rows.__getitem__, order), repeat(b))
                    pool.extend(compress(order, holds))
        return pool

    def _has(self, a: str, kind: int, b: str) -> bool:
        """Whether a still leads a shard of this kind that b holds."""
        pool, led = self._pool(a, kind, b), self.led[kind][a]
        while pool and pool[0] not in led:
            pool.popleft()
        return bool(pool)

    def push(
        self, steps: list[Step], source: Callable[[str], int], sink: Callable[[str], int]
    ) -> int:
        """Hand primaries over along the path as often as its ends and its steps allow. The
        steps' shards differ (each has one primary), so they are chosen before any moves."""
        pools = [(self._pool(a, k, b), self.led[k][a], b) for a, k, b in steps]
        pushed = 0
        while True:
            for pool, led, _ in pools:
                while pool and pool[0] not in led:
                    pool.popleft()
                if not pool:  # nothing taken: the pools outlive the search
                    return pushed
            plan = [(pool.popleft(), b) for pool, _, b in pools]
            for s, b in plan:
                self.promote(s, b)
            pushed += 1
            if not (source(steps[0][0]) and sink(steps[-1][2])) or self.w.out_of_time():
                return pushed

    def augment(self, source: Callable[[str], int], sink: Callable[[str], int]) -> bool:
        return augment(self, self.agents, source, sink)


def balance_primaries(w: Work, headless: Mapping[int, int]) -> bool:
    """Every agent's primary count within floor/ceil of its primary share, changing as few
    primaries as possible. Returns whether the bound was reached."""
    cl, pc = w.cl, w.pc
    share, _, lo, hi = primary_targets(cl, w.load, cl.shards)
    w.count_primaries()
    pc = w.pc
    choose_lost_primaries(w, headless, share)

    b = Bounds(pc, lo, hi)
    # Failover (above) always happens; balance may wait for the next plan.
    if w.out_of_time():
        return False
    reached = True
    # Shards whose primary is new in this round (or that had none) change it for free.
    touched = w.sorted_touched()
    fresh = list(compress(touched, w.new_primaries(touched)))
    if todo := [a for a in cl.agents if b.over(a)]:
        hand_over(w, set(todo), hi, share, fresh)
    if todo := [a for a in cl.agents if b.under(a)]:
        take_over(w, set(todo), lo, share, fresh)
    # After a large change (a weight raised a thousandfold can leave S/2 primaries to hand
    # over) one pass over every row does most of the rest at a few microseconds a shard;
    # smaller gaps are left to the searches, which find the cheapest hand-overs.
    gap = sum(pc.get(a, 0) - hi[a] for a in cl.agents if b.over(a)) + sum(map(b.short, cl.agents))
    if gap > 256 and gap * 16 > cl.shards:
        if todo := [a for a in cl.agents if b.over(a)]:
            hand_over(w, set(todo), hi, share, range(cl.shards))
        if todo := [a for a in cl.agents if b.under(a)]:
            take_over(w, set(todo), lo, share, range(cl.shards))
    if any(map(b.over, cl.agents)) or any(map(b.under, cl.agents)):
        index = PrimaryIndex(w)
        reached = index.augment(b.over, b.room)
        reached = index.augment(b.spare, b.short) and reached
    return reached
