"""Keys to shards: xxhash64 onto S equal token ranges of the 64-bit space (Dynamo's
"fixed partitions"). Clients route by it and agents check it; changing it would re-route
every key of every running cluster, so the tests pin known values."""

from __future__ import annotations

import xxhash


def shard_for_key(key: bytes | str, shards: int) -> int:
    """The shard owning ``key``: xxhash64 onto ``shards`` equal ranges of the 64-bit space."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    data = key.encode() if isinstance(key, str) else bytes(key)
    return (xxhash.xxh64_intdigest(data) * shards) >> 64
