"""Augmenting paths over agents, whatever they move (replicas or primaries): the kinds of
step, and the loop that searches and pushes until no source is left."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from coordinator.placement.model import Work

# The kinds of replica a step moves: one held in `previous` (the move costs 1), one placed
# in this round (free), or any that goes back to an agent that held it in `previous` (free).
ORIGINAL, FRESH, RETURN = 0, 1, 2

Step = tuple[str, int, str]  # (from agent, kind of replica it gives up, to agent)
Move = tuple[int, str, str]  # (shard, from agent, to agent)


class Graph(Protocol):
    w: Work

    def search(
        self, sources: Sequence[str], is_source: Callable[[str], int], is_sink: Callable[[str], int]
    ) -> Iterable[list[Step]]: ...

    def push(
        self, steps: list[Step], source: Callable[[str], int], sink: Callable[[str], int]
    ) -> int: ...


def augment(
    graph: Graph,
    agents: Sequence[str],
    source: Callable[[str], int],
    sink: Callable[[str], int],
) -> bool:
    """Push along the paths a search finds until no agent is a source. `source(a)` is how
    many units a may still give, `sink(b)` how many b may still take (0: none). Returns
    False when some source has no path to a sink (its reachable agents hold all they can:
    the bound is out of reach, see docs/placement.md) or when time ran out."""
    while sources := [a for a in agents if source(a)]:
        if graph.w.out_of_time():
            return False
        left = sum(map(sink, agents))
        if not left:  # no sink: no path (and no search to find that out)
            return False
        pushed = 0
        for steps in graph.search(sources, source, sink):
            if source(steps[0][0]) and sink(steps[-1][2]):
                pushed += graph.push(steps, source, sink)
                if pushed >= left:
                    break
        if not pushed:
            return False
    return True


def unwind(reached: Mapping[str, tuple[str, int] | None], b: str) -> list[Step]:
    steps: list[Step] = []
    step = reached[b]
    while step is not None:
        a, kind = step
        steps.append((a, kind, b))
        b = a
        step = reached[b]
    steps.reverse()
    return steps
