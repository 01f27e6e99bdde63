"""Reconciliation: one make-before-break step from the current plan toward the target.

Pure: plain data in, plain data out; no ZooKeeper, no clock. The leader calls
:func:`next_step` whenever members, status, config or admin requests change, writes the
plan it returns, and calls again when agents report progress.

Per shard the plan keeps the in-sync replicas (primary first) apart from the replicas
still copying (bootstrapping, each from a named in-sync source). One step:

1. **Failover, at once and even when paused**: replicas on departed agents leave the
   in-sync set; if the primary departed, the first surviving in-sync replica becomes
   primary. A bootstrap whose source departed is re-pointed at a surviving replica.
2. **Join**: a bootstrapping replica that reports caught up joins the in-sync set. A copy
   its agent reports failed (ERROR, after its own bounded retries) is re-pointed at
   another in-sync source, or, with no other, withdrawn for one step so that the next
   step issues it afresh at a newer generation: a failed copy always leads somewhere.
3. **Start copies** for target replicas the shard lacks, within the per-agent and
   cluster throttles; shards below their replica count go before moves made for balance.
4. **Promote** the target's primary once it is in sync, and once the current primary
   knows it in sync (``fenced``: it applied a plan listing it as a peer). Only then does
   the old primary forward to it with must-ack, so that the moment the new primary takes
   its new term, the old one can acknowledge nothing more: a write the old primary
   acknowledged after the new one caught up from its peers would be repaired away. A
   **leaving** agent (shutting down, asking for a graceful hand-off) holds no primary: its
   primaries move to an in-sync replica that stays and that it knows in sync, even in
   maintenance (a hand-off copies and drops nothing), and no copy starts into it or,
   where another source exists, from it.
5. **Drop (break) last**: a replica outside the target leaves only while the shard keeps
   at least as many in-sync replicas as the target asks for, so a move never lowers
   redundancy; the primary leaves only after a fenced successor took over. Nothing
   leaves a shard whose primary is new until that primary reports its promotion done:
   it pulls from the replicas its plan names what it may lack, the old primary among them.

A shard with no live in-sync replica is left exactly as it is and reported
``unavailable``: its agents may come back with their data (a ZooKeeper hiccup, a
reboot), and re-creating it empty elsewhere would turn an outage into data loss. Only a
shard that was never placed is created empty on its target.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Container, Sequence
from dataclasses import dataclass, field, replace

from shardkeeper.plan import ShardPlan


@dataclass(frozen=True)
class Throttle:
    max_moves_per_agent: int = 4  # concurrent copies into, or out of, one agent
    max_moves_total: int = 64  # concurrent copies in the cluster
    paused: bool = False  # maintenance: no copies, no drops; failover still happens


@dataclass(frozen=True)
class Step:
    plan: tuple[ShardPlan, ...]
    started: int = 0  # copies started in this step
    joined: int = 0  # copies that finished and joined the in-sync set
    dropped: int = 0  # replicas removed after their replacement joined
    failovers: int = 0  # primaries replaced because their agent departed
    promotions: int = 0  # primaries moved to a caught-up replica for balance
    handoffs: int = 0  # primaries moved off leaving agents to in-sync replicas
    deferred: int = 0  # copies the target wants but the throttle (or pause) holds back
    unavailable: tuple[int, ...] = ()  # shards with no live in-sync replica
    in_flight: int = 0  # copies running after this step
    # Failed copies handled: (shard, agent, old source, new source or None if withdrawn).
    retried: tuple[tuple[int, str, str, str | None], ...] = ()
    handovers_waiting: int = 0  # primary moves held until the primary knows its successor


@dataclass
class _Tally:
    """Counters shared by the per-shard decisions of one step."""

    throttle: Throttle
    copies_in: Counter = field(default_factory=Counter)
    copies_out: Counter = field(default_factory=Counter)
    total: int = 0
    started: int = 0
    joined: int = 0
    dropped: int = 0
    failovers: int = 0
    promotions: int = 0
    handoffs: int = 0
    deferred: int = 0
    handovers_waiting: int = 0
    retried: list[tuple[int, str, str, str | None]] = field(default_factory=list)
    withdrawn: set[tuple[str, int]] = field(default_factory=set)
    leaving: frozenset[str] = frozenset()

    def count(self, agent: str, source: str) -> None:
        self.copies_in[agent] += 1
        self.copies_out[source] += 1
        self.total += 1

    def allows(self, agent: str) -> bool:
        t = self.throttle
        return (
            not t.paused
            and self.total < t.max_moves_total
            and self.copies_in[agent] < t.max_moves_per_agent
        )

    def pick_source(self, in_sync: Sequence[str], avoid: str | None = None) -> str | None:
        """The in-sync replica with the fewest outgoing copies (in-sync order breaks ties);
        a leaving agent only if no other can serve (it is about to go away)."""
        candidates = [a for a in in_sync if a != avoid
                      and self.copies_out[a] < self.throttle.max_moves_per_agent]
        if not candidates:
            return None
        return min(candidates, key=lambda a: (a in self.leaving, self.copies_out[a],
                                              in_sync.index(a)))


def fail_over(
    shard: ShardPlan, target: Sequence[str], live: Collection[str],
    caught_up: Collection[str], tally: _Tally, failed: Collection[str] = (), index: int = -1,
    fenced: Container[str] | None = None,
) -> tuple[list[str], list[tuple[str, str]]] | None:
    """Steps 1 and 2: drop departed replicas, re-point or join bootstraps; re-point or
    withdraw the copies in ``failed`` (agents whose copy of this shard failed).

    When the primary departed, a survivor it knew in sync (``fenced``) takes over first:
    a departed primary slow to notice its lost session still forwards to those with
    must-ack, and they refuse once they follow the new term.

    Returns (in_sync, bootstrapping), or None when no live in-sync replica is left.
    """
    if not shard.replicas:
        # Never placed (a new cluster, or more shards): there is no data to copy.
        return [a for a in target if a in live], []
    in_sync = [a for a in shard.replicas if a in live]
    if not in_sync:
        return None
    if shard.replicas[0] not in live:
        tally.failovers += 1
        if fenced is not None:
            in_sync.sort(key=lambda a: a not in fenced)  # stable: plan order otherwise
    boot: list[tuple[str, str]] = []
    for agent, source in shard.bootstrapping:
        if agent not in live:
            continue
        if agent in caught_up:
            in_sync.append(agent)
            tally.joined += 1
        else:
            boot.append((agent, source))
    repointed = []
    for agent, source in boot:
        if agent in failed:
            other = tally.pick_source(in_sync, avoid=source)
            if other is None:
                # Only one source: withdraw the copy now, issue it afresh next step.
                tally.retried.append((index, agent, source, None))
                tally.withdrawn.add((agent, index))
                continue
            tally.retried.append((index, agent, source, other))
            source = other
        elif source not in in_sync:
            source = tally.pick_source(in_sync) or in_sync[0]
        repointed.append((agent, source))
        tally.count(agent, source)
    return in_sync, repointed


def start_copies(
    in_sync: list[str], boot: list[tuple[str, str]], target: Sequence[str],
    live: Collection[str], tally: _Tally, shard: int = -1,
) -> None:
    """Step 3: bootstrap target replicas the shard lacks, as the throttle allows."""
    holding = set(in_sync) | {a for a, _ in boot}
    for agent in target:
        if agent in holding or agent not in live or (agent, shard) in tally.withdrawn:
            continue
        if agent in tally.leaving:
            continue  # it is shutting down: copy to it when it is back
        source = tally.pick_source(in_sync) if tally.allows(agent) else None
        if source is None:
            tally.deferred += 1
            continue
        boot.append((agent, source))
        tally.count(agent, source)
        tally.started += 1


def hand_off(in_sync: list[str], target: Sequence[str], tally: _Tally,
             fenced: Container[str] | None = None) -> bool:
    """A leaving agent holds no primary: give it to an in-sync replica that stays and that
    it knows in sync (``fenced``; the target's primary if it is one, else the first such
    replica of the target, else any). In sync means it applied every acknowledged write,
    and known in sync means the leaving primary forwards to it with must-ack, so its new
    term fences the old primary: the hand-off loses nothing. With no such replica yet the
    hand-off waits (the leaving agent keeps the primary until its hand-off timeout)."""
    if not in_sync or in_sync[0] not in tally.leaving:
        return False
    stays = [a for a in in_sync if a not in tally.leaving]
    if fenced is not None and stays and not any(a in fenced for a in stays):
        tally.handovers_waiting += 1
        return True
    if fenced is not None:
        stays = [a for a in stays if a in fenced]
    if not stays:
        return False  # no replica to take it: the leaving agent keeps it (and says so)
    choice = next((a for a in target if a in stays), stays[0])
    in_sync.remove(choice)
    in_sync.insert(0, choice)
    tally.handoffs += 1
    return False


def settle(
    in_sync: list[str], boot: list[tuple[str, str]], target: Sequence[str],
    paused: bool, tally: _Tally, min_in_sync: int = 0,
    fenced: Container[str] | None = None, primary_before: str | None = None,
    primary_settled: bool = True,
) -> tuple[list[str], list[tuple[str, str]]]:
    """Steps 4 and 5: promote the target's primary, then drop what the target no longer has.

    ``fenced``: the replicas the current primary knows in sync (None: any may take over).
    A handover to another replica waits for it, and so does dropping the primary.
    Hand-offs from leaving agents happen even when paused: they copy and drop nothing.

    Nothing is dropped while the shard's primary is new: in the step that changes it, nor
    until it reports its promotion finished (``primary_settled``). A new primary first
    pulls, from the in-sync replicas its plan names, the rows it may lack: writes acked
    while it was still copying reached it only best effort, and a replica that joined
    the in-sync set holds them only once the primary's next write pushed the gap. The
    old primary holds every one of them; dropped in the same step, it would take them
    to the trash (bench.chaos found this: acknowledged writes rolled back).
    ``primary_before``: the shard's primary in the current plan (None: it had none)."""
    wanted = set(target)
    handing_off = hand_off(in_sync, target, tally, fenced)  # True: waiting for a successor
    if not paused:
        # Copies for replicas the target no longer wants are cancelled: they hold nothing
        # that the shard relies on.
        boot = [(a, s) for a, s in boot if a in wanted]
        waiting = False  # a handover to the target's primary waits for it to be fenced
        if (target and target[0] in in_sync and in_sync[0] != target[0]
                and target[0] not in tally.leaving):
            if fenced is None or target[0] in fenced:
                in_sync.remove(target[0])
                in_sync.insert(0, target[0])
                tally.promotions += 1
            else:
                waiting = True
                tally.handovers_waiting += 0 if handing_off else 1
        if primary_before is not None and (
                not primary_settled or in_sync[:1] != [primary_before]):
            return in_sync, boot  # drops wait until the new primary caught up (above)
        # A drain or move must not cost redundancy, even when the target is short of R
        # (too few eligible agents): then the old replica stays until there is room.
        keep = max(len(target), min_in_sync)
        for agent in [a for a in reversed(in_sync) if a not in wanted]:
            if len(in_sync) - 1 < keep:
                break
            if any(source == agent for _, source in boot):
                continue
            if agent == in_sync[0] and fenced is not None and (
                    waiting or len(in_sync) < 2 or in_sync[1] not in fenced):
                # Dropping the primary hands over to in_sync[1]: only to a fenced one, and
                # not while the handover the target wants is waiting.
                continue
            in_sync.remove(agent)
            tally.dropped += 1
    return in_sync, boot


