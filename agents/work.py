"""Running shard actions: one at a time per shard, on a small fixed set of worker threads.

The runtime hands every shard action the state machine returns to :meth:`ShardWork.submit`.
A new action for a shard cancels the running work and drops the queued work it makes
moot (``shardsm.cancels`` / ``shardsm.replaces`` decide which); the rest queue behind
it. A worker carries the action out through the handler (``handler.perform``) and hands
the event back, with the action's work number, through ``done``: the state machine
ignores an event whose work is no longer the shard's latest.

Order: what the data plane waits for goes first. A promotion or a demotion decides who
takes a shard's writes (a primary hand-off waits for it), so it runs before repairs,
catch-ups and drops, which run before copies (long, and the state machine already
bounds how many run at once); ``RESERVED`` workers are kept for promotions and
demotions alone, so that a burst of copies and repairs never makes one wait.

Retries: a copy, a catch-up, a promotion or a drop that is itself a retry (``attempt`` > 0)
waits a growing pause first; a repair, demotion or catch-up that fails is tried again
for up to ``RETRY_SECONDS`` (its peer may be mid-transition), then reported failed. A
pause is a timer, not a sleeping worker: hundreds of repairs waiting for their new
primary to be promoted hold no thread, and a newer action for the shard ends the wait
at once.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from agents.handler import ShardHandler, perform
from agents.shardsm import (
    SYNC_ACTIONS,
    CatchUp,
    Demote,
    Promote,
    PromoteFailed,
    ShardAction,
    ShardEvent,
    StartBootstrap,
    StartDrop,
    SyncFailed,
    cancels,
    replaces,
)

log = logging.getLogger(__name__)

RETRY_SECONDS = 30.0  # a repair or demotion keeps trying this long, then reports failure
MAX_BACKOFF = 3.0
RETRY_FIRST, RETRY_MAX = 0.1, 2.0  # pauses between tries of a failing repair: doubling
WORKERS = 8
RESERVED = 2  # of them, kept for promotions and demotions
URGENT, NORMAL, BULK = 0, 1, 2


def backoff(attempt: int) -> float:
    """The pause before retry ``attempt`` (0: none)."""
    return min(0.25 * 2**attempt, MAX_BACKOFF) if attempt else 0.0


def priority(action: ShardAction) -> int:
    if isinstance(action, Promote | Demote):
        return URGENT
    if isinstance(action, StartBootstrap):
        return BULK
    return NORMAL


@dataclass
class Job:
    action: ShardAction
    stop: threading.Event = field(default_factory=threading.Event)
    tries: int = 0  # runs so far
    first_try: float = 0.0  # monotonic, when it first ran


class ShardWork:
    def __init__(
        self,
        handler: Callable[[], ShardHandler],
        done: Callable[[Job, ShardEvent | None], None],
        retry_hint: Callable[[], None] = lambda: None,
        workers: int = WORKERS,
        reserved: int = RESERVED,
    ):
        self._handler = handler
        self._done = done
        self._retry_hint = retry_hint  # a peer may have moved: let the runtime re-read
        self._cond = threading.Condition()
        self._queues: dict[int, deque[Job]] = {}  # per shard, not started yet
        self._current: dict[int, Job] = {}  # per shard: running, ready or waiting to retry
        self._ready: list[tuple[int, int, Job]] = []  # heap of (priority, seq, job)
        self._later: list[tuple[float, int, Job]] = []  # heap of (due, seq, job)
        self._seq = itertools.count()
        self._busy = 0  # workers running a job that is not urgent
        self._closed = False
        self._capacity = max(1, workers - reserved)
        self._threads = [threading.Thread(target=self._worker, name=f"shard-work-{i}",
                                          daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, action: ShardAction) -> None:
        shard = action.shard
        with self._cond:
            jobs = self._queues.setdefault(shard, deque())
            current = self._current.get(shard)
            if current is not None and cancels(action, current.action):
                current.stop.set()
                self._wake_waiting(current)
            for job in [j for j in jobs if replaces(action, j.action)]:
                jobs.remove(job)
            jobs.append(Job(action))
            self._start_next(shard)

    def busy(self) -> int:
        with self._cond:
            return len(self._current) + sum(len(q) for q in self._queues.values())

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            for job in self._current.values():
                job.stop.set()
            self._queues.clear()
            self._cond.notify_all()

    # -- scheduling (under the condition's lock) ----------------------------------------
    def _start_next(self, shard: int) -> None:
        """Make the shard's next queued job ready, if none is current."""
        jobs = self._queues.get(shard)
        if shard in self._current or not jobs:
            return
        job = jobs.popleft()
        self._current[shard] = job
        action = job.action
        pause = backoff(action.attempt) if isinstance(
            action, StartBootstrap | CatchUp | Promote | StartDrop) else 0.0
        if pause:
            self._wait(job, pause)
        else:
            self._push_ready(job)

    def _push_ready(self, job: Job) -> None:
        heapq.heappush(self._ready, (priority(job.action), next(self._seq), job))
        self._cond.notify()

    def _wait(self, job: Job, seconds: float) -> None:
        heapq.heappush(self._later, (time.monotonic() + seconds, next(self._seq), job))
        self._cond.notify()

    def _wake_waiting(self, job: Job) -> None:
        """A cancelled job waiting for its retry: make it due now (it then ends unrun)."""
        for i, (_, seq, waiting) in enumerate(self._later):
            if waiting is job:
                self._later[i] = (0.0, seq, job)
                heapq.heapify(self._later)
                self._cond.notify()
                return

    def _take(self) -> Job | None:
        """The next job a worker may run now, or None (the caller waits)."""
        now = time.monotonic()
        while self._later and self._later[0][0] <= now:
            _, _, job = heapq.heappop(self._later)
            self._push_ready(job)
        if not self._ready:
            return None
        urgent = self._ready[0][0] == URGENT
        if not urgent and self._busy >= self._capacity:
            return None  # the reserved workers wait for promotions and demotions
        _, _, job = heapq.heappop(self._ready)
        if not urgent:
            self._busy += 1
        return job

    def _timeout(self) -> float | None:
        if not self._later:
            return None
        return max(0.0, self._later[0][0] - time.monotonic())

    # -- workers -----------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            with self._cond:
                job = self._take()
                while job is None and not self._closed:
                    self._cond.wait(self._timeout())
                    job = self._take()
                if self._closed:
                    return
            urgent = priority(job.action) == URGENT
            again = self._run(job)
            with self._cond:
                if not urgent:
                    self._busy -= 1
                    self._cond.notify()  # a job held back by the reserve may go now
                if again is not None and not job.stop.is_set() and not self._closed:
                    self._wait(job, again)
                    continue
                if self._current.get(job.action.shard) is job:
                    del self._current[job.action.shard]
                self._start_next(job.action.shard)

    def _run(self, job: Job) -> float | None:
        """Run ``job`` once; the pause before trying it again, or None once it is over
        (its event then handed to ``done``)."""
        action = job.action
        if job.stop.is_set():
            self._done(job, None)  # overtaken while it waited: its outcome no longer matters
            return None
        if not job.tries:
            job.first_try = time.monotonic()
        job.tries += 1
        try:
            event = perform(self._handler(), action, job.stop)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            retrying = not isinstance(action, StartBootstrap | StartDrop)
            if job.stop.is_set():
                # Overtaken by newer work: its outcome no longer matters.
                log.debug("shard %d: %s cancelled (%s)", action.shard, type(action).__name__,
                          reason)
            elif retrying and time.monotonic() - job.first_try < RETRY_SECONDS:
                # Its peer may be mid-transition (a primary being promoted, a moved address).
                log.info("shard %d: %s failed (%s); retrying", action.shard,
                         type(action).__name__, reason)
                self._retry_hint()
                return min(RETRY_FIRST * 2 ** (job.tries - 1), RETRY_MAX)
            else:
                log.warning("shard %d: %s failed: %s", action.shard, type(action).__name__,
                            reason)
            event = None
            if isinstance(action, SYNC_ACTIONS):
                event = SyncFailed(action.shard, reason, action.work)
            elif isinstance(action, Promote):
                event = PromoteFailed(action.shard, reason, action.work)
        self._done(job, event)
        return None
