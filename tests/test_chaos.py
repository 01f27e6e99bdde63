"""Issue 13's bounded chaos run: a fixed seed, about a minute of overlapping faults of every
kind against a real 3-server ensemble, 2 coordinators and 6 agents in network
namespaces, shards of a few MB each, and four clients whose every operation is checked.

Nothing acknowledged may be lost, no read may be stale, and the cluster must converge
with equal replicas, nothing stuck and no process dead that was not killed on purpose.
While the ZooKeeper quorum is lost, reads go on; when it returns, nothing is re-replicated.
`python -m bench.chaos` is the same run, longer and with any seed.
"""

from __future__ import annotations

import json
import os

import pytest

from bench.chaos.nemesis import KINDS
from bench.chaos.run import RunOptions, run

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="network namespaces and a tmpfs mount: needs root")

SEED = 13


@needs_root
def test_a_minute_of_every_fault_loses_nothing_and_converges() -> None:
    report = run(RunOptions(seed=SEED, duration=60.0, quorum_span=(10.0, 12.0),
                            converge_timeout=150.0))
    print("\n" + json.dumps({k: v for k, v in report.items() if k != "details"}, indent=1))
    print(json.dumps(report["details"], indent=1))
    missing = set(KINDS) - set(report["faults"])
    assert not missing, f"fault kinds that never ran: {missing}"
    assert report["lost"] == 0, report["details"]["lost_writes"] + report["details"]["unexplained"]
    assert report["stale_reads"] == 0, report["details"]["stale_reads"]
    assert report["converged"], report["details"]["unconverged_reason"]
    assert report["verify_ok"]
    assert report["stuck_replicas"] == 0, report["details"]["stuck"]
    assert report["unexpected_exits"] == 0, report["details"]["unexpected_exits"]
    assert report["acked"] > 500, "the clients got writes through"
    # Quorum loss (10-12 s, nothing else running): agents keep serving reads from their
    # last plan, and when the quorum returns nobody has left and nothing is copied.
    quorum = report["per_kind"]["zk-quorum"]
    assert quorum["worst_read_gap_s"] < 10.0, quorum
    assert quorum["departures"] == 0 and quorum["copies"] == 0, quorum
    assert report["ok"]
