"""The agent's data plane: its shards served over HTTP, replicated, copied and repaired.

- ``table``: ShardRoute, ShardTable -- what the runtime lets the data plane serve.
- ``server``: DataPlane -- the HTTP server, request parsing, the primary's write path.
- ``replication``: the replicate call, both ends (forwarding, pushing, the fencing rule).
- ``transfer``: the snapshot (store file) transfer, both ends, in the kernel.
- ``repair``: copy_shard, repair_shard, catch_up_from_peers -- the KV handler's work.

The wire format and the HTTP client that clients share are ``shardkeeper.wire`` and
``shardkeeper.peer``. Re-exported here: what the runtime and the handler use.
"""

from agents.dataplane.repair import catch_up_from_peers, copy_shard, repair_shard
from agents.dataplane.server import DataPlane
from agents.dataplane.table import ShardRoute, ShardTable

__all__ = [
    "DataPlane",
    "ShardRoute",
    "ShardTable",
    "catch_up_from_peers",
    "copy_shard",
    "repair_shard",
]
