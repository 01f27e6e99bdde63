"""The nemesis: a seeded schedule of overlapping faults, each undone by itself.

A :class:`Fault` kind knows how to inflict itself on the fleet and how to undo it; the
schedule (:func:`schedule`) fixes, from the seed alone, when each fault starts and how
long it lasts. Targets (which agent, which ZooKeeper server, who leads now) are drawn
from a random stream seeded the same way, at the moment the fault starts. The
:class:`Nemesis` thread runs the schedule: a fault whose resources another fault holds
waits until they are free (so two faults never fight over one process), and every fault
still active when the run ends is undone in ``stop``.

Fault kinds (``KINDS``):

==================  =========================================================================
agent-kill          SIGKILL an agent; start it again, with its data, when the fault ends
agent-pause         SIGSTOP an agent past its session timeout, then SIGCONT
leader-kill         SIGKILL the leading coordinator; start it again at the end
leader-pause        SIGSTOP the leading coordinator past its session timeout, then SIGCONT
zk-kill             SIGKILL one ZooKeeper server; start it again at the end
zk-quorum           SIGKILL two of the three ZooKeeper servers (no quorum); start them again
part-agent-zk       cut an agent from every ZooKeeper server (not from its peers)
part-agent-peers    cut an agent from every other agent (not from ZooKeeper)
part-coord-zk       cut the leading coordinator from every ZooKeeper server
slow-link           limit an agent's link to a few Mbit/s (tbf; netem is not in this kernel)
disk-full           fill the small filesystem under one agent's data dir, then free it
mass-departure      SIGSTOP more than half of the agents at once (the maintenance guard)
drain               drain an agent, undrain it at the end
add-agent           start a new agent, which stays
==================  =========================================================================
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from bench.chaos import disk
from bench.chaos.fleet import Fleet

log = logging.getLogger(__name__)


class Skip(Exception):
    """The fault cannot be inflicted now (no target available): it is not counted."""


@dataclass
class Fault:
    """One kind of fault; ``start`` picks targets and inflicts it, ``stop`` undoes it."""

    kind: ClassVar[str] = ""
    # (min, max) seconds it lasts; the schedule draws from it.
    span: ClassVar[tuple[float, float]] = (4.0, 10.0)
    exclusive: ClassVar[bool] = False  # runs alone: no other fault at the same time
    targets: list[str] = field(default_factory=list)
    note: str = ""
    busy: set[str] = field(default_factory=set)  # names other active faults hold

    def resources(self, fleet: Fleet, rng: random.Random) -> list[str]:
        """Choose and return the names this fault will hold (raise Skip if none)."""
        raise NotImplementedError

    def start(self, fleet: Fleet) -> None:
        raise NotImplementedError

    def stop(self, fleet: Fleet) -> None:
        raise NotImplementedError


def _agents(fleet: Fleet, busy: set[str]) -> list[str]:
    return sorted(a for a in fleet.live_agents() if a not in busy)


class _OneAgent(Fault):
    def resources(self, fleet: Fleet, rng: random.Random) -> list[str]:
        free = _agents(fleet, self.busy)
        if not free:
            raise Skip("no free agent")
        self.targets = [rng.choice(free)]
        return self.targets


@dataclass
class AgentKill(_OneAgent):
    kind: ClassVar[str] = "agent-kill"
    span: ClassVar[tuple[float, float]] = (2.0, 10.0)

    def start(self, fleet: Fleet) -> None:
        fleet.kill(self.targets[0])

    def stop(self, fleet: Fleet) -> None:
        fleet.start_agent(self.targets[0])


@dataclass
class AgentPause(_OneAgent):
    kind: ClassVar[str] = "agent-pause"

    def start(self, fleet: Fleet) -> None:
        fleet.pause(self.targets[0])

    def stop(self, fleet: Fleet) -> None:
        fleet.resume(self.targets[0])


def _leader(fleet: Fleet, busy: set[str]) -> str:
    leader = fleet.leader()
    if leader is None or leader in busy or not fleet.running(leader):
        raise Skip("no leader known now")
    return leader


@dataclass
class LeaderKill(Fault):
    kind: ClassVar[str] = "leader-kill"
    span: ClassVar[tuple[float, float]] = (2.0, 6.0)

    def resources(self, fleet: Fleet, rng: random.Random) -> list[str]:
        self.targets = [_leader(fleet, self.busy)]
        return self.targets

    def start(self, fleet: Fleet) -> None:
        fleet.kill(self.targets[0])

    def stop(self, fleet: Fleet) -> None:
        fleet.start_coordinator(self.targets[0])


@dataclass
class LeaderPause(LeaderKill):
    kind: ClassVar[str] = "leader-pause"
    span: ClassVar[tuple[float, float]] = (4.0, 8.0)

    def start(self, fleet: Fleet) -> None:
        fleet.pause(self.targets[0])

    def stop(self, fleet: Fleet) -> None:
        fleet.resume(self.targets[0])


@dataclass
class ZkKill(Fault):
    kind: ClassVar[str] = "zk-kill"
    span: ClassVar[tuple[float, float]] = (5.0, 15.0)
    count: ClassVar[int] = 1

    def resources(self, fleet: Fleet, rng: random.Random) -> list[str]:
        free = [z for z in fleet.zk_names if z not in self.busy and fleet.running(z)]
        if len(free) < len(fleet.zk_names):
            raise Skip("a ZooKeeper server is down already")
        self.targets = sorted(rng.sample(free, self.count))
        return self.targets

    def start(self, fleet: Fleet) -> None:
        for z in self.targets:
            fleet.kill(z)

    def stop(self, fleet: Fleet) -> None:
        for z in self.targets:
            fleet.start_zk(z)


@dataclass
class ZkQuorum(ZkKill):
    kind: ClassVar[str] = "zk-quorum"
    span: ClassVar[tuple[float, float]] = (10.0, 30.0)
    exclusive: ClassVar[bool] = True
    count: ClassVar[int] = 2


@dataclass
class PartAgentZk(_OneAgent):
    kind: ClassVar[str] = "part-agent-zk"

    def start(self, fleet: Fleet) -> None:
        fleet.net.cut_off(self.targets[0], fleet.zk_names)

    def stop(self, fleet: Fleet) -> None:
        fleet.net.heal_off(self.targets[0], fleet.zk_names)


@dataclass
class PartAgentPeers(_OneAgent):
    kind: ClassVar[str] = "part-agent-peers"
    others: list[str] = field(default_factory=list)

    def start(self, fleet: Fleet) -> None:
        self.others = [a for a in fleet.agents if a != self.targets[0]]
        fleet.net.cut_off(self.targets[0], self.others)

    def stop(self, fleet: Fleet) -> None:
        fleet.net.heal_off(self.targets[0], self.others)


@dataclass
class PartCoordZk(LeaderKill):
    kind: ClassVar[str] = "part-coord-zk"
    span: ClassVar[tuple[float, float]] = (4.0, 10.0)

    def start(self, fleet: Fleet) -> None:
        fleet.net.cut_off(self.targets[0], fleet.zk_names)

    def stop(self, fleet: Fleet) -> None:
        fleet.net.heal_off(self.targets[0], fleet.zk_names)


@dataclass
class SlowLink(_OneAgent):
    kind: ClassVar[str] = "slow-link"
    span: ClassVar[tuple[float, float]] = (5.0, 15.0)

    def start(self, fleet: Fleet) -> None:
        fleet.net.slow(self.targets[0], "4mbit")

    def stop(self, fleet: Fleet) -> None:
        fleet.net.unslow(self.targets[0])


@dataclass
class DiskFull(Fault):
    kind: ClassVar[str] = "disk-full"
    span: ClassVar[tuple[float, float]] = (5.0, 15.0)

    def resources(self, fleet: Fleet, rng: random.Random) -> list[str]:
        agent = fleet.disk_agent
        if agent is None or agent in self.busy or not fleet.running(agent):
            raise Skip("the small-disk agent is busy or down")
        self.targets = [agent]
        return self.targets

    def start(self, fleet: Fleet) -> None:
        taken = disk.fill(fleet.data_dir(self.targets[0]))
        self.note = f"{taken / 1e6:.1f} MB taken"

    def stop(self, fleet: Fleet) -> None:
        disk.release(fleet.data_dir(self.targets[0]))


@dataclass
class MassDeparture(Fault):
    kind: ClassVar[str] = "mass-departure"
    span: ClassVar[tuple[float, float]] = (7.0, 12.0)
    exclusive: ClassVar[bool] = True

    def resources(self, fleet: Fleet, rng: random.Random) -> list[str]:
        live = _agents(fleet, self.busy)
        want = math.floor(len(fleet.agents) / 2) + 1
        if len(live) < want:
            raise Skip("too few live agents")
        self.targets = sorted(rng.sample(live, want))
        return self.targets

    def start(self, fleet: Fleet) -> None:
        for a in self.targets:
            fleet.pause(a)

    def stop(self, fleet: Fleet) -> None:
        for a in self.targets:
            fleet.resume(a)


@dataclass
class Drain(_OneAgent):
    kind: ClassVar[str] = "drain"
    span: ClassVar[tuple[float, float]] = (8.0, 20.0)

    def start(self, fleet: Fleet) -> None:
        fleet.drain(self.targets[0])

    def stop(self, fleet: Fleet) -> None:
        fleet.undrain(self.targets[0])


@dataclass
class AddAgent(Fault):
    kind: ClassVar[str] = "add-agent"
    span: ClassVar[tuple[float, float]] = (0.0, 0.0)
    limit: ClassVar[int] = 2  # per run: each one adds load to two cores for good

    def resources(self, fleet: Fleet, rng: random.Random) -> list[str]:
        added = len(fleet.agents) - fleet.opts.agents
        if added >= self.limit:
            raise Skip("enough agents added")
        return []

    def start(self, fleet: Fleet) -> None:
        name = fleet.new_agent()
        self.targets = [name]
        fleet.start_agent(name)

    def stop(self, fleet: Fleet) -> None:
        pass


FAULTS: dict[str, type[Fault]] = {
    f.kind: f for f in (AgentKill, AgentPause, LeaderKill, LeaderPause, ZkKill, ZkQuorum,
                        PartAgentZk, PartAgentPeers, PartCoordZk, SlowLink, DiskFull,
                        MassDeparture, Drain, AddAgent)
}
KINDS = tuple(FAULTS)


SKIP_RETRIES = 8  # a planned fault that finds no target is tried again this often
SKIP_DELAY = 2.0
SETTLE_WAIT = 30.0  # at most this long an exclusive fault waits for the cluster to settle
# An exclusive fault waits this long after any fault ended: the cluster looks settled for a
# moment after an undo (an undrain, say) until the leader has planned its consequences,
# whose copies the exclusive fault would otherwise be charged with.
REACT_WAIT = 3.0


@dataclass(frozen=True)
class Planned:
    at: float  # seconds after the nemesis starts
    kind: str
    duration: float


def schedule(seed: int, duration: float, kinds: tuple[str, ...] = KINDS,
             every_kind: bool = True, mean_gap: float = 4.0,
             quorum_span: tuple[float, float] | None = None) -> list[Planned]:
    """The faults of a run: their start times and durations, from the seed alone.

    With ``every_kind``, each kind starts once first, in a shuffled order spread over the
    run, so that a short run still meets every kind; then faults come every ``mean_gap``
    seconds on average (exponential gaps) until ``duration``. Faults that must run alone
    get room after them. ``quorum_span`` overrides the zk-quorum duration range.
    """
    rng = random.Random(seed)
    spans = {k: FAULTS[k].span for k in kinds}
    if quorum_span is not None and "zk-quorum" in spans:
        spans["zk-quorum"] = quorum_span
    plan: list[Planned] = []
    order = list(kinds)
    rng.shuffle(order)
    t = 0.0
    if every_kind:
        room = duration / max(1, len(order))
        for kind in order:
            span = rng.uniform(*spans[kind])
            plan.append(Planned(round(t, 2), kind, round(span, 2)))
            t += span if FAULTS[kind].exclusive else min(room, rng.uniform(0.3, 1.0) * room)
    while True:
        t += rng.expovariate(1.0 / mean_gap)
        if t >= duration:
            break
        kind = rng.choice(order)
        span = rng.uniform(*spans[kind])
        plan.append(Planned(round(t, 2), kind, round(span, 2)))
        if FAULTS[kind].exclusive:
            t += span
    return plan


@dataclass
class Record:
    """One fault as it happened (times relative to the run's clock)."""

    kind: str
    planned: float
    start: float
    end: float | None = None
    targets: tuple[str, ...] = ()
    note: str = ""
    error: str = ""
    wall_start: float = 0.0  # time.time(), to set beside the leader's audit log
    wall_end: float = 0.0


class Nemesis(threading.Thread):
    """Runs a schedule against the fleet; ``records`` is what happened."""

    def __init__(self, fleet: Fleet, plan: list[Planned], seed: int, clock: float,
                 max_active: int = 3, settled: Callable[[], bool] | None = None):
        super().__init__(name="nemesis", daemon=True)
        self.fleet = fleet
        self.plan = sorted(plan, key=lambda p: p.at)
        self.rng = random.Random(seed ^ 0x5EED)
        self.clock = clock
        self.max_active = max_active
        self.records: list[Record] = []
        self.skipped: list[tuple[str, str]] = []
        self.halt = threading.Event()
        self._lock = threading.Lock()
        self._active: list[tuple[Fault, Record, float]] = []  # fault, record, ends at
        self._tries: Counter[Planned] = Counter()
        self.began = 0.0
        # A fault that runs alone waits (at most SETTLE_WAIT) for the cluster to settle
        # after the faults before it, so that the churn measured after it is its own.
        self.settled = settled
        self._waiting_since: dict[Planned, float] = {}
        self._last_end = float("-inf")  # when a fault last ended (the nemesis's clock)

    def now(self) -> float:
        return time.monotonic() - self.clock

    def busy(self) -> set[str]:
        with self._lock:
            return {t for f, _, _ in self._active for t in f.targets}

    def exclusive_active(self) -> bool:
        with self._lock:
            return any(f.exclusive for f, _, _ in self._active)

    def run(self) -> None:
        self.began = self.now()
        pending = list(self.plan)
        while not self.halt.is_set():
            self._end_due()
            if pending and self.now() - self.began >= pending[0].at and self._room(pending[0]):
                planned = pending.pop(0)
                if not self._begin(planned) and self._tries[planned] < SKIP_RETRIES:
                    # No target now (the leader is down, the small-disk agent is busy):
                    # try again a little later rather than lose the kind from the run.
                    self._tries[planned] += 1
                    later = Planned(self.now() - self.began + SKIP_DELAY, planned.kind,
                                    planned.duration)
                    self._tries[later] = self._tries[planned]
                    pending.append(later)
                    pending.sort(key=lambda p: p.at)
                continue
            if not pending and not self._active:
                return
            self.halt.wait(0.1)  # the schedule's clock tick, not a wait for an event

    def _room(self, planned: Planned) -> bool:
        with self._lock:
            if any(f.exclusive for f, _, _ in self._active):
                return False
            if FAULTS[planned.kind].exclusive:
                return not self._active and self._quiet(planned)
            return len(self._active) < self.max_active

    def _quiet(self, planned: Planned) -> bool:
        """For a fault that runs alone: REACT_WAIT after the last fault ended, the cluster
        settled, or SETTLE_WAIT has passed."""
        since = self._waiting_since.setdefault(planned, self.now())
        if self.now() - self._last_end < REACT_WAIT:
            return False
        if self.settled is None or self.settled():
            return True
        return self.now() - since >= SETTLE_WAIT

    def _begin(self, planned: Planned) -> bool:
        """Start one fault; False if it found no target (it is not counted then)."""
        fault = FAULTS[planned.kind](busy=self.busy())
        try:
            fault.resources(self.fleet, self.rng)
        except Skip as why:
            self.skipped.append((planned.kind, str(why)))
            return False
        record = Record(planned.kind, planned.at, self.now(), targets=tuple(fault.targets),
                        wall_start=time.time())
        try:
            fault.start(self.fleet)
        except Exception as exc:  # noqa: BLE001 - a fault that failed to start is reported
            record.error = f"start: {exc!r}"
            record.end = self.now()
            record.wall_end = time.time()
            self.records.append(record)
            log.warning("%s failed to start: %r", planned.kind, exc)
            return True
        record.targets = tuple(fault.targets)
        record.note = fault.note
        self.records.append(record)
        log.info("+%.1fs %s %s %s", record.start, planned.kind, ",".join(record.targets),
                 fault.note)
        with self._lock:
            self._active.append((fault, record, self.now() + planned.duration))
        return True

    def _end_due(self, everything: bool = False) -> None:
        with self._lock:
            due = [a for a in self._active if everything or a[2] <= self.now()]
            self._active = [a for a in self._active if a not in due]
        for fault, record, _ in due:
            try:
                fault.stop(self.fleet)
            except Exception as exc:  # noqa: BLE001 - retried once below, then reported
                log.warning("%s failed to undo (%r); trying again", record.kind, exc)
                time.sleep(1.0)  # a back-off before the one retry of an undo
                try:
                    fault.stop(self.fleet)
                except Exception as again:  # noqa: BLE001
                    record.error = f"stop: {again!r}"
            record.end = self._last_end = self.now()
            record.wall_end = time.time()
            log.info("+%.1fs %s ended", record.end, record.kind)

    def stop(self) -> None:
        """End the schedule and undo every fault still active."""
        self.halt.set()
        self.join(30)
        self._end_due(everything=True)
