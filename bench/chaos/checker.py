"""The history checker: what the clients saw, against what a register per key allows.

Pure: a list of :class:`Op` (each client operation with its invoke and completion times
and outcome) and the keys' final values in, a :class:`Verdict` out.

Outcomes: ``ok`` (acknowledged), ``fail`` (refused with a 4xx: it changed nothing), and
``unknown`` (no answer, a 5xx, the client's deadline: it may have been applied, at any
time after it was invoked). Every written value is unique, so a value names its write.

A write ``w`` must follow a write ``e`` when ``w`` was invoked after ``e`` was
acknowledged (an unknown ``e`` may take effect at any time, so nothing must follow it).

* **Lost writes.** The final value of a key must be explained by a write ``e`` that
  wrote it (for "absent": a delete, or no write at all) and was not refused; every
  acknowledged write that must follow ``e`` and wrote something else is lost. For
  "absent" the most favourable delete is taken. A final value that no write explains
  is reported apart (``unexplained``) and counts as lost too.
* **Stale reads.** A read that returned ``x`` needs a write of ``x`` (not refused,
  invoked before the read completed); it is stale if, for every such write ``e``, an
  acknowledged write of something else that must follow ``e`` was acknowledged before
  the read began. A read no write explains is stale too.

These are the checks a per-key linearizable register must pass; they are not a full
linearizability search (Knossos, Porcupine), which is exponential in the worst case.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

OK, FAIL, UNKNOWN = "ok", "fail", "unknown"
PUT, DELETE, GET = "put", "delete", "get"
UNREADABLE = object()  # a final value that could not be read


@dataclass(frozen=True)
class Op:
    process: int
    kind: str  # put, delete, get
    key: str
    value: str | None  # put: the value written; get: the value read (None: absent)
    invoke: float
    complete: float
    outcome: str  # ok, fail, unknown
    error: str = ""

    @property
    def is_write(self) -> bool:
        return self.kind in (PUT, DELETE)

    @property
    def written(self) -> str | None:
        return self.value if self.kind == PUT else None

    @property
    def effective(self) -> float:
        """When its effect is known to be in place: acknowledged, or never (unknown)."""
        return self.complete if self.outcome == OK else math.inf


# The "no write at all" explanation of an absent key: in place from the start.
_INITIAL = Op(-1, DELETE, "", None, -math.inf, -math.inf, OK)


@dataclass(frozen=True)
class Anomaly:
    key: str
    what: str
    op: Op | None = None


@dataclass
class Verdict:
    ops: int = 0
    acked: int = 0  # acknowledged writes
    unknown: int = 0  # writes with no known outcome
    failed: int = 0  # refused writes
    reads: int = 0  # reads that returned a value or "absent"
    lost: list[Anomaly] = field(default_factory=list)
    unexplained: list[Anomaly] = field(default_factory=list)
    stale_reads: list[Anomaly] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    @property
    def lost_count(self) -> int:
        return len(self.lost) + len(self.unexplained)


def _candidates(writes: Sequence[Op], value: str | None, before: float) -> list[Op]:
    """Writes that could have produced ``value`` (not refused, invoked before ``before``)."""
    found = [w for w in writes if w.outcome != FAIL and w.invoke < before
             and w.written == value]
    if value is None:
        found.append(_INITIAL)
    return found


def _must_follow(writes: Sequence[Op], e: Op, value: str | None) -> list[Op]:
    """Acknowledged writes of something other than ``value`` that must follow ``e``."""
    return [w for w in writes if w.outcome == OK and w.written != value
            and w.invoke > e.effective]


def check(ops: Iterable[Op], final: Mapping[str, object]) -> Verdict:
    """Check a history; ``final`` maps each key to its value after the run (None: absent,
    ``UNREADABLE``: not known). Keys without writes in the history are not checked."""
    verdict = Verdict()
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        verdict.ops += 1
        by_key[op.key].append(op)
        if op.is_write:
            verdict.acked += op.outcome == OK
            verdict.unknown += op.outcome == UNKNOWN
            verdict.failed += op.outcome == FAIL
        elif op.outcome == OK:
            verdict.reads += 1
    for key, key_ops in sorted(by_key.items()):
        writes = [op for op in key_ops if op.is_write]
        _check_final(verdict, key, writes, final.get(key, UNREADABLE))
        for read in (op for op in key_ops if op.kind == GET and op.outcome == OK):
            _check_read(verdict, key, writes, read)
    return verdict


def _check_final(verdict: Verdict, key: str, writes: list[Op], value: object) -> None:
    if value is UNREADABLE:
        if any(w.outcome == OK for w in writes):
            verdict.unreadable.append(key)
        return
    assert value is None or isinstance(value, str)
    candidates = _candidates(writes, value, math.inf)
    if not candidates:
        verdict.unexplained.append(Anomaly(key, f"final value {value!r} was never written"))
        return
    # The most favourable explanation: the one fewest acknowledged writes must follow.
    best = min((_must_follow(writes, e, value) for e in candidates), key=len)
    for w in best:
        verdict.lost.append(Anomaly(
            key, f"{w.kind} {w.written!r} acknowledged at {w.complete:.3f} is gone:"
                 f" the final value is {value!r}", w))


def _check_read(verdict: Verdict, key: str, writes: list[Op], read: Op) -> None:
    candidates = _candidates(writes, read.value, read.complete)
    if not candidates:
        verdict.stale_reads.append(Anomaly(
            key, f"read {read.value!r} at {read.invoke:.3f}: no write explains it", read))
        return
    for e in candidates:
        newer = [w for w in _must_follow(writes, e, read.value) if w.complete < read.invoke]
        if not newer:
            return
    verdict.stale_reads.append(Anomaly(
        key, f"read {read.value!r} at {read.invoke:.3f}-{read.complete:.3f}: overwritten by"
             " a write acknowledged before the read began", read))


def write_gaps(ops: Iterable[Op], start: float, end: float, reads: bool = False
               ) -> list[tuple[float, float]]:
    """The intervals between consecutive acknowledged writes (``reads``: successful
    reads) and the run's ends."""
    acks = sorted(op.complete for op in ops if op.outcome == OK
                  and (op.kind == GET if reads else op.is_write))
    points = [start, *(t for t in acks if start <= t <= end), end]
    return [(a, b) for a, b in zip(points, points[1:], strict=False) if b > a]
