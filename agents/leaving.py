"""SIGTERM's graceful hand-off, the agent's side: when it may leave, and its linger.

``Agent.stop`` marks the member znode ``leaving``; the leader moves the agent's primaries
to in-sync replicas and acknowledges in plan/meta how many it must keep (no other
in-sync replica). :class:`HandOff` decides, from the agent's shard states alone, when the
agent may close its session: it holds no more primaries than acknowledged and every
demotion has synced (a demoted primary repairs away the write that was in flight when it
was fenced; until then it answers the new primary's forwards ``diverged``), or the
deadline passed. After the session closed, :func:`linger` keeps the data plane answering
forwards from primaries that have not read the plan without the agent yet.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from agents.dataplane import ShardRoute, ShardTable
from agents.shardsm import AgentState
from shardkeeper.vocab import ShardState

log = logging.getLogger(__name__)

# SIGTERM's hand-off: how long to wait for the leader to move this agent's primaries.
HANDOFF_TIMEOUT = 10.0
# After the session closed, forwards keep coming until every primary has read the plan
# without this agent (a plan propagation delay, tens of ms): answer them meanwhile.
LINGER_QUIET, LINGER_MAX = 0.3, 3.0


class LookupTable(ShardTable):
    """The data plane's table, noting when a request last looked a route up: once the
    agent has left, forwards still arriving from primaries that have not read the plan
    without it keep it answering (:func:`linger`)."""

    last_lookup = 0.0  # monotonic

    def route(self, shard: int) -> ShardRoute | None:
        self.last_lookup = time.monotonic()
        return super().route(shard)


def primaries(state: AgentState) -> set[int]:
    return {s for s, r in state.shards.items() if r.state == ShardState.PRIMARY}


@dataclass
class HandOff:
    timeout: float = HANDOFF_TIMEOUT  # 0: no hand-off, the session closes at once
    leave_by: float | None = None  # monotonic deadline, once the hand-off began
    acked: int | None = None  # primaries the leader said we keep, once it saw us
    handing: set[int] = field(default_factory=set)  # our primaries when we began
    handed_off: bool = False  # left gracefully: refuse writes, linger for forwards

    @property
    def started(self) -> bool:
        return self.leave_by is not None

    def begin(self, state: AgentState, now: float) -> None:
        self.handing = primaries(state)
        self.leave_by = now + self.timeout
        log.info("leaving: asked the leader to move %d primaries (waiting at most %gs)",
                 len(self.handing), self.timeout)

    def demoting(self, state: AgentState) -> int:
        """Shards handed off whose demotion has not synced yet."""
        return sum(1 for s in self.handing if (r := state.shards.get(s)) is not None
                   and r.state == ShardState.REPLICA and r.catching_up)

    def may_leave(self, state: AgentState, now: float) -> bool:
        """The hand-off is complete, or past its deadline (then it says so)."""
        assert self.leave_by is not None
        held, demoting = len(primaries(state)), self.demoting(state)
        if self.acked is not None and held <= self.acked and not demoting:
            log.info("leaving: primaries handed off (%d kept: no other in-sync replica)", held)
        elif now >= self.leave_by:
            log.warning("leaving without a complete hand-off after %gs: %d primaries left"
                        " to fail over, %d demotions not synced", self.timeout, held, demoting)
        else:
            return False
        self.handed_off = True
        return True

    def wait(self, idle: float, now: float) -> float:
        """How long the main loop may wait for its inbox."""
        if self.leave_by is None:
            return idle
        return max(0.0, min(idle, self.leave_by - now))


def linger(table: LookupTable, cut: threading.Event) -> None:
    """Our session is closed and the leader plans without us; primaries that have not
    read that plan yet still forward to us and need our answer. Keep answering until no
    request came for LINGER_QUIET (at most LINGER_MAX, or until ``cut``). (Clients
    meanwhile are redirected, or refused writes: we hold no primary now.)"""
    deadline = time.monotonic() + LINGER_MAX
    while (now := time.monotonic()) < deadline and not cut.is_set():
        quiet = now - table.last_lookup
        if quiet >= LINGER_QUIET:
            return
        cut.wait(min(LINGER_QUIET - quiet, deadline - now))
