"""`python -m bench.failover [--json]`: failover times on real ZooKeeper and real processes.

Three scenarios in one run, one after the other, on one throw-away ZooKeeper:

* agent SIGKILL: N agents and two coordinator candidates; each kill is timed to the
  member znode gone, the first plan whose members exclude the agent, and every shard
  held by R live agents again (per status). A replacement agent with a new id then joins
  and the cluster settles (no copy running, every status matching the plan, all processes
  quiet) before the next kill, so every kill starts from the same state at N agents.
* leader SIGKILL: the leading candidate is killed and, right after, the benchmark files a
  `shardkeeper move` of one replica, so the new leader must write a plan. Timed to the
  epoch bump (the election won) and to the first plan/meta written with the new epoch
  (the first fenced write). The killed candidate then rejoins as a standby.
* baseline: kazoo's SetPartitioner with N member processes over S items, same session
  timeout, time_boundary 0; one member is SIGKILLed and the survivors' acquired sets are
  timed. The shardkeeper processes are stopped by then, so both get the same machine.

"Written" means the znode's mtime: the instant ZooKeeper applied the write (server wall
clock, ms). plan/meta.created (stamped by the leader before it writes) and the instant
our watch fired are reported too; the three bracket the write. All times are from the
instant SIGKILL was sent. p99 is nearest-rank: with 20 samples it is the maximum.

Kills are measured with the product's default config. Between kills only, the copy
throttle is lifted so that the replacement agent receives its ~600 replicas quickly.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import click
from kazoo.client import KazooClient

from bench.common import (
    BenchTimeout,
    ClusterWatch,
    RoleDied,
    Workspace,
    agent_argv,
    coordinator_argv,
    init_argv,
    machine,
    percentile,
    read_stream_lines,
    rounded,
    seconds,
    table,
    unsettled,
    wait_idle,
    workspace,
)
from shardkeeper import admin
from shardkeeper import cluster as clusterstate
from shardkeeper.layout import MoveRequest, Paths
from shardkeeper.plan import Targets
from shardkeeper.poll import poll_until
from shardkeeper.token import PEER_TOKEN_ENV, TOKEN_ENV
from shardkeeper.zk import ZkTarget, close, connect, ensure_layout

CLUSTER = "bench"
CANDIDATES = ("c1", "c2")
PARTITIONER_PATH = "/bench-setpartitioner"
STARTUP_BATCH = 5
GOAL_KILLS = 20  # the goal holds "over at least 20 kills"
UNTHROTTLED = {"max_moves_per_agent": "1000", "max_moves_total": "100000"}


@dataclass(frozen=True)
class Options:
    agents: int
    shards: int
    replicas: int
    session_timeout: float
    kills: int
    leader_kills: int
    partitioner_kills: int
    time_boundary: float
    throttle: str
    tick_ms: int
    seed: int
    settle_timeout: float = 300.0

    @property
    def event_timeout(self) -> float:
        """Bound on any one expected event: a few session timeouts, at least 20 s."""
        return max(20.0, 10 * self.session_timeout)


STARTED = time.monotonic()


def progress(message: str) -> None:
    elapsed = time.monotonic() - STARTED
    print(f"{time.strftime('%H:%M:%S')} +{elapsed:4.0f}s {message}", file=sys.stderr, flush=True)


def moved_fraction(before: Targets, after: Targets) -> float:
    """Fraction of the replicas of ``before`` that are no longer on the same agent."""
    total = sum(len(row) for row in before)
    moved = sum(len(set(b) - set(a)) for b, a in zip(before, after, strict=True))
    return moved / total if total else 0.0


# -- shardkeeper -------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentKill:
    victim: str
    member_gone: float
    plan_created: float
    plan_committed: float
    plan_observed: float
    replicated: float
    moved_fraction: float
    min_moved_fraction: float
    gap: bool  # our watch skipped a generation: the plan figures may be late
    others_left: tuple[str, ...]  # other agents whose sessions expired meanwhile


@dataclass(frozen=True)
class LeaderKill:
    leader: str
    new_leader: str
    epoch_bump: float
    first_write_created: float
    first_write_committed: float
    first_write_observed: float


class Fleet:
    """One shardkeeper cluster: its agents and coordinator candidates as real processes."""

    def __init__(self, ws: Workspace, opts: Options):
        self.ws = ws
        self.opts = opts
        self.paths = Paths(CLUSTER)
        self.agents: set[str] = set()
        self.throttle: dict[str, str] = {}
        # The data plane's shared secret, handed to agents as `init` would: they register
        # before the config exists, so that the first plan seeds them all at once.
        self.token = secrets.token_urlsafe(32)
        self.peer_token = secrets.token_urlsafe(32)
        self._next_agent = 0
        self.client: KazooClient = connect(ws.target, session_timeout=10.0)
        ensure_layout(self.client, self.paths)
        self.watch = ClusterWatch(self.client, self.paths).start()

    def init(self) -> None:
        subprocess.run(
            init_argv(self.ws.hosts, CLUSTER, self.opts.shards, self.opts.replicas),
            check=True,
            capture_output=True,
        )
        if self.opts.throttle == "lifted":
            admin.set_config(self.client, self.paths, UNTHROTTLED)
        config = clusterstate.read_config(self.client, self.paths)
        self.throttle = {k: str(getattr(config, k)) for k in UNTHROTTLED}

    def wait_filled(self, what: str) -> None:
        """Settle with the copy throttle lifted, then restore it.

        Only between kills: with the default throttle (4 concurrent copies per agent) a
        replacement agent takes ~150 plan generations to receive its share, which would
        not fit the run in minutes. Every kill is measured with the default throttle; the
        leader reads the config afresh on each reconcile.
        """
        admin.set_config(self.client, self.paths, UNTHROTTLED)
        try:
            self.wait_settled(what)
        finally:
            admin.set_config(self.client, self.paths, self.throttle)

    def close(self) -> None:
        close(self.client)

    def start_agent(self) -> str:
        agent = f"a{self._next_agent:03d}"
        self._next_agent += 1
        argv = agent_argv(
            self.ws.hosts, CLUSTER, agent, self.ws.root / "data" / agent, self.opts.session_timeout
        )
        tokens = {TOKEN_ENV: self.token, PEER_TOKEN_ENV: self.peer_token}
        self.ws.procs.start(agent, argv, env=tokens)
        self.agents.add(agent)
        return agent

    def start_candidate(self, name: str) -> None:
        self.ws.procs.start(
            name, coordinator_argv(self.ws.hosts, CLUSTER, name, self.opts.session_timeout)
        )

    def kill(self, name: str) -> float:
        self.agents.discard(name)
        return self.ws.procs.kill(name)

    def plan(self) -> clusterstate.PlanState:
        return clusterstate.read_plan(self.client, self.paths)

    def contenders(self) -> list[str]:
        return self.client.Election(self.paths.election).contenders()

    def wait_settled(self, what: str) -> None:
        """The plan converged (see common.unsettled), then every role process went quiet."""
        reason = ""

        def done() -> bool:
            nonlocal reason
            self.check()
            reason = unsettled(self.client, self.paths, self.opts.replicas, self.agents)
            return not reason

        try:
            poll_until(done, self.opts.settle_timeout, what, interval=0.1, error=BenchTimeout)
        except BenchTimeout as e:
            raise BenchTimeout(f"{e} ({reason})") from None
        wait_idle(
            lambda: [p.pid for p in self.ws.procs.running.values()],
            self.opts.settle_timeout,
            f"{what}: processes to go quiet",
            busy=0.15,
        )

    def check(self) -> None:
        """Fail the run at once if an agent or candidate died without being killed."""
        self.ws.procs.check()

    def departed_since(self, since: float) -> set[str]:
        """Agents seen leaving since ``since``, by our watch or in the leader's audit log.

        A session that expires and comes back within a second can slip between two reads
        of our children watch; the leader logs every departure it planned for.
        """
        left = set(self.watch.departed_since(since))
        for _, event in admin.events(self.client, self.paths):
            if event.kind == "member-left" and event.time >= since:
                left.add(event.message.split()[0])
        return left

    def meta_mark(self) -> int:
        with self.watch.cond:
            return len(self.watch.metas)


def start_fleet(fleet: Fleet) -> None:
    opts = fleet.opts
    for name in CANDIDATES:
        fleet.start_candidate(name)
    # A few agents at a time: 20 interpreters starting at once on 2 cores can starve
    # sessions of T = 1 s before the benchmark has measured anything.
    for first in range(0, opts.agents, STARTUP_BATCH):
        for _ in range(first, min(first + STARTUP_BATCH, opts.agents)):
            fleet.start_agent()
        poll_until(
            lambda: fleet.check() or fleet.watch.members >= fleet.agents,
            opts.settle_timeout,
            f"{len(fleet.agents)} agents to register",
            error=BenchTimeout,
        )
    # Config last: the first plan then seeds all agents at once instead of copying shards,
    # throttled, to each agent that registers after the first.
    fleet.init()
    fleet.wait_settled(f"{opts.agents} agents to hold the first plan")


def agent_kill(fleet: Fleet, victim: str) -> AgentKill:
    opts, watch = fleet.opts, fleet.watch
    before = fleet.plan()
    mark = fleet.meta_mark()
    last_generation = before.generation
    gone = watch.arm(lambda: victim not in watch.members)
    planned = watch.arm(lambda: watch.first_meta(mark, lambda m: victim not in m.members))
    replicated = watch.arm(
        lambda: (
            victim not in watch.members and watch.under_replicated(opts.shards, opts.replicas) == 0
        )
    )
    t0 = fleet.kill(victim)
    timeout, check = opts.event_timeout, fleet.check
    gone_at = watch.wait_for(gone, timeout, f"member {victim} to vanish", check)
    watch.wait_for(planned, timeout, f"a plan without {victim}", check)
    replicated_at = watch.wait_for(
        replicated, opts.settle_timeout, f"shards of {victim} re-replicated", check
    )
    with watch.cond:
        plan = watch.first_meta(mark, lambda m: victim not in m.members)
    assert plan is not None
    fleet.wait_settled(f"the cluster to settle without {victim}")
    after = fleet.plan()
    held = sum(victim in row for row in before.routing)
    return AgentKill(
        victim=victim,
        member_gone=gone_at - t0,
        plan_created=plan.meta.created - t0,
        plan_committed=plan.committed - t0,
        plan_observed=plan.observed - t0,
        replicated=replicated_at - t0,
        moved_fraction=moved_fraction(before.routing, after.routing),
        min_moved_fraction=held / (opts.shards * opts.replicas),
        gap=plan.meta.generation != last_generation + 1,
        others_left=tuple(sorted(fleet.departed_since(t0) - {victim})),
    )


@dataclass
class Phase:
    """The samples of one scenario, and what went wrong in the others."""

    samples: list[Any] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def failed(self, what: str, error: Exception) -> None:
        self.failures.append(f"{what}: {error}")
        progress(f"{what} FAILED: {error}")


def recover(fleet: Fleet, phase: Phase) -> bool:
    """After a failed sample: replace what died and give the cluster one more chance to
    settle at N agents and two candidates."""
    for name in fleet.ws.procs.reap():
        fleet.agents.discard(name)
    for name in CANDIDATES:
        if name not in fleet.ws.procs.running:
            fleet.start_candidate(name)
    while len(fleet.agents) < fleet.opts.agents:
        fleet.start_agent()
    try:
        fleet.wait_filled("the cluster to recover after a failed sample")
    except (BenchTimeout, RoleDied) as e:
        phase.failed("recovery (phase stopped)", e)
        return False
    return True


def run_agent_kills(fleet: Fleet, rng: random.Random) -> Phase:
    phase = Phase()
    for i in range(fleet.opts.kills):
        victim = rng.choice(sorted(fleet.agents))
        try:
            sample = agent_kill(fleet, victim)
        except (BenchTimeout, RoleDied) as e:
            phase.failed(f"agent kill {i + 1} ({victim})", e)
            if not recover(fleet, phase):
                break
            continue
        phase.samples.append(sample)
        others = f" (also left: {', '.join(sample.others_left)})" if sample.others_left else ""
        progress(
            f"agent kill {i + 1}/{fleet.opts.kills} {victim}: gone {sample.member_gone:.3f}s"
            f" plan {sample.plan_committed:.3f}s replicated {sample.replicated:.3f}s"
            f" moved {sample.moved_fraction:.4f}{others}"
        )
        fleet.start_agent()
        try:
            fleet.wait_filled("the replacement agent to settle")
        except (BenchTimeout, RoleDied) as e:
            phase.failed(f"replacement after kill {i + 1}", e)
            if not recover(fleet, phase):
                break
    return phase


def one_move(fleet: Fleet, rng: random.Random) -> MoveRequest:
    """A `shardkeeper move` of one secondary replica: the cheapest change whose only
    carrier is a plan write, so the new leader's first reconcile must write plan/meta.
    (A member joining and leaving would make it re-home ~600 replicas twice.)"""
    routing = fleet.plan().routing
    shard = rng.randrange(len(routing))
    row = routing[shard]
    dest = rng.choice(sorted(fleet.agents - set(row)))
    return MoveRequest(shard=shard, source=row[-1], dest=dest)


def leader_kill(fleet: Fleet, rng: random.Random) -> LeaderKill:
    watch = fleet.watch
    leader = fleet.contenders()[0]
    _, old_epoch = clusterstate.read_leader(fleet.client, fleet.paths)
    move = one_move(fleet, rng)
    mark = fleet.meta_mark()
    bumped = watch.arm(lambda: any(e.version > old_epoch for e in watch.epochs))
    wrote = watch.arm(lambda: watch.first_meta(mark, lambda m: m.epoch > old_epoch))
    t0 = fleet.kill(leader)
    # Filed after the kill: only the new leader can carry it out.
    admin.request_move(fleet.client, fleet.paths, move)
    timeout = fleet.opts.event_timeout
    watch.wait_for(bumped, timeout, "a new epoch", fleet.check)
    watch.wait_for(wrote, timeout, "the new leader's first plan", fleet.check)
    with watch.cond:
        epoch = next(e for e in watch.epochs if e.version > old_epoch)
        first = watch.first_meta(mark, lambda m: m.epoch > old_epoch)
    assert first is not None
    fleet.start_candidate(leader)
    poll_until(
        lambda: fleet.check() or len(fleet.contenders()) == len(CANDIDATES),
        fleet.opts.event_timeout,
        f"{leader} to rejoin as a standby",
        error=BenchTimeout,
    )
    fleet.wait_settled("the cluster to settle after the move")
    return LeaderKill(
        leader=leader,
        new_leader=first.meta.leader,
        epoch_bump=epoch.committed - t0,
        first_write_created=first.meta.created - t0,
        first_write_committed=first.committed - t0,
        first_write_observed=first.observed - t0,
    )


def run_leader_kills(fleet: Fleet, rng: random.Random) -> Phase:
    phase = Phase()
    for i in range(fleet.opts.leader_kills):
        try:
            sample = leader_kill(fleet, rng)
        except (BenchTimeout, RoleDied) as e:
            phase.failed(f"leader kill {i + 1}", e)
            if not recover(fleet, phase):
                break
            continue
        phase.samples.append(sample)
        progress(
            f"leader kill {i + 1}/{fleet.opts.leader_kills} {sample.leader} -> "
            f"{sample.new_leader}: epoch {sample.epoch_bump:.3f}s"
            f" first write {sample.first_write_committed:.3f}s"
        )
    return phase


# -- baseline: kazoo's SetPartitioner -----------------------------------------------------


@dataclass(frozen=True)
class Report:
    """A SetPartitioner member's line: its state and, when acquired, its items."""

    at: float
    state: str
    items: frozenset[int]


