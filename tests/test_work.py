"""agents.work.ShardWork's logging (issue 13): a job that newer work cancelled is logged at
debug, in one line, since its result is discarded anyway; a job that fails on its own is
a warning, still without a traceback."""

from __future__ import annotations

import logging
import threading

import pytest

from agents import work
from agents.shardsm import Repair, ShardEvent
from agents.work import Job, ShardWork
from shardkeeper.poll import poll_until


class PeerGone(Exception):
    pass


class Handler:
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
    handler = Handler()
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
