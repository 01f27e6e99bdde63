"""Running shard actions: one at a time per shard, on a small fixed pool of workers.

The runtime hands every shard action the state machine returns to :meth:`ShardWork.submit`.
A new action for a shard cancels the running work and drops the queued work it makes
moot (``shardsm.cancels`` / ``shardsm.replaces`` decide which); the rest queue behind
it. A worker carries the action out through the handler (``handler.perform``) and hands
the event back, with the action's work number, through ``done``: the state machine
ignores an event whose work is no longer the shard's latest.

Retries: a copy, a catch-up, a promotion or a drop that is itself a retry (``attempt`` > 0)
waits a growing pause first; a repair, demotion or catch-up that fails is tried again
for up to ``RETRY_SECONDS`` (its peer may be mid-transition), then reported failed.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tenacity import retry, stop_after_delay, wait_exponential

from agents.handler import ShardHandler, perform
from agents.shardsm import (
    SYNC_ACTIONS,
    CatchUp,
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


@dataclass(frozen=True)
class Job:
    action: ShardAction
    stop: threading.Event


def backoff(attempt: int) -> float:
    """The pause before retry ``attempt`` (0: none)."""
    return min(0.25 * 2**attempt, MAX_BACKOFF) if attempt else 0.0


class ShardWork:
    def __init__(
        self,
        handler: Callable[[], ShardHandler],
        done: Callable[[Job, ShardEvent | None], None],
        retry_hint: Callable[[], None] = lambda: None,
        workers: int = 16,
    ):
        self._handler = handler
        self._done = done
        self._retry_hint = retry_hint  # a peer may have moved: let the runtime re-read
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard")
        self._lock = threading.Lock()
        self._queues: dict[int, deque[Job]] = {}
        self._running: dict[int, Job] = {}

    def submit(self, action: ShardAction) -> None:
        shard = action.shard
        with self._lock:
            jobs = self._queues.setdefault(shard, deque())
            running = self._running.get(shard)
            if running is not None and cancels(action, running.action):
                running.stop.set()
            for job in [j for j in jobs if replaces(action, j.action)]:
                jobs.remove(job)
            jobs.append(Job(action, threading.Event()))
        self._kick(shard)

    def busy(self) -> int:
        with self._lock:
            return len(self._running) + sum(len(q) for q in self._queues.values())

    def shutdown(self) -> None:
        with self._lock:
            for job in self._running.values():
                job.stop.set()
            self._queues.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _kick(self, shard: int) -> None:
        with self._lock:
            jobs = self._queues.get(shard)
            if shard in self._running or not jobs:
                return
            job = jobs.popleft()
            self._running[shard] = job
        self._pool.submit(self._work, job)

    def _work(self, job: Job) -> None:
        action = job.action
        event: ShardEvent | None = None
        try:
            retried = isinstance(action, StartBootstrap | CatchUp | Promote | StartDrop)
            if retried and action.attempt:
                job.stop.wait(backoff(action.attempt))
            if isinstance(action, StartBootstrap | StartDrop):
                event = perform(self._handler(), action, job.stop)
            else:
                event = self._retrying(job)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if job.stop.is_set():
                # Overtaken by newer work: its outcome no longer matters.
                log.debug("shard %d: %s cancelled (%s)", action.shard, type(action).__name__,
                          reason)
            else:
                log.warning("shard %d: %s failed: %s", action.shard, type(action).__name__,
                            reason)
            if isinstance(action, SYNC_ACTIONS):
                event = SyncFailed(action.shard, reason, action.work)
            elif isinstance(action, Promote):
                event = PromoteFailed(action.shard, reason, action.work)
        finally:
            with self._lock:
                if self._running.get(action.shard) is job:
                    del self._running[action.shard]
            self._done(job, event)
            self._kick(action.shard)

    def _retrying(self, job: Job) -> ShardEvent:
        """Repairs and promotions wait on peers that may be mid-transition: retry, bounded."""

        def log_retry(state: Any) -> None:
            log.info("shard %d: %s failed (%s); retrying", job.action.shard,
                     type(job.action).__name__, state.outcome.exception())
            self._retry_hint()

        policy = retry(
            stop=stop_after_delay(RETRY_SECONDS),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            retry=lambda state: state.outcome.failed and not job.stop.is_set(),
            before_sleep=log_retry,
            reraise=True,
        )
        return policy(lambda: perform(self._handler(), job.action, job.stop))()