@dataclass(frozen=True)
class PartitionerKill:
    victim: str
    noticed: float  # first survivor released its set
    reacquired: float  # last survivor acquired its new set
    moved_fraction: float


@dataclass
class PartitionerFleet:
    """N processes running `partitioner-member`, reporting on stdout."""

    ws: Workspace
    opts: Options
    members: set[str] = field(default_factory=set)
    reports: dict[str, list[Report]] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)
    _next: int = 0

    def start_member(self) -> str:
        name = f"p{self._next:03d}"
        self._next += 1
        argv = [
            sys.executable,
            "-m",
            "bench.failover",
            "partitioner-member",
            "--zk",
            self.ws.hosts,
            "--path",
            PARTITIONER_PATH,
            "--id",
            name,
            "--items",
            str(self.opts.shards),
            "--session-timeout",
            str(self.opts.session_timeout),
            "--time-boundary",
            str(self.opts.time_boundary),
        ]
        proc = self.ws.procs.start(name, argv, capture_stdout=True)
        assert proc.stdout is not None
        with self.cond:
            self.reports[name] = []
            self.members.add(name)
        read_stream_lines(proc.stdout, partial(self._on_line, name))
        return name

    def _on_line(self, name: str, line: bytes) -> None:
        obj = json.loads(line)
        report = Report(obj["at"], obj["state"], frozenset(obj.get("items", ())))
        with self.cond:
            self.reports[name].append(report)
            self.cond.notify_all()

    def kill(self, name: str) -> float:
        with self.cond:
            self.members.discard(name)
        return self.ws.procs.kill(name)

    def owners(self, since: float) -> dict[int, str] | None:
        """item -> member once every member has acquired after ``since`` and the sets
        partition all items; None before that. Call under ``cond``."""
        owners: dict[int, str] = {}
        for name in self.members:
            last = self.reports[name][-1] if self.reports[name] else None
            if last is None or last.state != "acquired" or last.at < since:
                return None
            for item in last.items:
                if item in owners:
                    return None
                owners[item] = name
        return owners if len(owners) == self.opts.shards else None

    def wait_partitioned(self, since: float, timeout: float, what: str) -> dict[int, str]:
        with self.cond:
            owners = self.cond.wait_for(lambda: self.owners(since), timeout)
        if owners is None:
            raise BenchTimeout(f"timed out after {timeout:g}s waiting for {what}")
        return owners

    def last_acquired(self, since: float) -> float:
        with self.cond:
            return max(
                r.at
                for n in self.members
                for r in self.reports[n]
                if r.state == "acquired" and r.at >= since
            )

    def first_released(self, since: float) -> float | None:
        with self.cond:
            times = [
                r.at
                for n in self.members
                for r in self.reports[n]
                if r.state == "release" and r.at >= since
            ]
        return min(times) if times else None


