"""Waiting for a condition with a deadline: the one polling loop the CLI, the dev cluster,
the benchmarks and the tests share (no fixed sleeps as synchronisation)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from shardkeeper.vocab import ShardkeeperError

T = TypeVar("T")


class TimedOut(ShardkeeperError):
    pass


def poll_until(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    error: Callable[[str], Exception] = TimedOut,
) -> T:
    """Call ``condition`` every ``interval`` seconds until it returns something truthy, and
    return that; after ``timeout`` seconds raise ``error("timed out after ...: what")``.
    The condition is always tried once more at the deadline, so a slow first call counts."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise error(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
