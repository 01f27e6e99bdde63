"""The key -> shard mapping: xxhash64 onto S equal token ranges (a contract clients and
agents share; changing it re-routes every key of every running cluster)."""

from __future__ import annotations

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from shardkeeper.ring import shard_for_key


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40) | st.text(max_size=20), st.integers(1, 1 << 20))
def test_shard_for_key_is_the_token_range_of_xxhash64(key, shards):
    s = shard_for_key(key, shards)
    assert 0 <= s < shards
    data = key.encode() if isinstance(key, str) else key
    h = xxhash.xxh64_intdigest(data)
    assert s * (1 << 64) <= h * shards < (s + 1) * (1 << 64)
    assert shard_for_key(key, shards) == s


def test_shard_for_key_known_values():
    # Pinned: changing these would re-route every key of every running cluster.
    assert shard_for_key(b"", 4096) == xxhash.xxh64_intdigest(b"") * 4096 >> 64
    assert [shard_for_key(k, 16) for k in ("user:1", "user:2", "user:3")] == [
        xxhash.xxh64_intdigest(k.encode()) * 16 >> 64 for k in ("user:1", "user:2", "user:3")
    ]
    assert shard_for_key("é", 7) == shard_for_key("é".encode(), 7)
    with pytest.raises(ValueError):
        shard_for_key(b"k", 0)