def partitioner_kill(fleet: PartitionerFleet, victim: str) -> PartitionerKill:
    with fleet.cond:
        before = fleet.owners(0.0)
    assert before is not None
    t0 = fleet.kill(victim)
    after = fleet.wait_partitioned(
        t0, fleet.opts.settle_timeout, f"survivors to reacquire after killing {victim}"
    )
    moved = sum(1 for item, owner in after.items() if before[item] != owner)
    released = fleet.first_released(t0)
    return PartitionerKill(
        victim=victim,
        noticed=(released - t0) if released is not None else float("nan"),
        reacquired=fleet.last_acquired(t0) - t0,
        moved_fraction=moved / fleet.opts.shards,
    )


def run_partitioner(ws: Workspace, opts: Options, rng: random.Random) -> Phase:
    fleet = PartitionerFleet(ws, opts)
    started = time.time()
    for _ in range(opts.agents):
        fleet.start_member()
    phase = Phase()
    try:
        fleet.wait_partitioned(started, opts.settle_timeout, f"{opts.agents} members to acquire")
        for i in range(opts.partitioner_kills):
            victim = rng.choice(sorted(fleet.members))
            sample = partitioner_kill(fleet, victim)
            phase.samples.append(sample)
            progress(
                f"setpartitioner kill {i + 1}/{opts.partitioner_kills} {victim}:"
                f" noticed {sample.noticed:.3f}s reacquired {sample.reacquired:.3f}s"
                f" moved {sample.moved_fraction:.4f}"
            )
            joined = time.time()
            fleet.start_member()
            fleet.wait_partitioned(joined, opts.settle_timeout, "the replacement member")
    except BenchTimeout as e:
        phase.failed("setpartitioner (phase stopped)", e)
    return phase


