"""The agent's shard work pool: one action at a time per shard, promotions first, retries
that wait on a timer instead of a worker, cancellation by newer work; and its logging
(issue 13): a job that newer work cancelled is one debug line, since its result is
discarded anyway; a job that fails on its own is a warning, still without a traceback."""

from __future__ import annotations

import logging
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
    ShardEvent,
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


class PeerGone(Exception):
    pass


class FailingRepairs:
    """Stands in for the agent's ShardHandler: a repair that waits until it is told to
    fail (as one whose peer went away would)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.fail = threading.Event()
        self.calls = 0

    def on_new_primary(self, shard: int, primary: str, term: int) -> None:
        self.calls += 1
        self.started.set()
        assert self.fail.wait(10), "the test never let the repair fail"
        raise PeerGone(f"{primary} went away")


@pytest.fixture
def pool():
    handler = FailingRepairs()
    done: list[tuple[Job, ShardEvent | None]] = []
    shard_work = ShardWork(lambda: handler, lambda job, event: done.append((job, event)),
                           workers=2)
    yield handler, shard_work, done
    handler.fail.set()
    shard_work.shutdown()


def work_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == work.__name__]


def test_a_cancelled_job_is_one_debug_line(pool, caplog, monkeypatch) -> None:
    handler, shard_work, done = pool
    monkeypatch.setattr(work, "RETRY_SECONDS", 0.0)  # the newer repair: one try
    caplog.set_level(logging.DEBUG, logger=work.__name__)
    shard_work.submit(Repair(1, "agent-2:1", 3, work=1))
    assert handler.started.wait(10)
    shard_work.submit(Repair(1, "agent-3:1", 4, work=2))  # newer: cancels the first
    handler.fail.set()
    poll_until(lambda: len(done) == 2, 10, "both repairs to end")
    records = work_records(caplog)
    cancelled = [r for r in records if "cancelled" in r.getMessage()]
    assert len(cancelled) == 1 and cancelled[0].levelno == logging.DEBUG, records
    assert "Repair" in cancelled[0].getMessage() and cancelled[0].exc_info is None


def test_a_job_that_fails_on_its_own_is_a_warning_without_traceback(
    pool, caplog, monkeypatch
) -> None:
    handler, shard_work, done = pool
    monkeypatch.setattr(work, "RETRY_SECONDS", 0.0)  # one try, then reported failed
    caplog.set_level(logging.DEBUG, logger=work.__name__)
    handler.fail.set()
    shard_work.submit(Repair(1, "agent-2:1", 3, work=1))
    poll_until(lambda: len(done) == 1, 10, "the repair to fail")
    failed = [r for r in work_records(caplog) if r.levelno >= logging.WARNING]
    assert len(failed) == 1 and "PeerGone" in failed[0].getMessage(), failed
    assert failed[0].exc_info is None
    assert not any("cancelled" in r.getMessage() for r in work_records(caplog))
