"""Other agents' data-plane addresses, as an agent's plan needs them.

A plan names agents by id; their addresses are in their member znodes. A plan step names
the same agents again and again, and an agent's address changes only with a new member
znode (a new incarnation), so an address is read when not known yet, and again after the
members watch fired (``stale``) or the agent was idle for a while (a watch event can be
lost with a session). Re-replication used to re-read every named member at every plan
step (19 reads each time in a 20-agent cluster).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from shardkeeper.layout import MemberInfo, Paths
from shardkeeper.vocab import CorruptZnode

log = logging.getLogger(__name__)


class AddressBook:
    def __init__(self, paths: Paths, me: str):
        self.paths, self.me = paths, me
        self.known: dict[str, str] = {}  # agent id -> address, the last one read
        # Bumped when members may have changed; per agent, its value when last read. Two
        # bumps racing (the watch's thread, the main loop) may count once: it still grows.
        self._seen = 0
        self._checked: dict[str, int] = {}

    def stale(self) -> None:
        """Every address known must be read again before it is used."""
        self._seen += 1

    def read(self, client: KazooClient, ids: Iterable[str]) -> None:
        """Read the addresses of ``ids`` not known, or known from before ``stale``."""
        seen, checked = self._seen, self._checked
        pending = {
            i: client.get_async(self.paths.member(i)) for i in sorted(ids)
            if i != self.me and checked.get(i, -1) < seen
        }
        for agent, result in pending.items():
            try:
                data, _ = result.get()
                self.known[agent] = MemberInfo.decode(self.paths.member(agent), data).address
            except NoNodeError:
                pass  # departed: keep the last known address, the plan will move on
            except CorruptZnode as e:
                log.error("ignoring member: %s", e)
                continue  # read again next time
            checked[agent] = seen