# -- the member process of the baseline ---------------------------------------------------


def emit(state: str, items: list[int] | None = None) -> None:
    line: dict[str, Any] = {"at": time.time(), "state": state}
    if items is not None:
        line["items"] = items
    print(json.dumps(line), flush=True)


def partitioner_loop(
    client: KazooClient, path: str, member: str, items: int, time_boundary: float
) -> None:
    """The loop of kazoo's documented SetPartitioner usage, reporting each transition."""
    changed = threading.Event()
    partitioner = client.SetPartitioner(
        path,
        set=list(range(items)),
        identifier=member,
        time_boundary=time_boundary,
        state_change_event=changed,
    )
    reported = -1
    while not partitioner.failed:
        # Clear before looking: a transition after this point sets the event again.
        changed.clear()
        if partitioner.release:
            emit("release")
            partitioner.release_set()
            continue
        if partitioner.acquired and partitioner.state_id != reported:
            reported = partitioner.state_id
            emit("acquired", sorted(partitioner))
        changed.wait(1.0)
    emit("failed")


# -- report --------------------------------------------------------------------------------


def stat_keys(prefix: str, values: list[float]) -> dict[str, float | None]:
    return {
        f"{prefix}_p50_s": rounded(percentile(values, 50)),
        f"{prefix}_p99_s": rounded(percentile(values, 99)),
    }


