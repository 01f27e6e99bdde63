"""Issue 10: replication endpoints need the peer token, which clients never hold.

The attack this closes: a holder of the client token reads a replica's term and sync_lsn
from GET digest, then sends it a forward at that term with a huge LSN. The replica's
sync_lsn jumped, and every later real forward was acknowledged as "already held" but never
applied: acknowledged writes silently missing from a replica."""

from __future__ import annotations

import pytest

from agents.store import make_lsn
from shardkeeper.peer import PeerClient, PeerUnavailable
from shardkeeper.wire import Row, b64, shard_path
from tests import dataplane_support
from tests.dataplane_support import PEER_TOKEN, SHARD, TOKEN, digests, raw

cluster = dataplane_support.cluster
trio = dataplane_support.trio

SEQ_MAX = (1 << 32) - 1


def forged_forward(term: int, prev: int, lsn: int) -> dict:
    return {"term": term, "prev_lsn": prev, "sync": True,
            "rows": [{"key": b64(b"forged"), "value": b64(b"x"), "lsn": lsn}]}


def test_a_client_token_cannot_forge_a_forward(cluster, trio):
    p, r1, r2 = trio
    cluster.client.put(p.address, SHARD, b"before", b"1")
    # What a client token holder can learn: the replica's term and sync point.
    status, info, _ = raw(r1.address, "GET", shard_path(SHARD, "digest"), token=TOKEN)
    assert status == 200
    before = (r1.store.digest(), r1.store.sync_lsn())
    forged = forged_forward(info["term"], info["sync_lsn"], make_lsn(info["term"], SEQ_MAX))
    for token, expected in ((TOKEN, 403), (None, 401), ("guess", 401)):
        status, body, _ = raw(r1.address, "POST", shard_path(SHARD, "replicate"), forged,
                              token=token)
        assert status == expected, body
    assert (r1.store.digest(), r1.store.sync_lsn()) == before, "the replica is unchanged"
    # Real writes keep being applied on the replica, not just acknowledged.
    for i in range(3):
        lsn = cluster.client.put(p.address, SHARD, f"after-{i}".encode(), b"real")
        assert r1.store.get(f"after-{i}".encode()) == Row(f"after-{i}".encode(), b"real", lsn)
    assert r1.store.sync_lsn() == p.store.max_lsn() and len(digests(*trio)) == 1


@pytest.mark.parametrize("endpoint", ["replicate", "rows?after=0", "snapshot", "repair"])
def test_every_replication_endpoint_needs_the_peer_token(cluster, trio, endpoint):
    p, r1, _ = trio
    cluster.client.put(p.address, SHARD, b"before", b"1")
    before = digests(*trio)
    calls = {  # each a request the peer token gets a 200 for
        "replicate": (r1, "POST", forged_forward(1, r1.store.sync_lsn(), make_lsn(1, 99))),
        "rows?after=0": (p, "GET", None),
        "snapshot": (p, "GET", None),
        "repair": (p, "POST", {"keys": [b64(b"before")]}),
    }
    target, method, body = calls[endpoint]
    path = shard_path(SHARD, endpoint)
    status, answer, _ = raw(target.address, method, path, body, token=TOKEN)
    assert (status, answer["error"]) == (403, "forbidden")
    assert digests(*trio) == before
    assert raw(target.address, method, path, body, token=PEER_TOKEN)[0] == 200


def test_the_peer_token_also_opens_the_client_endpoints(cluster, trio):
    """Agents read digests (repair) with the peer token; clients never hold it."""
    p, *_ = trio
    peer = PeerClient(PEER_TOKEN, attempts=1)
    lsn = peer.put(p.address, SHARD, b"k", b"v")
    assert peer.shard_info(p.address, SHARD).max_lsn == lsn


# -- even a buggy peer cannot push a replica's sync point into the future ---------------------


def test_a_forward_carries_no_row_from_a_later_term(cluster, trio):
    p, r1, _ = trio
    cluster.client.put(p.address, SHARD, b"before", b"1")
    before = (r1.store.digest(), r1.store.sync_lsn())
    have = r1.store.sync_lsn()
    for rows in (
        [Row(b"k", b"v", make_lsn(9, 1))],  # a row of term 9 in a forward of term 1
        [Row(b"k", b"v", have)],  # not above the replica's sync point
        [Row(b"a", b"v", have + 2), Row(b"b", b"v", have + 1)],  # not in LSN order
    ):
        reply = cluster.peer.replicate(r1.address, SHARD, term=1, prev_lsn=have, rows=rows,
                                       sync=True)
        assert (reply.status, reply.body.get("error")) == (400, "malformed"), rows
    assert (r1.store.digest(), r1.store.sync_lsn()) == before


def test_a_replica_acknowledges_a_retried_forward_only_if_it_holds_it(cluster, trio):
    """A peer bug that pushes a replica's sync point far ahead within the term can no
    longer make it acknowledge real forwards it did not apply: the write fails loudly."""
    p, r1, r2 = trio
    cluster.client.put(p.address, SHARD, b"before", b"1")
    have = r1.store.sync_lsn()
    jump = cluster.peer.replicate(r1.address, SHARD, term=1, prev_lsn=have,
                                  rows=[Row(b"stray", b"x", make_lsn(1, SEQ_MAX))], sync=True)
    assert jump.status == 200  # well-formed, at the right term, on top of the sync point
    with pytest.raises(PeerUnavailable) as failed:
        cluster.client.put(p.address, SHARD, b"lost?", b"no")
    assert failed.value.body == {"error": "replication_failed", "replicas": [r1.address]}
    assert r2.store.get(b"lost?").value == b"no" and r1.store.get(b"lost?") is None
