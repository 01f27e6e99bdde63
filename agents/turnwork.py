"""What an agent's turn makes of the machine's state, redone only where something changed.

While shards are re-replicated, the leader rewrites nearly every agent's plan znode at each
step, each with hundreds of assignments of which a few changed, and every agent reports its
status after each step and each finished copy. Building every shard's target, route and
status entry afresh on each of those turns was most of an agent's CPU (issue 14). Records,
targets and assignments are frozen and a turn replaces only those it changes, so each class
here keeps what it built last time and builds again only for objects that are not the very
same ones: the result equals a full recomputation (tests/test_agent_turn.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from agents.dataplane import ShardRoute, ShardTable
from agents.shardsm import AgentState, ReportStatus, ShardRecord, ShardReport, Target, serve_of
from agents.shardsm.views import target_of
from shardkeeper.layout import AgentStatus, Assignment, ShardStatus


class Targets:
    """The state machine's target per shard of a plan znode."""

    def __init__(self) -> None:
        self._addresses: dict[str, str] = {}
        self._built: dict[int, tuple[Assignment, Target]] = {}

    def build(self, replicas: Mapping[int, Assignment], addresses: Mapping[str, str],
              address_of: Callable[[str], str]) -> dict[int, Target]:
        """``target_of`` each assignment, except that one still the same object as last
        time, with the same ``addresses``, keeps the target built then."""
        before = self._built if addresses == self._addresses else {}
        built: dict[int, tuple[Assignment, Target]] = {}
        targets: dict[int, Target] = {}
        for shard, assignment in replicas.items():
            hit = before.get(shard)
            if hit is None or hit[0] is not assignment:
                hit = (assignment, target_of(assignment, address_of))
            built[shard] = hit
            targets[shard] = hit[1]
        self._addresses, self._built = dict(addresses), built
        return targets


class Routes:
    """Keeps the data plane's route table in line with the machine's state."""

    def __init__(self, table: ShardTable, me: str):
        self.table, self.me = table, me
        # shard -> (record, target, route) as last routed
        self._routed: dict[int, tuple[ShardRecord, Target | None, ShardRoute | None]] = {}

    def refresh(self, state: AgentState) -> None:
        """Only shards whose record or target is not the very object routed last time
        are looked at again; a shard the state no longer holds loses its route."""
        targets = state.plan.targets if state.plan else {}
        before, table = self._routed, self.table
        routed: dict[int, tuple[ShardRecord, Target | None, ShardRoute | None]] = {}
        for shard, record in state.shards.items():
            target = targets.get(shard)
            hit = before.get(shard)
            if hit is not None and hit[0] is record and hit[1] is target:
                routed[shard] = hit
                continue
            serve = serve_of(record, target, self.me)
            # Field by field, not dataclasses.asdict (which deep-copies).
            route = None if serve is None else ShardRoute(
                serve.state, serve.term, serve.primary, serve.in_sync, serve.bootstrapping)
            routed[shard] = (record, target, route)
            if route is None:
                if hit is None or hit[2] is not None:
                    table.remove(shard)
            elif hit is None or hit[2] != route:
                table.set_route(shard, route)
        for shard in before.keys() - routed.keys():
            table.remove(shard)
        self._routed = routed


class Statuses:
    """``status/<id>`` from the machine's reports: an entry equal to the one reported last
    time is that same object, whose JSON is already made (``ShardStatus.json_text``)."""

    def __init__(self) -> None:
        self._shown: dict[int, tuple[ShardReport, ShardStatus]] = {}

    def status(self, agent: str, report: ReportStatus, refused: str) -> AgentStatus:
        before, shown = self._shown, {}
        shards = {}
        for e in report.shards:
            hit = before.get(e.shard)
            if hit is None or (hit[0] is not e and hit[0] != e):
                hit = (e, ShardStatus(str(e.state), e.lsn, e.catching_up, e.reason))
            shown[e.shard] = hit
            shards[e.shard] = hit[1]
        self._shown = shown
        return AgentStatus(agent, report.generation, shards, refused)
