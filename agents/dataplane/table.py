"""The shard table: what the data plane may serve, as the agent runtime last set it.

The runtime sets each shard's route from its plan and the shard state machine, and
switches the whole agent's writability (ZooKeeper SUSPENDED) and serving (LOST). The data
plane itself only raises a route's ``primary_generation`` (``fence``) when a newer primary
forwards to this replica.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any

from agents.shardsm import ShardState


@dataclass(frozen=True)
class ShardRoute:
    """What the data plane needs to know about one local shard replica.

    - ``state``: the local state from the shard state machine; only PRIMARY takes writes,
      only REPLICA and BOOTSTRAPPING take forwards, only REPLICA and PRIMARY are sources.
    - ``generation``: plan generation at which this agent took its role; as primary, the
      high bits of every LSN it issues (``Promote.generation``).
    - ``primary``: the current primary's address, for redirects and repair.
    - ``primary_generation``: replicas refuse forwards from primaries older than this.
    - ``in_sync``: replica addresses that must apply a write before it is acknowledged.
    - ``catching_up``: replica addresses that get forwards best effort (bootstrapping ones).
    """

    state: ShardState
    generation: int = 0
    primary: str | None = None
    primary_generation: int = 0
    in_sync: tuple[str, ...] = ()
    catching_up: tuple[str, ...] = ()


class ShardTable:
    """The agent runtime's view of its shards, read by the data plane. Thread-safe.

    ``set_route`` / ``update`` / ``remove`` per shard, ``set_writable(False)`` on SUSPENDED
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

    def update(self, shard: int, **changes: Any) -> ShardRoute:
        """Change some fields of a shard's route (which must exist); returns the new route."""
        with self._lock:
            route = replace(self._routes[shard], **changes)
            self._routes[shard] = route
            return route

    def remove(self, shard: int) -> None:
        with self._lock:
            self._routes.pop(shard, None)

    def route(self, shard: int) -> ShardRoute | None:
        with self._lock:
            return self._routes.get(shard)

    def routes(self) -> dict[int, ShardRoute]:
        with self._lock:
            return dict(self._routes)

    def fence(self, shard: int, generation: int) -> bool:
        """Accept a forward from a primary of ``generation``? Raises the fence if newer."""
        with self._lock:
            route = self._routes.get(shard)
            if route is None or generation < route.primary_generation:
                return False
            if generation > route.primary_generation:
                self._routes[shard] = replace(route, primary_generation=generation)
            return True

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
