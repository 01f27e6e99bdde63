"""The levelling index (coordinator.placement.index) against itself: a bulk move of many
replicas must leave exactly the state that moving them one at a time leaves."""

from __future__ import annotations

import random

import pytest

from coordinator.placement import Member, place
from coordinator.placement.chains import LoadIndex
from coordinator.placement.fill import keep_valid, rehome_orphans
from coordinator.placement.model import cluster_model
from coordinator.placement.paths import FRESH, ORIGINAL, RETURN


def twins(seed: int):
    """Two identical indexes over the same plan after a change (orphans re-homed, so some
    replicas are FRESH), every agent expanded and every zone's `full` set built."""
    rnd = random.Random(seed)
    members = [
        Member(f"m{i:02d}", rnd.choice(["a", "b", "c", "d", ""]), rnd.choice([0.5, 1.0, 3.0]))
        for i in range(14)
    ]
    shards = 400
    p = place(None, members, shards, 3)
    gone = members[rnd.randrange(len(members))].id
    after = [m for m in members if m.id != gone]
    cl = cluster_model(after, shards, 3)
    out = []
    for _ in range(2):
        w, _, holes = keep_valid(p.replicas, cl)
        rehome_orphans(w, holes, random.Random(1))
        index = LoadIndex(w, fresh_only=False)
        for a in cl.agents:
            index._expand(a, ORIGINAL)
            index._expand(a, FRESH)
        for z in cl.by_zone:
            index._full(z)
        out.append(index)
    return cl, out


def state(index: LoadIndex):
    return (
        {s: list(g) for s, g in index.gone.items()},
        {a: {b: sorted(s) for b, s in r.items() if s} for a, r in index.returns.items()},
        [list(row) for row in index.rows],
        dict(index.w.load),
        sorted(index.w.touched),
        [{a: sorted(s) for a, s in h.items()} for h in index.held],
        {z: sorted(s) for z, s in index.full.items()},
        {k: tuple({z: n for z, n in c.items() if n} for c in st) for k, st in index.stats.items()},
    )


@pytest.mark.parametrize("seed", range(12))
def test_a_bulk_move_leaves_the_index_as_single_moves_do(seed):
    cl, (one, bulk) = twins(seed)
    assert cl.zone_cap == 1
    rnd = random.Random(seed)
    done = 0
    for a in cl.agents:
        for kind in (ORIGINAL, FRESH):
            for b in rnd.sample(cl.agents, len(cl.agents)):
                shards = sorted(
                    s
                    for s in one._candidates(a, kind, b)
                    if s not in one.gone and a in one.rows[s] and one._fits(one.rows[s], a, b)
                )[: rnd.randint(1, 40)]
                if a == b or not shards:
                    continue
                for s in shards:
                    one.move(s, a, b, track=False)
                bulk.move_many(shards, a, kind, b)
                done += len(shards)
                assert state(one) == state(bulk)
                break
    assert done > 0


@pytest.mark.parametrize("whole", [0, 10**9])
@pytest.mark.parametrize("seed", range(6))
def test_primary_pools_stay_complete_across_hand_overs(seed, whole, monkeypatch):
    """PrimaryIndex keeps its per-leader pools across searches: every shard an agent
    leads (of a kind) must stay listed under each of its co-replicas, however often the
    primary changes hands, and the counts of co-replicas must stay exact. Both ways of
    building a pool: for every co-replica at once (big leaders), or per co-replica."""
    from coordinator.placement.primaries import PrimaryIndex

    monkeypatch.setattr(PrimaryIndex, "WHOLE", whole)
    cl, (index, _) = twins(seed)
    w = index.w
    w.count_primaries()
    prim = PrimaryIndex(w)
    rnd = random.Random(seed)
    for a in cl.agents:  # every pool and count exists before any hand-over
        for kind in (ORIGINAL, FRESH):
            for b in cl.agents:
                prim._pool(a, kind, b)
            prim._expand(a, kind)
    for _ in range(300):
        s = rnd.randrange(cl.shards)
        prim.promote(s, rnd.choice(w.rows[s][1:]))
    fresh = PrimaryIndex(w)
    assert prim.led == fresh.led
    for (a, kind), by_peer in prim.pools.items():
        for s in prim.led[kind][a]:
            for b in w.rows[s][1:]:
                assert s in by_peer[b], (a, kind, b, s)
        peers = {x: n for x, n in prim.peers[a, kind].items() if n}
        assert peers == dict(fresh._expand(a, kind))


