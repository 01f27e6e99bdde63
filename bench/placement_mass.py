"""The largest single changes at S=100,000, N=1,000, R=3 (issue 11's one goal left: at most
1 s per call), for this engine and an earlier one side by side, in the same run.

    python -m bench.placement --part mass                 # table
    python -m bench.placement --part mass --json          # {"machine": ..., "mass": [rows]}
    python -m bench.placement --part mass --mass-baseline REV   # default: before this work

Each scenario is one place() call from a plan of the cluster before the change (placed
from scratch, then through any earlier changes the scenario names) to the cluster after
it. Every engine runs in a child process of its own (the baseline's coordinator/placement
package extracted from git at REV), scenario by scenario, the engines alternating, so both
see the same machine; the time is the CPU seconds of the call, best of up to 3 runs (1
when a run takes over 2 s). Also: moves and primary changes (as place() counts them),
outside = the most replicas any member holds outside [floor, ceil] of its fair share (0:
the bound is met), complete = not cut short (no should_stop here).

Clusters: "0.1 x 1000" is m0000..m0999 at weight 0.1 in zones z0..z4 (i mod 5); "uneven"
is 1,000 members with weights log-uniform in [0.001, 100] (seeded), one alone in a zone,
a tenth without a zone and the rest in zones z1..z5 at random (about 180 each).
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

SHARDS = 100_000
# The commit before the work on the largest single changes (its engine: 1.2-1.8 s for one
# weight 0.1 -> 100, 4-6 s for merging two zones).
BEFORE = "0f94edc"

SCENARIOS = [
    "one weight 0.1 -> 100",
    "one weight 100 -> 0.1",
    "half the weights -> 100",
    "merge two zones",
    "drain a whole zone",
    "R 3 -> 4",
    "R 4 -> 2",
]


def spike_members(member_type: type) -> list:
    return [member_type(f"m{i:04d}", f"z{i % 5}", 0.1) for i in range(1000)]


def uneven_members(member_type: type, seed: int = 1) -> list:
    rnd = random.Random(seed)
    members = [member_type("m0000", "solo", round(10 ** rnd.uniform(-3, 2), 3))]
    for i in range(1, 1000):
        zone = "" if rnd.random() < 0.1 else f"z{rnd.randrange(1, 6)}"
        members.append(member_type(f"m{i:04d}", zone, round(10 ** rnd.uniform(-3, 2), 3)))
    return members


def scenario(name: str, member_type: type) -> tuple[list, int, list[tuple[list, int]]]:
    """(members, R) of the first plan, placed from scratch, then the changes [(members,
    R)], each placed from the plan before it; the last one is timed."""
    m = member_type
    if name.startswith("one weight"):
        base = spike_members(m)
        spiked = list(base)
        spiked[500] = m(base[500].id, base[500].zone, 100.0)
        if name.endswith("-> 100"):
            return base, 3, [(spiked, 3)]
        return base, 3, [(spiked, 3), (base, 3)]
    base = uneven_members(m)
    if name == "half the weights -> 100":
        rnd = random.Random(7)
        return base, 3, [([m(x.id, x.zone, 100.0) if rnd.random() < 0.5 else x for x in base], 3)]
    if name == "merge two zones":
        return base, 3, [([m(x.id, "z1", x.weight) if x.zone == "z2" else x for x in base], 3)]
    if name == "drain a whole zone":
        return base, 3, [([m(x.id, x.zone, x.weight, x.zone == "z3") for x in base], 3)]
    if name == "R 3 -> 4":
        return base, 3, [(base, 4)]
    if name == "R 4 -> 2":
        return base, 4, [(base, 2)]
    raise ValueError(name)


def outside(rows, members: list, fair: dict[str, float]) -> int:
    load = Counter(a for row in rows for a in row)
    worst = 0
    for x in members:
        f, n = fair[x.id], load[x.id]
        worst = max(worst, n - math.ceil(f - 1e-7), math.floor(f + 1e-7) - n)
    return worst


def worker(engine: str, name: str) -> dict:
    """In the child: import coordinator.placement from `engine`, time the scenario."""
    sys.path.insert(0, engine)
    import coordinator.placement as placement

    assert Path(placement.__file__).resolve().is_relative_to(Path(engine).resolve())
    first, first_r, changes = scenario(name, placement.Member)
    previous = placement.place(None, first, SHARDS, first_r).replicas
    for members, r in changes[:-1]:
        previous = placement.place(previous, members, SHARDS, r).replicas
    after, replicas = changes[-1]
    best = math.inf
    for _ in range(3):
        start = time.process_time()
        p = placement.place(previous, after, SHARDS, replicas)
        best = min(best, time.process_time() - start)
        if best > 2.0:
            break
    fair = placement.fair_shares(after, SHARDS, replicas)
    return {
        "seconds": round(best, 4),
        "moves": p.moves,
        "primary_changes": p.primary_changes,
        "outside": outside(p.replicas, after, fair),
        "complete": p.complete,
    }


def extract(rev: str, repo: Path, into: Path) -> Path:
    """coordinator/placement at `rev`, as a tree of its own under `into`."""
    archive = subprocess.run(
        [
            "git",
            "-C",
            str(repo),
            "archive",
            rev,
            "coordinator/__init__.py",
            "coordinator/placement",
        ],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run(baseline: str | None, progress: bool = True) -> list[dict]:
    repo = Path(__file__).resolve().parents[1]
    rows = []
    with tempfile.TemporaryDirectory(prefix="placement-mass-") as tmp:
        engines = {"shardkeeper": str(repo)}
        if baseline:
            engine = Path(tmp) / "engine"
            engine.mkdir()
            engines[f"before ({baseline})"] = str(extract(baseline, repo, engine))
        for name in SCENARIOS:
            for label, path in engines.items():
                out = subprocess.run(
                    [sys.executable, "-m", "bench.placement_mass", "--worker", path, name],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=tmp,  # not the repository: the engine comes from `path` only
                    env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"},
                ).stdout
                rows.append({"scenario": name, "engine": label, **json.loads(out)})
                if progress:
                    print(f"  done: {name} / {label}", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    head = (
        f"{'change (S=100,000, N=1,000, R=3)':<34} {'engine':<22} {'CPU s':>7} {'moves':>7} "
        f"{'primary ch.':>11} {'outside':>7} {'complete':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['scenario']:<34} {r['engine']:<22} {r['seconds']:>7.3f} {r['moves']:>7} "
            f"{r['primary_changes']:>11} {r['outside']:>7} {str(r['complete']):>8}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3])))
    else:
        raise SystemExit("run as: python -m bench.placement --part mass")
