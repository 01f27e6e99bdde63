"""Group commit: the writes to one shard that queue behind the one being written go out
together, in one local transaction and one forward to each replica.

A primary writes each shard one batch at a time: it numbers the rows above the shard's
last LSN, applies them, and forwards them under ``prev_lsn`` (``replication``), so that
every replica sees the rows in LSN order. A write that arrives while another is being
forwarded has to wait for it; with a ``GroupCommit`` it waits in a queue, and whichever
waiting writer goes next takes everything queued (up to ``max_rows`` rows and about
``max_bytes`` of keys and values) and writes it as one batch: one SQLite transaction
and one forward per replica for all of them, instead of one each.

Nothing about an acknowledgement changes: each writer gets its own LSNs, consecutive and
in queue order, only once the whole batch was applied locally and by every in-sync
replica; if the batch fails, every writer in it gets the same error, as each would have
alone. A single write is never split, however large (it goes alone).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence

Change = tuple[bytes, bytes | None]  # a key and its new value (None: a delete)
ROW_OVERHEAD = 64  # bytes a row costs in a forward beyond its key and value, about


class _Pending:
    __slots__ = ("changes", "size", "lsns", "error", "done")

    def __init__(self, changes: Sequence[Change]):
        self.changes = changes
        self.size = sum(len(k) + len(v or b"") + ROW_OVERHEAD for k, v in changes)
        self.lsns: list[int] = []
        self.error: BaseException | None = None
        self.done = False


class GroupCommit:
    """One shard's queue of writes; ``write`` is called by every writer, from its thread."""

    def __init__(self, max_rows: int, max_bytes: int):
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._writing = False
        self.batches = 0  # batches written, and the writes in them (for tests and metrics)
        self.writes = 0

    def queued(self) -> int:
        """Writes waiting for their batch."""
        with self._cond:
            return len(self._queue)

    def write(self, changes: Sequence[Change],
              write_batch: Callable[[list[Change]], list[int]]) -> list[int]:
        """Write ``changes`` in a batch with whatever else is queued; returns their LSNs.

        ``write_batch(changes)`` is called for one batch at a time, by one of the waiting
        writers, and returns the LSN of each change in order (or raises, for the whole
        batch). The exception it raises is raised to each writer in the batch."""
        mine = _Pending(changes)
        with self._cond:
            self._queue.append(mine)
        while not mine.done:
            with self._cond:
                while self._writing and not mine.done:
                    self._cond.wait()
                if mine.done:
                    break
                self._writing = True
                batch = self._take()
            self._write(batch, write_batch)
        if mine.error is not None:
            raise mine.error
        return mine.lsns

    def _take(self) -> list[_Pending]:
        """The head of the queue, and what follows it within the bounds."""
        batch = [self._queue.popleft()]
        rows, size = len(batch[0].changes), batch[0].size
        while self._queue:
            nxt = self._queue[0]
            if rows + len(nxt.changes) > self.max_rows or size + nxt.size > self.max_bytes:
                break
            batch.append(self._queue.popleft())
            rows += len(nxt.changes)
            size += nxt.size
        return batch

    def _write(self, batch: list[_Pending],
               write_batch: Callable[[list[Change]], list[int]]) -> None:
        try:
            changes = [change for pending in batch for change in pending.changes]
            lsns = write_batch(changes)
            if len(lsns) != len(changes):
                raise AssertionError(f"{len(lsns)} LSNs for {len(changes)} changes")
            start = 0
            for pending in batch:
                pending.lsns = lsns[start : start + len(pending.changes)]
                start += len(pending.changes)
        except BaseException as exc:  # every writer of the batch learns it failed
            for pending in batch:
                pending.error = exc
        finally:
            with self._cond:
                for pending in batch:
                    pending.done = True
                self.batches += 1
                self.writes += len(batch)
                self._writing = False
                self._cond.notify_all()