DEFAULT_THROTTLE = Throttle()


def next_step(
    current: Sequence[ShardPlan],
    target: Sequence[Sequence[str]],
    live: Collection[str],
    caught_up: Container[tuple[str, int]],
    throttle: Throttle = DEFAULT_THROTTLE,
    min_in_sync: int = 0,
    failed: Collection[tuple[str, int]] = (),
    leaving: Collection[str] = (),
    fenced: Container[tuple[str, int]] | None = None,
    settled: Container[tuple[str, int]] | None = None,
) -> Step:
    """One step toward ``target`` (shard -> agents, primary first, as placement returns).

    ``live`` are the current members; ``caught_up`` the (agent, shard) pairs whose status
    reports the replica online and caught up with the plan that asked for it. Replicas
    outside the target are dropped only while at least ``min_in_sync`` (R) stay in sync.
    ``failed`` are the (agent, shard) copies whose agent reports them failed. ``leaving``
    agents are shutting down: their primaries are handed off to in-sync replicas.
    ``fenced`` are the (agent, shard) replicas each shard's primary knows in sync (it
    applied a plan listing them): only they may take over from a live primary (None: no
    such check).
    ``settled`` are the (agent, shard) primaries that report their promotion finished
    under their latest plan: a shard drops replicas only while its primary is one of them
    and stays primary (None: no such check; a step that changes the primary never drops).

    ``caught_up``, ``fenced`` and ``settled`` are only asked about the shards off their
    target, one pair at a time: the leader passes views that answer from the agents'
    reports (``coordinator.decide``) instead of sets of every replica in the cluster.
    """
    live = set(live)
    leaving = frozenset(leaving)
    broken: dict[int, set[str]] = {}
    for agent, s in failed:
        broken.setdefault(s, set()).add(agent)
    n = len(target)
    shards = list(current[:n]) + [ShardPlan()] * (n - len(current))
    tally = _Tally(throttle, leaving=leaving)
    staged: dict[int, tuple[list[str], list[tuple[str, str]]]] = {}
    unavailable: list[int] = []
    for s, shard in enumerate(shards):
        if shard.replicas == tuple(target[s]) and not shard.bootstrapping and all(
            a in live for a in shard.replicas
        ) and not (shard.replicas and shard.replicas[0] in leaving):
            continue  # already at its target: the common case, kept cheap at 100k shards
        joined = {a for a, _ in shard.bootstrapping if (a, s) in caught_up}
        result = fail_over(shard, target[s], live, joined, tally, broken.get(s, ()), s,
                           None if fenced is None else _OfShard(fenced, s))
        if result is None:
            unavailable.append(s)
        else:
            staged[s] = result
    # Shards short of their replica count copy first; moves for balance wait their turn.
    order = sorted(staged, key=lambda s: (len(staged[s][0]) >= len(target[s]), s))
    for s in order:
        start_copies(staged[s][0], staged[s][1], target[s], live, tally, s)
    plan = list(shards)
    for s, (in_sync, boot) in staged.items():
        primary = shards[s].primary
        in_sync, boot = settle(in_sync, boot, target[s], throttle.paused, tally, min_in_sync,
                               None if fenced is None else _OfShard(fenced, s),
                               primary, settled is None or (primary, s) in settled)
        # The term stays the shard's own until with_terms stamps a changed primary.
        plan[s] = ShardPlan(tuple(in_sync), tuple(boot), shards[s].term)
    in_flight = sum(len(p.bootstrapping) for p in plan)
    return Step(
        plan=tuple(plan),
        started=tally.started,
        joined=tally.joined,
        dropped=tally.dropped,
        failovers=tally.failovers,
        promotions=tally.promotions,
        handoffs=tally.handoffs,
        deferred=tally.deferred,
        unavailable=tuple(unavailable),
        in_flight=in_flight,
        retried=tuple(tally.retried),
        handovers_waiting=tally.handovers_waiting,
    )