def test_a_primary_path_that_cannot_be_pushed_keeps_its_shards_listed():
    """Pools outlive a search: a push whose later step has no shard must leave the earlier
    steps' shards in their pools (it once took them out, and the leader could never hand
    those over again: a primary stayed above its ceiling)."""
    from coordinator.placement.primaries import PrimaryIndex

    cl, (index, _) = twins(3)
    w = index.w
    w.count_primaries()
    prim = PrimaryIndex(w)
    s = next(s for s, row in enumerate(w.rows) if len(row) == 3)
    a, x, y = w.rows[s]
    # a -> x over shard s, then x -> y over a shard x leads of a kind it leads none of.
    kind = ORIGINAL if s in prim.led[ORIGINAL][a] else FRESH
    empty = next(k for k in (ORIGINAL, FRESH) if not any(y in w.rows[t] for t in prim.led[k][x]))
    before = list(prim._pool(a, kind, x))
    assert s in before
    assert prim.push([(a, kind, x), (x, empty, y)], lambda _: 1, lambda _: 1) == 0
    assert list(prim._pool(a, kind, x)) == before
    assert prim._has(a, kind, x)


def test_primaries_after_a_crash_and_a_weight_change():
    """Found by hypothesis (test_medium_clusters_keep_the_rules_through_changes) when the
    primary pools first outlived a search: agent-21 kept 26 primaries for a share of 24.8."""
    from tests.test_placement import check_plan

    weights = [1, 0.5, 0.5, 1, 0.5, 1, 1, 3, 0.5, 1, 2, 2, 1, 1, 3, 2, 0.5, 0.5, 1, 1, 0.5, 3]
    weights += [0.5, 3, 1, 1]
    members = [Member(f"agent-{i:02d}", "", w) for i, w in enumerate(weights)]
    p = place(None, members, 1366, 2)
    del members[23]
    p = place(p.replicas, members, 1366, 2)
    members[21] = Member("agent-21", "", 0.5)
    q = place(p.replicas, members, 1366, 2)
    check_plan(q, members, 1366, 2)


@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_a_chunk_with_free_returns_moves_as_single_moves_do(seed, track):
    """LoadIndex._move_chunk (move_many plus the free returns of the shards it touches)
    against `move` one shard at a time, with shards that others left earlier in the round
    among them, for every kind of step (a RETURN step's shards mix ORIGINAL and FRESH)."""
    cl, (one, bulk) = twins(seed)
    rnd = random.Random(seed)
    # Tracked single moves on both, so that some shards hold agents that may come back.
    for _ in range(60):
        s = rnd.randrange(cl.shards)
        a = rnd.choice(one.rows[s])
        b = rnd.choice(cl.agents)
        if a != b and one._fits(one.rows[s], a, b):
            one.move(s, a, b)
            bulk.move(s, a, b)
    assert state(one) == state(bulk) and one.gone
    done = 0
    for a in cl.agents:
        for kind in (ORIGINAL, FRESH, RETURN):
            for b in rnd.sample(cl.agents, len(cl.agents)):
                shards = sorted(
                    s
                    for s in one._candidates(a, kind, b)
                    if a in one.rows[s] and one._fits(one.rows[s], a, b)
                )[: rnd.randint(1, 40)]
                if a == b or not shards:
                    continue
                for s in shards:
                    one.move(s, a, b, track=track)
                bulk._move_chunk(shards, a, kind, b, track)
                done += len(shards)
                assert state(one) == state(bulk)
                break
    assert done > 0
