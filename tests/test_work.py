"""The agent's shard work pool: one action at a time per shard, promotions first, retries
that wait on a timer instead of a worker, cancellation by newer work."""

from __future__ import annotations

import threading

import pytest

from agents import work
from agents.handler import ShardHandler
from agents.shardsm import (
    BecomeReplica,
    CopyDone,
    DropDone,
    Promote,
    Promoted,
    Repair,
    StartBootstrap,
    StartDrop,
    Synced,
    SyncFailed,
)
from agents.work import Job, ShardWork
from shardkeeper.poll import poll_until


class Scripted(ShardHandler):
    """Copies block until released; repairs fail while ``primary_down``; the rest succeed."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.primary_down = True
        self.repairs = 0
        self.lock = threading.Lock()

    def on_bootstrap(self, shard: int, source_address: str, stop: threading.Event) -> int:
        while not self.release.wait(0.01):
            if stop.is_set():
                raise RuntimeError("cancelled")
        return 1

    def on_become_replica(self, shard, term, primary_address) -> None:
        pass

    def on_become_primary(self, shard, term) -> int:
        return 7

    def on_new_primary(self, shard, primary_address, term) -> None:
        with self.lock:
            self.repairs += 1
        if self.primary_down:
            raise ConnectionError(f"{primary_address} is not the primary yet")

    def on_drop(self, shard) -> None:
        pass


class Pool:
    def __init__(self, handler: ShardHandler, **kw):
        self.events: list = []
        self.cond = threading.Condition()
        self.work = ShardWork(lambda: handler, self.done, **kw)

    def done(self, job: Job, event) -> None:
        with self.cond:
            self.events.append(event)

    def has(self, event) -> bool:
        with self.cond:
            return event in self.events


@pytest.fixture
def handler():
    h = Scripted()
    yield h
    h.release.set()


def test_a_promotion_runs_while_every_other_worker_is_busy_copying(handler) -> None:
    pool = Pool(handler, workers=3, reserved=1)
    for shard in range(4):
        pool.work.submit(StartBootstrap(shard, "src:1", work=shard + 1))
    pool.work.submit(Promote(9, 5, work=10))
    poll_until(lambda: pool.has(Promoted(9, 7, 10)), 10, "the promotion, copies still running")
    assert not any(isinstance(e, CopyDone) for e in pool.events)
    handler.release.set()
    poll_until(lambda: sum(isinstance(e, CopyDone) for e in pool.events) == 4, 10, "copies")
    pool.work.shutdown()


def test_retrying_repairs_hold_no_worker_and_a_newer_action_ends_their_wait(handler) -> None:
    pool = Pool(handler, workers=2, reserved=0)
    for shard in range(6):
        pool.work.submit(Repair(shard, "new:1", 3, work=shard + 1))
    poll_until(lambda: handler.repairs >= 12, 10, "every repair tried, and tried again")
    pool.work.submit(BecomeReplica(20, 3, "new:1", work=30))
    poll_until(lambda: pool.has(Synced(20, 0, 30)), 5, "other work runs meanwhile")
    pool.work.submit(StartDrop(0, work=40))
    poll_until(lambda: pool.has(DropDone(0, 40)), 5, "the drop ends the repair's wait")
    handler.primary_down = False
    poll_until(lambda: all(pool.has(Synced(s, 0, s + 1)) for s in range(1, 6)), 10,
               "the repairs succeed once the primary is promoted")
    pool.work.shutdown()


def test_a_repair_that_keeps_failing_is_reported_after_the_retry_window(
        handler, monkeypatch) -> None:
    monkeypatch.setattr(work, "RETRY_SECONDS", 0.5)
    pool = Pool(handler, workers=1, reserved=0)
    pool.work.submit(Repair(3, "new:1", 3, work=8))
    poll_until(lambda: any(isinstance(e, SyncFailed) for e in pool.events), 10,
               "the repair given up after the window")
    assert handler.repairs >= 2
    pool.work.shutdown()