def summarize(opts: Options, agents: Phase, leaders: Phase, baseline: Phase) -> dict[str, Any]:
    T = opts.session_timeout
    kills: list[AgentKill] = agents.samples
    takeovers: list[LeaderKill] = leaders.samples
    partitioner: list[PartitionerKill] = baseline.samples
    plan = [s.plan_committed for s in kills]
    first_write = [s.first_write_committed for s in takeovers]
    # A sample during which another agent's session expired too moved more than it should.
    clean = [s for s in kills if not s.others_left]
    agent_kill = {
        "samples": len(kills),
        **stat_keys("plan", plan),
        **stat_keys("replicated", [s.replicated for s in kills]),
        **stat_keys("member_gone", [s.member_gone for s in kills]),
        **stat_keys("plan_created", [s.plan_created for s in kills]),
        **stat_keys("plan_observed", [s.plan_observed for s in kills]),
        # The leader's share: from the member znode gone to the plan written.
        **stat_keys("plan_after_member_gone", [s.plan_committed - s.member_gone for s in kills]),
        "failed": len(agents.failures),
        "samples_with_other_departures": len(kills) - len(clean),
        "generation_gaps": sum(s.gap for s in kills),
        "goal_plan_p50_s": round(T + 0.1, 3),
        "goal_plan_p99_s": round(T + 0.3, 3),
        "goal_min_samples": GOAL_KILLS,
    }
    agent_kill["goal_met"] = (
        len(plan) >= GOAL_KILLS
        and percentile(plan, 50) <= T + 0.1
        and percentile(plan, 99) <= T + 0.3
    )
    leader_kill = {
        "samples": len(takeovers),
        **stat_keys("first_write", first_write),
        **stat_keys("epoch_bump", [s.epoch_bump for s in takeovers]),
        **stat_keys("first_write_created", [s.first_write_created for s in takeovers]),
        **stat_keys("first_write_observed", [s.first_write_observed for s in takeovers]),
        "failed": len(leaders.failures),
        "goal_s": round(T + 0.5, 3),
    }
    leader_kill["goal_met"] = bool(first_write) and max(first_write) <= T + 0.5
    setpartitioner = {
        "samples": len(partitioner),
        **stat_keys("reacquired", [s.reacquired for s in partitioner]),
        **stat_keys("noticed", [s.noticed for s in partitioner]),
        "moved_fraction": rounded(mean([s.moved_fraction for s in partitioner])),
        "failed": len(baseline.failures),
        "time_boundary_s": opts.time_boundary,
    }
    return {
        "session_timeout_s": T,
        "zk_tick_ms": opts.tick_ms,
        "agents": opts.agents,
        "shards": opts.shards,
        "replicas": opts.replicas,
        "throttle": opts.throttle,
        "agent_kill": agent_kill,
        "leader_kill": leader_kill,
        "setpartitioner": setpartitioner,
        "shardkeeper_moved_fraction": rounded(mean([s.moved_fraction for s in clean])),
        "shardkeeper_moved_fraction_all_samples": rounded(mean([s.moved_fraction for s in kills])),
        "shardkeeper_min_moved_fraction": rounded(mean([s.min_moved_fraction for s in clean])),
        "failures": agents.failures + leaders.failures + baseline.failures,
        "run_seconds": round(time.monotonic() - STARTED),
        "machine_at_end": machine(),
    }


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def render(result: dict[str, Any]) -> str:
    a, lk, sp = result["agent_kill"], result["leader_kill"], result["setpartitioner"]
    head = ("from SIGKILL to", "n", "p50 s", "p99 s")

    def row(label: str, section: dict[str, Any], key: str) -> tuple[str, str, str, str]:
        return (
            label,
            str(section["samples"]),
            seconds(section[f"{key}_p50_s"]),
            seconds(section[f"{key}_p99_s"]),
        )

    rows = [
        head,
        row("agent: member znode gone", a, "member_gone"),
        row("agent: new plan, leader's created stamp", a, "plan_created"),
        row("agent: new plan written (znode mtime)", a, "plan"),
        row("agent: new plan seen by a watcher", a, "plan_observed"),
        row("agent: every shard R replicas again", a, "replicated"),
        row("leader: epoch bumped (election won)", lk, "epoch_bump"),
        row("leader: first fenced plan write", lk, "first_write"),
        row("setpartitioner: first survivor releases", sp, "noticed"),
        row("setpartitioner: all survivors reacquired", sp, "reacquired"),
    ]
    T, r = result["session_timeout_s"], result
    verdict = {True: "met", False: "NOT met"}
    return "\n".join(
        [
            f"failover: {r['agents']} agents, {r['shards']} shards, R={r['replicas']},"
            f" session timeout T={T:g}s, ZooKeeper tick {r['zk_tick_ms']} ms",
            table(rows),
            f"moved on a kill: shardkeeper {r['shardkeeper_moved_fraction']} of replicas"
            f" (the killed agent held {r['shardkeeper_min_moved_fraction']});"
            f" SetPartitioner {sp['moved_fraction']} of items",
            f"goal agent kill: plan p50 <= {a['goal_plan_p50_s']}s"
            f" and p99 <= {a['goal_plan_p99_s']}s over >= {a['goal_min_samples']} kills:"
            f" {verdict[a['goal_met']]}",
            f"kills with another agent's session expiring too: "
            f"{a['samples_with_other_departures']}; failed samples: "
            f"{a['failed'] + lk['failed'] + sp['failed']}",
            *(f"  {f}" for f in r["failures"]),
            f"goal leader kill: first write <= {lk['goal_s']}s in every sample:"
            f" {verdict[lk['goal_met']]}",
            f"run took {r['run_seconds']}s; machine: {json.dumps(r['machine_at_end'])}",
        ]
    )


