"""The shard handler's catch-up: a replica that missed writes is brought into line, through
the same ``perform`` the agent runtime calls, against real data planes on loopback."""

from __future__ import annotations

import threading

import pytest

from agents.handler import KVShardHandler, ShardHandler, perform
from agents.shardsm import CatchUp, Synced
from tests.dataplane_support import SHARD, Cluster, follow, lead, load


@pytest.fixture
def nodes(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.stop()


def test_catch_up_brings_a_replica_that_was_away_into_line(nodes):
    p, r1, away = nodes.start("p"), nodes.start("r1"), nodes.start("away")
    p.store.mark_promoted()
    r1.store, away.store  # noqa: B018 - open the replicas' stores
    lead(p, 1, in_sync=(r1, away))
    follow(r1, p, 1)
    follow(away, p, 1)
    load(nodes.client, p, 300, prefix="before")
    # The replica leaves the in-sync set (its session was lost); writes go on without it.
    lead(p, 1, in_sync=(r1,))
    load(nodes.client, p, 400, prefix="meanwhile")
    nodes.client.delete(p.address, SHARD, b"before000007")
    assert away.store.digest() != p.store.digest()
    handler = KVShardHandler(away.stores, nodes.peer, page_size=128)
    event = perform(handler, CatchUp(SHARD, r1.address, p.address), threading.Event())
    assert event == Synced(SHARD, p.store.sync_lsn())
    assert away.store.digest() == p.store.digest() == r1.store.digest()
    assert away.store.sync_lsn() == p.store.sync_lsn()


def test_catch_up_from_an_unreachable_primary_raises_for_the_runtime_to_retry(nodes):
    p, away = nodes.start("p"), nodes.start("away")
    p.store.mark_promoted()
    away.store  # noqa: B018 - the replica holds the shard
    handler = KVShardHandler(away.stores, nodes.peer)
    with pytest.raises(Exception, match="127.0.0.1:1"):
        perform(handler, CatchUp(SHARD, "127.0.0.1:1", "127.0.0.1:1"), threading.Event())


class CopyOnly(ShardHandler):
    """A handler with no catch-up of its own: the default resumes its bootstrap."""

    def __init__(self) -> None:
        self.copies: list[tuple[int, str]] = []

    def on_bootstrap(self, shard: int, source_address: str, stop: threading.Event) -> int:
        self.copies.append((shard, source_address))
        return 41

    def on_become_replica(self, shard, generation, primary_address) -> None:
        pass

    def on_become_primary(self, shard, generation) -> int:
        return 0

    def on_new_primary(self, shard, primary_address, generation) -> None:
        pass

    def on_drop(self, shard) -> None:
        pass


def test_default_catch_up_resumes_the_bootstrap_from_the_source():
    handler = CopyOnly()
    event = perform(handler, CatchUp(3, "src:1", "prim:1"), threading.Event())
    assert event == Synced(3, 41) and handler.copies == [(3, "src:1")]
    # No source named (an earlier repair failed): the primary is the place to copy from.
    perform(handler, CatchUp(4, None, "prim:1"), threading.Event())
    assert handler.copies[-1] == (4, "prim:1")
