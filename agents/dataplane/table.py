"""The shard table: what the data plane may serve, as the agent runtime last set it.

The runtime is the table's only writer: it sets each shard's route from its plan and the
shard state machine, and switches the whole agent's writability (ZooKeeper SUSPENDED) and
serving (LOST). The data plane only reads it; in particular a forward never changes a
route's term, so no request can move the fence (see ``replication.accept_forward``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from agents.shardsm import ShardState


@dataclass(frozen=True)
class ShardRoute:
    """What the data plane needs to know about one local shard replica.

    - ``state``: the local state from the shard state machine; only PRIMARY takes writes,
      only REPLICA and BOOTSTRAPPING take forwards, only REPLICA and PRIMARY are sources.
    - ``term``: the shard's primary's term (the plan generation that made it primary). As
      primary, the high bits of every LSN it issues and the term its forwards carry; as a
      replica or bootstrapping replica, the only term whose forwards it accepts.
    - ``primary``: the current primary's address, for redirects and repair.
    - ``in_sync``: replica addresses that must apply a write before it is acknowledged.
    - ``bootstrapping``: replica addresses copying the shard, which get forwards best effort.
    """

    state: ShardState
    term: int = 0
    primary: str | None = None
    in_sync: tuple[str, ...] = ()
    bootstrapping: tuple[str, ...] = ()


class ShardTable:
    """The agent runtime's view of its shards, read by the data plane. Thread-safe.

    ``set_route`` / ``remove`` per shard, ``set_writable(False)`` on SUSPENDED
    (primaries refuse writes with 503), ``set_serving(False)`` on LOST (every request 503).
    """

    def __init__(self, *, writable: bool = True, serving: bool = True):
        self._lock = threading.Lock()
        self._routes: dict[int, ShardRoute] = {}
        self._writable = writable
        self._serving = serving

    def set_route(self, shard: int, route: ShardRoute) -> None:
        with self._lock:
            self._routes[shard] = route

    def remove(self, shard: int) -> None:
        with self._lock:
            self._routes.pop(shard, None)

    def route(self, shard: int) -> ShardRoute | None:
        with self._lock:
            return self._routes.get(shard)

    def routes(self) -> dict[int, ShardRoute]:
        with self._lock:
            return dict(self._routes)

    @property
    def writable(self) -> bool:
        with self._lock:
            return self._writable

    def set_writable(self, writable: bool) -> None:
        with self._lock:
            self._writable = writable

    @property
    def serving(self) -> bool:
        with self._lock:
            return self._serving

    def set_serving(self, serving: bool) -> None:
        with self._lock:
            self._serving = serving
