"""One data-plane node in a process of its own, for ``bench.dataplane``'s per-process figures.

``python -m bench.dataplane_node ROOT NAME`` opens a StoreSet under ``ROOT/NAME``, starts a
DataPlane on a free port of 127.0.0.1 (the same class, tokens and time-outs as the
in-process nodes), prints its address as the first line of stdout, then takes one JSON
command per line on stdin and answers each with one JSON line:

* ``{"lead": [addresses]}``: become SHARD's primary at term 1 with these in-sync replicas;
* ``{"follow": address}``: become a replica of SHARD at term 1 under that primary;
* ``{"digest": true}``: ``{"digest": ..., "rows": ..., "sync_lsn": ...}`` of SHARD's store;
* ``{"batches": true}``: ``{"batches": ..., "writes": ...}``: the write batches this node
  wrote to SHARD as its primary, and the writes in them (group commit).

End of stdin (the bench closed it, or died) stops the node: nothing outlives the bench.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.dataplane import SHARD, Node


def serve(root: Path, name: str) -> None:
    node = Node(root, name)
    try:
        print(node.address, flush=True)
        for line in sys.stdin:
            command = json.loads(line)
            if "lead" in command:
                node.lead_addresses(command["lead"])
                answer: dict = {"ok": True}
            elif "follow" in command:
                node.follow(command["follow"])
                answer = {"ok": True}
            elif "digest" in command:
                store = node.stores.open(SHARD)
                answer = {"digest": store.digest(), "rows": store.count(),
                          "sync_lsn": store.sync_lsn()}
            elif "batches" in command:
                writes = node.plane.writes_of(SHARD)
                answer = {"batches": writes.batches, "writes": writes.writes}
            else:
                answer = {"error": f"unknown command {command!r}"}
            print(json.dumps(answer), flush=True)
    finally:
        node.close()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), sys.argv[2])
