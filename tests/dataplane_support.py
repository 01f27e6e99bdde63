"""The data plane over real HTTP on 127.0.0.1 with real SQLite files, for the
test_dataplane*.py files: agents in one process (each a DataPlane with its own stores and
shard table), driven through the shard table the way the agent runtime drives it.

The fixtures are imported by the test modules that use them."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass

import pytest

from agents.dataplane import DataPlane, ShardRoute, ShardTable
from agents.shardsm import ShardState
from agents.storeset import StoreSet
from shardkeeper.peer import PeerClient, Reply

TOKEN = "test-cluster-token"  # what clients hold
PEER_TOKEN = "test-peer-token"  # what agents send each other (replication)
SHARD = 7


@dataclass
class Node:
    name: str
    stores: StoreSet
    table: ShardTable
    plane: DataPlane

    @property
    def address(self) -> str:
        return self.plane.address

    @property
    def store(self):
        return self.stores.open(SHARD)


class Cluster:
    """Agents on free ports; ``restart`` brings a stopped agent back on a new port."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.nodes: list[Node] = []
        self.client = PeerClient(TOKEN, timeout=2.0, attempts=3)  # a client
        self.peer = PeerClient(PEER_TOKEN, timeout=2.0, attempts=3)  # another agent

    def start(self, name: str, stores: StoreSet | None = None, table: ShardTable | None = None,
              **options):
        stores = stores or StoreSet(self.tmp_path / name)
        table = table or ShardTable()
        options.setdefault("forward_timeout", 1.0)
        plane = DataPlane(stores, table, TOKEN, peer_token=PEER_TOKEN, **options).start()
        node = Node(name, stores, table, plane)
        self.nodes.append(node)
        return node

    def restart(self, node: Node) -> Node:
        return self.start(node.name, node.stores, node.table)

    def stop(self) -> None:
        for node in self.nodes:
            node.plane.stop()
        for node in self.nodes:
            node.stores.close_all()


def lead(primary: Node, term: int, in_sync=(), bootstrapping=()):
    primary.table.set_route(
        SHARD,
        ShardRoute(
            ShardState.PRIMARY,
            term=term,
            primary=primary.address,
            in_sync=tuple(n.address for n in in_sync),
            bootstrapping=tuple(n.address for n in bootstrapping),
        ),
    )


def follow(replica: Node, primary: Node, term: int, state=ShardState.REPLICA):
    """The route the runtime gives a replica whose plan names ``primary`` at ``term``."""
    replica.table.set_route(SHARD, ShardRoute(state, term=term, primary=primary.address))


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.stop()


@pytest.fixture
def trio(cluster):
    """A primary and two in-sync replicas of SHARD at term 1."""
    p, r1, r2 = cluster.start("p"), cluster.start("r1"), cluster.start("r2")
    p.store.mark_promoted()
    r1.store, r2.store  # noqa: B018 - open the replicas' stores
    lead(p, 1, in_sync=(r1, r2))
    follow(r1, p, 1)
    follow(r2, p, 1)
    return p, r1, r2


def digests(*nodes: Node) -> set[str]:
    return {n.store.digest() for n in nodes}


def raw(address: str, method: str, path: str, body=None, token: str | None = TOKEN):
    """One HTTP request with full control of headers and body."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=payload, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    is_json = resp.getheader("Content-Type") == "application/json"
    return resp.status, json.loads(data) if data and is_json else {}, dict(resp.getheaders())


def token_for(path: str) -> str:
    """The token a legitimate caller of ``path`` holds: agents call the replication
    endpoints with the peer token, clients the rest with the cluster token."""
    endpoint = path.partition("?")[0].rsplit("/", 1)[-1]
    return PEER_TOKEN if endpoint in ("replicate", "rows", "snapshot", "repair") else TOKEN


def load(client: PeerClient, node: Node, count: int, prefix: str = "k", batch: int = 1000):
    for start in range(0, count, batch):
        items = [
            (f"{prefix}{i:06d}".encode(), f"v{i}".encode()) for i in range(start, start + batch)
        ]
        client.batch_put(node.address, SHARD, items[: count - start])


class RecordingClient(PeerClient):
    """A primary's forwarding client that keeps the error of every answer it gets (every
    forward, first tries and follow-ups alike, goes through ``post_many``)."""

    def __init__(self) -> None:
        super().__init__(PEER_TOKEN, timeout=1.0, attempts=1)
        self.errors: list[str | None] = []

    def post_many(self, *args, **kwargs):
        replies = super().post_many(*args, **kwargs)
        self.errors += [r.body.get("error") for r in replies if isinstance(r, Reply)]
        return replies

