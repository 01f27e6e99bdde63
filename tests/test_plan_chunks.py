"""cluster.check_chunks: a reader never routes by a routing table that is not whole."""

from __future__ import annotations

import pytest

from shardkeeper.cluster import IncompletePlan, check_chunks
from shardkeeper.layout import ROUTING_CHUNK, Paths, PlanMeta, RoutingChunk

PATHS = Paths("c")
SHARDS = ROUTING_CHUNK + 10  # two chunks: 512 shards and 10


def meta(shards: int = SHARDS, chunks: int = 2) -> PlanMeta:
    return PlanMeta(generation=7, epoch=1, leader="coord-1", shards=shards, replicas=1,
                    members=("a",), chunks=chunks)


def chunk(first: int, rows: int) -> RoutingChunk:
    return RoutingChunk(generation=7, first=first, replicas=(("a",),) * rows)


WHOLE = {"00000": chunk(0, ROUTING_CHUNK), "00001": chunk(ROUTING_CHUNK, 10)}


def test_a_whole_table_passes() -> None:
    check_chunks(PATHS, meta(), WHOLE)


@pytest.mark.parametrize(("chunks", "expected"), [
    # The last chunk gone: keys would hash over 512 shards instead of 522 (a silent miss).
    ({"00000": WHOLE["00000"]}, "incomplete: routing chunk 00001 missing"),
    ({"00001": WHOLE["00001"]}, "incomplete: routing chunk 00000 missing"),
    ({}, "incomplete: routing chunk 00000, 00001 missing"),
    ({**WHOLE, "00001": chunk(ROUTING_CHUNK + 1, 9)}, "starts at shard 513, expected 512"),
    ({**WHOLE, "00001": chunk(ROUTING_CHUNK, 9)}, "chunks hold 521 shards, plan/meta says 522"),
])
def test_missing_or_inconsistent_chunks_are_refused(chunks: dict[str, RoutingChunk],
                                                    expected: str) -> None:
    with pytest.raises(IncompletePlan) as e:
        check_chunks(PATHS, meta(), chunks)
    assert expected in str(e.value)
    assert "restart the leading coordinator (coord-1)" in str(e.value)
