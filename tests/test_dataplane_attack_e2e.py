"""Issue 10's forged forward, end to end: real ZooKeeper, a coordinator, agent processes, and
an attacker who holds what every client holds (the cluster token from ZooKeeper)."""

from __future__ import annotations

from shardkeeper.peer import PeerClient
from shardkeeper.token import read_peer_token, require_token
from shardkeeper.wire import b64, shard_path
from tests.test_data_e2e import cli_ok, start

SEQ_MAX = (1 << 32) - 1


def test_a_client_cannot_forge_a_forward_to_a_replica(cluster) -> None:
    kv = start(cluster, agents=("agent-1", "agent-2"), shards=1, replicas=2)
    kv.put(b"before", b"1")
    routing = kv.routing()
    primary, replica = (routing.addresses[a] for a in routing.replicas[0])
    token = require_token(cluster.client, cluster.paths)  # what a client reads
    assert token != read_peer_token(cluster.client, cluster.paths)
    attacker = PeerClient(token, attempts=1)
    # The replica's term and sync point are a client's to read...
    info = attacker.shard_info(replica, 0)
    before = kv.shard_infos(0)
    # ... but a forward with them, and an LSN far ahead, is refused and changes nothing.
    forged = {"term": info.term, "prev_lsn": info.sync_lsn, "sync": True,
              "rows": [{"key": b64(b"forged"), "value": b64(b"x"),
                        "lsn": (info.term << 32) | SEQ_MAX}]}
    for address in (replica, primary):
        reply = attacker.call(address, "POST", shard_path(0, "replicate"), forged)
        assert (reply.status, reply.body.get("error")) == (403, "forbidden")
    assert kv.shard_infos(0) == before
    # Writes after the attempt reach the replica (they used to be acknowledged unapplied).
    for i in range(20):
        kv.put(f"after-{i}".encode(), b"real")
    infos = kv.shard_infos(0)
    assert len({info.digest for info in infos.values()}) == 1
    assert {info.sync_lsn for info in infos.values()} == {infos[routing.replicas[0][0]].max_lsn}
    assert "every replica's digest is equal" in cli_ok(cluster, "verify")