class _OfShard:
    """The agents ``pairs`` names for one shard, as a container of agent ids."""

    __slots__ = ("pairs", "shard")

    def __init__(self, pairs: Container[tuple[str, int]], shard: int):
        self.pairs, self.shard = pairs, shard

    def __contains__(self, agent: object) -> bool:
        return (agent, self.shard) in self.pairs


def with_terms(
    previous: Sequence[ShardPlan], plan: Sequence[ShardPlan], generation: int
) -> tuple[ShardPlan, ...]:
    """Stamp each shard with its primary's term: ``generation`` where the primary changed
    (or the shard is new), else the term it had.

    The term is the shard's fencing number (Kafka's leader epoch): the primary numbers its
    LSNs from it and replicas accept forwards only at the term their plan gives. It must be
    the same number on every agent, so it comes from the plan, not from the generation at which
    each agent happened to notice the change (agents skip plans they read late).
    """
    out = []
    for s, shard in enumerate(plan):
        before = previous[s] if s < len(previous) else ShardPlan()
        if shard.primary is None:
            term = 0
        elif shard.primary == before.primary and before.term:
            term = before.term
        else:
            term = generation
        out.append(shard if shard.term == term else replace(shard, term=term))
    return tuple(out)


def at_target(plan: Sequence[ShardPlan], target: Sequence[Sequence[str]]) -> bool:
    """True when every shard holds exactly its target's agents in sync, with the target's
    primary first and nothing copying (the order of the other replicas does not matter)."""
    return len(plan) == len(target) and all(
        not p.bootstrapping
        and set(p.replicas) == set(t)
        and p.replicas[:1] == tuple(t[:1])
        for p, t in zip(plan, target, strict=True)
    )
