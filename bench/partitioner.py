"""The baseline of `bench.failover`: kazoo's SetPartitioner under the same kill.

N member processes (``python -m bench.partitioner member``), each with its own
KazooClient (the same session timeout) and a ``SetPartitioner`` over the same S items,
print a JSON line per transition. One member is SIGKILLed; timed until every survivor has
acquired a new set and the sets partition all items again. A replacement member joins
(and everyone reacquires) before the next kill.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import click
from kazoo.client import KazooClient

from bench.common import BenchTimeout, Phase, Workspace, progress, read_stream_lines
from shardkeeper.zk import ZkTarget, close, connect

PARTITIONER_PATH = "/bench-setpartitioner"


@dataclass(frozen=True)
class PartitionerOptions:
    members: int
    items: int
    session_timeout: float
    time_boundary: float
    kills: int
    settle_timeout: float


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
    """N processes running `python -m bench.partitioner`, reporting on stdout."""

    ws: Workspace
    opts: PartitionerOptions
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
            "bench.partitioner",
            "--zk",
            self.ws.hosts,
            "--path",
            PARTITIONER_PATH,
            "--id",
            name,
            "--items",
            str(self.opts.items),
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
        return owners if len(owners) == self.opts.items else None

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
        moved_fraction=moved / fleet.opts.items,
    )


def run_partitioner(ws: Workspace, opts: PartitionerOptions, rng: random.Random) -> Phase:
    fleet = PartitionerFleet(ws, opts)
    started = time.time()
    for _ in range(opts.members):
        fleet.start_member()
    phase = Phase()
    try:
        fleet.wait_partitioned(started, opts.settle_timeout, f"{opts.members} members to acquire")
        for i in range(opts.kills):
            victim = rng.choice(sorted(fleet.members))
            sample = partitioner_kill(fleet, victim)
            phase.samples.append(sample)
            progress(
                f"setpartitioner kill {i + 1}/{opts.kills} {victim}:"
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


@click.command()
@click.option("--zk", "hosts", required=True)
@click.option("--path", required=True)
@click.option("--id", "member", required=True)
@click.option("--items", type=int, required=True)
@click.option("--session-timeout", type=float, required=True)
@click.option("--time-boundary", type=float, required=True)
def main(
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
