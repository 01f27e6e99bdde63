"""Reading the cluster's state, once (`status`) or whenever it changes (`watch`, and the
`--wait` of drain, undrain, move and rebalance).

``Follower`` sets ZooKeeper watches on what the status document is made of (plan/meta,
members, every agent's status, the admin requests, the leader, the audit log); a watch
only wakes the reader, which then reads the whole document again, at most every
``min_interval`` seconds: a burst of status changes during a rebalance costs one read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError

from shardkeeper import admin
from shardkeeper.layout import AuditEvent, Paths
from shardkeeper.summary import read_summary
from shardkeeper.vocab import CorruptZnode


def latest_events(client: KazooClient, paths: Paths, limit: int
                  ) -> list[tuple[str, AuditEvent]]:
    """The last ``limit`` audit events (reads only the znodes that hold them)."""
    try:
        names = sorted(client.get_children(paths.events))
    except NoNodeError:
        return []
    # One znode holds one pass's events: ``limit`` znodes hold at least ``limit`` events.
    after = names[-limit - 1] if len(names) > limit else ""
    return admin.events(client, paths, after=after)[-limit:]


@dataclass
class Snapshot:
    """One read: the status document (None if the read failed: ``error`` says why) and
    the audit events appended since the previous read (the latest few, the first time)."""

    summary: dict[str, Any] | None
    events: list[AuditEvent] = field(default_factory=list)
    error: str = ""
    at: float = 0.0  # time.time() of the read


class Follower:
    """Watches a cluster and reads its state again whenever something changed."""

    def __init__(self, client: KazooClient, paths: Paths, wake: threading.Event,
                 first_events: int = 5):
        self.client = client
        self.paths = paths
        self.wake = wake
        self.active = True
        self.first_events = first_events
        self.last_event: str | None = None
        self.watched: set[str] = set()
        self.lock = threading.Lock()
        for path in (paths.plan_meta, paths.epoch, paths.maintenance, paths.config):
            client.DataWatch(path, self._poke)
        for path in (paths.members, paths.events, paths.drains, paths.election):
            client.ChildrenWatch(path, self._poke)
        client.ChildrenWatch(paths.status, self._statuses)

    def _poke(self, *_args: object) -> bool:
        self.wake.set()
        return self.active  # False removes the watch once we are done

    def _statuses(self, names: list[str]) -> bool:
        with self.lock:
            new = [n for n in names if n not in self.watched]
            self.watched.update(new)
        for name in new:
            # Exactly two parameters: kazoo passes the event too to a three-argument one.
            self.client.DataWatch(f"{self.paths.status}/{name}",
                                  lambda _data, _stat: self._poke())
        return self._poke()

    def close(self) -> None:
        self.active = False

    def read(self) -> Snapshot:
        try:
            summary = read_summary(self.client, self.paths)
            if self.last_event is None:
                entries = latest_events(self.client, self.paths, self.first_events)
            else:
                entries = admin.events(self.client, self.paths, after=self.last_event)
        except (KazooException, KazooTimeoutError) as e:
            return Snapshot(None, error=f"ZooKeeper unreachable ({type(e).__name__}):"
                            " retrying", at=time.time())
        except CorruptZnode as e:
            # A plan being rewritten or repaired: the next read usually finds it whole.
            return Snapshot(None, error=str(e), at=time.time())
        if entries:
            self.last_event = entries[-1][0]
        elif self.last_event is None:
            self.last_event = ""
        return Snapshot(summary, [e for _, e in entries], at=time.time())

    def updates(self, stop: threading.Event, deadline: float | None = None,
                min_interval: float = 0.2, tick: float = 1.0
                ) -> Iterator[tuple[Snapshot, bool]]:
        """(snapshot, fresh) at once and after every change; between changes, the last
        snapshot again every ``tick`` seconds (fresh False) so that a view can update its
        clock and ages. Ends when ``stop`` is set or at ``deadline`` (time.monotonic())."""
        self.wake.clear()  # setting the watches woke it: this read covers that
        snapshot = self.read()
        last_read = time.monotonic()
        yield snapshot, True
        while not stop.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            wait = tick if deadline is None else min(tick, deadline - now)
            changed = self.wake.wait(wait)
            if stop.is_set():
                return
            if not changed and snapshot.summary is not None:
                yield snapshot, False
                continue
            # A burst of changes (every copy of a rebalance reports) costs one read.
            pause = min_interval - (time.monotonic() - last_read)
            if pause > 0 and stop.wait(pause):
                return
            self.wake.clear()
            snapshot = self.read()
            last_read = time.monotonic()
            yield snapshot, True
