"""The data plane's workers: a fixed pool of threads taking jobs from lanes, each lane with a
cap on the workers it may hold at once (``agents.dataplane.conns`` says what each lane is
for and why the caps leave workers for peers)."""

from __future__ import annotations

import enum
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

_WORKER_SCRATCH = 64 << 10
_local = threading.local()


def worker_scratch() -> bytearray:
    """A receive buffer per worker thread (a fresh 256 KiB bytes per recv costs an mmap)."""
    scratch = getattr(_local, "scratch", None)
    if scratch is None:
        scratch = _local.scratch = bytearray(_WORKER_SCRATCH)
    return scratch


class Lane(enum.IntEnum):
    """Where an admitted request waits for a worker; a lower value is served first."""

    PEER = 0  # another agent's forward or repair: what that agent's write is waiting on
    CLIENT = 1
    BULK = 2  # rows pages, snapshots: long, and an agent's copies retry


class Lanes:
    """Fixed worker threads; each takes the first job, in lane order, whose lane is under
    its cap."""

    def __init__(self, workers: int, caps: Mapping[Lane, int], run: Callable[[Any], None],
                 name: str):
        self._caps = dict(caps)
        self._queues: dict[Lane, deque[Any]] = {lane: deque() for lane in Lane}
        self._busy = dict.fromkeys(Lane, 0)
        self._cond = threading.Condition()
        self._stopped = False
        self._run = run
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-w{i}", daemon=True)
            for i in range(workers)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def submit(self, lane: Lane, job: Any) -> None:
        with self._cond:
            self._queues[lane].append(job)
            self._cond.notify()

    def busy(self) -> dict[Lane, int]:
        with self._cond:
            return dict(self._busy)

    def spare(self) -> bool:
        """Whether a worker is idle and no job waits."""
        with self._cond:
            waiting = any(self._queues.values())
            return not waiting and sum(self._busy.values()) < len(self._threads)

    def _take(self) -> tuple[Lane, Any] | None:
        for lane in Lane:
            if self._queues[lane] and self._busy[lane] < self._caps[lane]:
                return lane, self._queues[lane].popleft()
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (taken := self._take()) is None:
                    self._cond.wait()
                if self._stopped:
                    return
                lane, job = taken
                self._busy[lane] += 1
            try:
                self._run(job)
            finally:
                # No notify: this worker looks for the next job itself (one held back by
                # its lane's cap included), and waking an idle one only makes it contend.
                with self._cond:
                    self._busy[lane] -= 1
