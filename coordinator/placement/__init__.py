"""Placement: which agents hold each shard's replicas, primary first.

Pure code (plain data in, plain data out): no I/O, no clock, no ZooKeeper. The next plan
is a deterministic function of (previous plan, members, shards, replicas).

- Keys map to shards in :mod:`shardkeeper.ring` (xxhash64 onto S equal token ranges).
- Shards map to agents with :func:`place`: a new cluster is seeded from a hash; afterwards
  every valid replica stays where it is, orphaned replicas go to the agents furthest below
  their weighted fair share, and over- and under-loaded agents are levelled with as few
  moves as possible. Primaries are balanced by reordering replica lists.

Guarantees (docs/placement.md has the reasoning and the measured figures):

- no agent twice in a shard; draining and unknown agents hold nothing;
- every shard has min(R, eligible agents) replicas; the rest is reported as ``shortfall``;
- zones: no zone holds more than ``zone_cap`` replicas of a shard, which is 1 when there
  are at least R zones, and otherwise the smallest even spread the zones' sizes allow
  (ceil(R / zones) unless small zones force more). An agent without a zone is a zone of
  its own. The zone rule is never broken for balance;
- balance: every agent's replica count is within floor/ceil of its fair share
  (weight-proportional, capped at S per agent and at S * zone_cap per zone, see
  :func:`fair_shares`), and its primary count within floor/ceil of its primary share
  (weight-proportional over S, capped at the replicas it holds). Levelling is a search
  (direct moves, then chains of moves); should the zone rule leave no way to the bound,
  the zone rule wins and the plan stays valid. Should the replica layout leave the primary
  bound out of reach (tiny clusters), replicas swap shards until it is not
  (:mod:`coordinator.placement.repair`);
- movement: a valid replica moves only when levelling needs it. After a single change:
  when an agent leaves, exactly its replicas move whenever that is possible at all; when
  one joins, at most the ceiling of its fair share moves. The tests check both against an
  exact (max-flow) oracle of what is possible;
- time: bounded whatever the weights, zones and history. Searches run over agents, not
  shards: one costs O(N * R); the per-agent indexes they read cost O(S * R) to build, once
  per call and only when direct moves do not suffice (docs/placement.md, "Cost").

Deadline hook. ``place(..., should_stop=f)`` calls ``f()`` (no arguments, no clock read
here) between steps that leave the plan valid: before levelling, before every augmenting
search and after every path pushed (a bulk push: after every chunk of up to 512 moves),
before balancing primaries and between their searches. Once ``f()`` returns True, the
remaining balancing is skipped and the result has ``complete=False``. What is never
skipped: the previous plan's valid replicas are kept, orphaned replicas are re-homed
(every shard has min(R, eligible) replicas, zone rule, no duplicates, no draining or
departed agent) and a shard whose primary left gets a survivor as primary. Only balance
(replica and primary counts) may then be off; calling ``place`` again from that result
finishes the job. A leader with a deadline::

    deadline = time.monotonic() + budget
    plan = place(previous, members, shards, replicas,
                 should_stop=lambda: time.monotonic() > deadline)
    write(plan)                 # valid either way
    if not plan.complete:
        schedule_another_pass() # from plan.replicas, to improve balance

``f`` is called often (up to a few times per path, or per chunk of moves), so it should
be cheap; the time between two calls is that of one search and one path or chunk:
O(N * R + S * R) in the worst case (the first index build), milliseconds in practice.
"""

from __future__ import annotations

import gc
import random
from collections.abc import Callable, Sequence
from itertools import repeat
from operator import and_, is_not

import xxhash

from coordinator.placement.fill import keep_valid, rehome_orphans, seed_rows
from coordinator.placement.level import level_load
from coordinator.placement.model import Member, Placement, Work, cluster_model, fair_shares
from coordinator.placement.primaries import balance_primaries
from coordinator.placement.repair import repair_primaries

__all__ = ["Member", "Placement", "fair_shares", "place"]


def _seed(shards: int, replicas: int) -> int:
    return xxhash.xxh64_intdigest(f"shardkeeper/placement/{shards}/{replicas}".encode())


def place(
    previous: Sequence[Sequence[str]] | None,
    members: Sequence[Member],
    shards: int,
    replicas: int,
    should_stop: Callable[[], bool] | None = None,
) -> Placement:
    """The target placement: for each shard 0..shards-1, its replicas' agent ids, primary
    first. `previous` is the last placement (or None for a new cluster); it may name agents
    that are gone and may be shorter or longer than `shards`. `should_stop`: the deadline
    hook described in the module docstring.

    Python's cyclic garbage collector is suspended while it runs (and left as it was): the
    plan being built is made of acyclic containers, which reference counting frees, and
    after a large change the collector would walk them hundreds of times (0.1 s of 0.9 at
    S = 100,000)."""
    suspended = gc.isenabled()
    gc.disable()
    try:
        return _place(previous, members, shards, replicas, should_stop)
    finally:
        if suspended:
            gc.enable()


def _place(
    previous: Sequence[Sequence[str]] | None,
    members: Sequence[Member],
    shards: int,
    replicas: int,
    should_stop: Callable[[], bool] | None,
) -> Placement:
    cl = cluster_model(members, shards, replicas)
    shortfall = shards * (replicas - cl.per_shard)
    if not cl.agents:
        return Placement(((),) * shards, shortfall, 0, 0)
    rnd = random.Random(_seed(shards, replicas))
    headless: dict[int, int] = {}
    if previous is None or not any(previous[:shards]):
        w = seed_rows(cl, rnd)
    else:
        w, headless, holes = keep_valid(previous, cl)
        rehome_orphans(w, holes, rnd)
    w.should_stop = should_stop
    level_load(w)
    if not balance_primaries(w, headless) and not w.out_of_time():
        # The replica layout leaves the primary bound out of reach: change it.
        repair_primaries(w)
    out = tuple(map(tuple, w.rows))
    moves, primary_changes = _changes(w, out)
    return Placement(out, shortfall, moves, primary_changes, complete=not w.cut_short)


def _changes(w: Work, out: Sequence[tuple[str, ...]]) -> tuple[int, int]:
    # C-level: one weight change can touch every row.
    touched = w.sorted_touched()
    new = list(map(out.__getitem__, touched))
    moves = sum(map(len, map(set.difference, map(set, new), map(w.original, touched))))
    old = list(map(w.previous_heads().__getitem__, touched))  # None: no primary before
    return moves, sum(map(and_, map(is_not, old, repeat(None)), w.new_primaries(touched)))