# -- command line ------------------------------------------------------------------------


def run(opts: Options, keep: bool) -> dict[str, Any]:
    rng = random.Random(opts.seed)
    with workspace("failover", tick_ms=opts.tick_ms, keep=keep) as ws:
        progress(f"ZooKeeper at {ws.hosts}; starting {opts.agents} agents and 2 candidates")
        agents, leaders = Phase(), Phase()
        fleet = Fleet(ws, opts)
        try:
            start_fleet(fleet)
            agents = run_agent_kills(fleet, rng)
            leaders = run_leader_kills(fleet, rng)
        except (BenchTimeout, RoleDied) as e:
            agents.failed("starting the shardkeeper cluster", e)
        finally:
            fleet.close()
        for name in list(ws.procs.running):
            ws.procs.kill(name)
        progress(f"baseline: {opts.agents} SetPartitioner members over {opts.shards} items")
        baseline = run_partitioner(ws, opts, rng)
    return summarize(opts, agents, leaders, baseline)


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--agents", type=click.IntRange(min=2), default=20, show_default=True)
@click.option("--shards", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option("--replicas", type=click.IntRange(min=1), default=3, show_default=True)
@click.option(
    "--session-timeout",
    type=click.FloatRange(min=0.5),
    default=1.0,
    show_default=True,
    help="Session timeout T of every role, seconds.",
)
@click.option(
    "--kills",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Agent SIGKILL samples.",
)
@click.option("--leader-kills", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--partitioner-kills", type=click.IntRange(min=0), default=5, show_default=True)
@click.option(
    "--time-boundary",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="SetPartitioner time_boundary, seconds.",
)
@click.option(
    "--throttle",
    type=click.Choice(["default", "lifted"]),
    default="default",
    show_default=True,
    help="Copy throttle during kills: the product's default, or"
    " lifted (max_moves_per_agent=1000, max_moves_total=100000).",
)
@click.option(
    "--tick-ms",
    type=click.IntRange(min=10),
    default=250,
    show_default=True,
    help="ZooKeeper tickTime; sessions expire on tick boundaries.",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--keep", is_flag=True, help="Keep the temp dir (logs) for inspection.")
@click.pass_context
def main(ctx: click.Context, as_json: bool, keep: bool, **kwargs: Any) -> None:
    """Time agent and leader failover, and kazoo's SetPartitioner as a baseline."""
    if ctx.invoked_subcommand is not None:
        return
    # kazoo logs every reconnection at WARNING; the benchmark reports what matters.
    logging.getLogger("kazoo").setLevel(logging.CRITICAL)
    opts = Options(**kwargs)
    if opts.session_timeout * 1000 < 2 * opts.tick_ms:
        raise click.BadParameter(
            "must be >= 2 x tick (ZooKeeper's minimum session)", param_hint="--session-timeout"
        )
    result = run(opts, keep)
    click.echo(json.dumps(result, indent=2) if as_json else render(result))


@main.command("partitioner-member", hidden=True)
@click.option("--zk", "hosts", required=True)
@click.option("--path", required=True)
@click.option("--id", "member", required=True)
@click.option("--items", type=int, required=True)
@click.option("--session-timeout", type=float, required=True)
@click.option("--time-boundary", type=float, required=True)
def partitioner_member(
    hosts: str, path: str, member: str, items: int, session_timeout: float, time_boundary: float
) -> None:
    """One SetPartitioner member (the baseline); prints a JSON line per transition."""
    client = connect(ZkTarget.parse(hosts), session_timeout=session_timeout)
    try:
        partitioner_loop(client, path, member, items, time_boundary)
    finally:
        close(client)


if __name__ == "__main__":
    main()
