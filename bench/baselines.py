"""Baseline shard placements that bench.placement compares shardkeeper's placement with.

Each function maps shards 0..S-1 to replica lists (primary first) for a set of nodes. None
of them knows zones or the previous placement: they are stateless hash schemes. Also the
placement engine of an earlier commit (:func:`engine_at`), the baseline of the churn runs.
"""

from __future__ import annotations

import bisect
import hashlib
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import xxhash


def shard_key(shard: int) -> str:
    return f"shard-{shard}"


class SeedRing:
    """The seed article's ConsistentHashRing: md5 of the node name as its one point on the
    ring, and a linear scan of the sorted points for the first one at or after the key's
    hash. (The article hashes str with md5 directly, which Python 3 refuses: we encode.)"""

    def __init__(self, nodes: Sequence[str]):
        self._ring = {self._hash(n): n for n in nodes}
        self._sorted_keys = sorted(self._ring)

    @staticmethod
    def _hash(key: str) -> int:
        return int(hashlib.md5(key.encode()).hexdigest(), 16)

    def _index(self, key: str) -> int:
        h = self._hash(key)
        for i, node_key in enumerate(self._sorted_keys):
            if h <= node_key:
                return i
        return 0

    def replicas(self, key: str, count: int) -> tuple[str, ...]:
        """The node owning the key and the next ones clockwise (one point per node, so the
        next points are distinct nodes)."""
        start = self._index(key)
        keys = self._sorted_keys
        n = min(count, len(keys))
        return tuple(self._ring[keys[(start + i) % len(keys)]] for i in range(n))


def seed_ring(nodes: Sequence[str], shards: int, replicas: int) -> list[tuple[str, ...]]:
    ring = SeedRing(nodes)
    return [ring.replicas(shard_key(s), replicas) for s in range(shards)]


def vnode_ring(
    nodes: Sequence[str], shards: int, replicas: int, vnodes: int = 100
) -> list[tuple[str, ...]]:
    """xxhash64 ring with `vnodes` points per node; replicas are the next distinct nodes."""
    points = sorted(
        (xxhash.xxh64_intdigest(f"{n}#{v}".encode()), n) for n in nodes for v in range(vnodes)
    )
    hashes = [h for h, _ in points]
    owners = [n for _, n in points]
    want = min(replicas, len(nodes))
    out = []
    for s in range(shards):
        i = bisect.bisect_left(hashes, xxhash.xxh64_intdigest(shard_key(s).encode()))
        row: list[str] = []
        while len(row) < want:
            node = owners[i % len(owners)]
            if node not in row:
                row.append(node)
            i += 1
        out.append(tuple(row))
    return out


def uhashring_ring(nodes: Sequence[str], shards: int, replicas: int) -> list[tuple[str, ...]]:
    """uhashring (PyPI) in its ketama-compatible mode; replicas are the next distinct nodes
    on its continuum. HashRing.range(key, unique=True) gives the same lists but slices the
    whole continuum on every call (37 s at 100k shards and 1,000 nodes), so we walk the
    library's own continuum (get_points) from the library's position for the key."""
    from uhashring import HashRing

    ring = HashRing(nodes=list(nodes), hash_fn="ketama")
    owners = [node for _, node in ring.get_points()]
    want = min(replicas, len(nodes))
    out = []
    for s in range(shards):
        i = ring.get_node_pos(shard_key(s))
        row: list[str] = []
        while len(row) < want:
            node = owners[i % len(owners)]
            if node not in row:
                row.append(node)
            i += 1
        out.append(tuple(row))
    return out


def uhashring_range(nodes: Sequence[str], shards: int, replicas: int) -> list[tuple[str, ...]]:
    """The same through HashRing.range (slow; used to check uhashring_ring)."""
    from uhashring import HashRing

    ring = HashRing(nodes=list(nodes), hash_fn="ketama")
    want = min(replicas, len(nodes))
    return [
        tuple(conf["nodename"] for conf in ring.range(shard_key(s), size=want, unique=True))
        for s in range(shards)
    ]


def kazoo_partitioner(nodes: Sequence[str], shards: int) -> list[tuple[str, ...]]:
    """kazoo's SetPartitioner default split (R=1): its own partition function, called once
    per member the way each member's partitioner would call it."""
    from kazoo.recipe.partitioner import SetPartitioner

    split = SetPartitioner._partitioner  # a method that does not use self
    owner: dict[int, str] = {}
    for node in nodes:
        for shard in split(None, node, list(nodes), list(range(shards))):
            owner[shard] = node
    return [(owner[s],) for s in range(shards)]


# The placement engine before issue 11 (one module, coordinator/placement.py): the
# baseline of the churn scenarios, loaded from git so that it stays runnable.
ENGINE_BEFORE_ISSUE_11 = "0de8f33"


def engine_at(rev: str, repo: Path) -> ModuleType:
    """coordinator/placement.py as it was at `rev`, imported as a module of its own."""
    source = subprocess.run(
        ["git", "-C", str(repo), "show", f"{rev}:coordinator/placement.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    name = f"placement_at_{rev.replace('/', '_')}"
    module = ModuleType(name)
    module.__file__ = f"<git {rev}:coordinator/placement.py>"
    sys.modules[name] = module  # dataclasses look their module up while being defined
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module
