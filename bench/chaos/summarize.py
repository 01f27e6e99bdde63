"""`python -m bench.chaos.summarize RUN.json...`: the fault matrix of several runs.

Each argument is the output of `python -m bench.chaos --json` (one object per file, or
one per line). Prints Markdown: the runs (seed, seconds of faults, load, outcome), the
totals, and per fault kind the count, the worst windows without a write and without a
read, the slowest acknowledged write, and the recovery times of faults that ran alone.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def load(paths: list[str]) -> list[dict[str, Any]]:
    runs = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip().startswith("{"):
                runs.append(json.loads(line))
    return runs


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def matrix(runs: list[dict[str, Any]]) -> str:
    out = ["| seed | faults s | ops | acked | lost | unknown | stale reads | converged s |"
           " verify | stuck | exits | load mean (max) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        m = r.get("machine", {})
        out.append(
            f"| {r['seed']} | {r['duration_s']:g} | {r['ops']} | {r['acked']} | {r['lost']} |"
            f" {r['unknown']} | {r['stale_reads']} | {_s(r['converge_s'])} |"
            f" {'ok' if r['verify_ok'] else 'FAILED'} | {r['stuck_replicas']} |"
            f" {r['unexpected_exits']} | {m.get('load_mean', '-')} ({m.get('load_max', '-')}) |")
    total = {k: sum(r[k] for r in runs) for k in ("ops", "acked", "lost", "unknown",
                                                  "stale_reads")}
    seconds = sum(r["duration_s"] for r in runs)
    out.append(f"| **all {len(runs)}** | **{seconds:g}** | **{total['ops']}** |"
               f" **{total['acked']}** | **{total['lost']}** | **{total['unknown']}** |"
               f" **{total['stale_reads']}** | | | | | |")
    kinds: dict[str, dict[str, Any]] = defaultdict(lambda: {
        "count": 0, "gap": 0.0, "read": 0.0, "write": 0.0, "unknown": 0, "recovery": [],
        "left": 0, "copies": 0, "notes": set()})
    for r in runs:
        for kind, k in r["per_kind"].items():
            agg = kinds[kind]
            agg["count"] += k["count"]
            agg["gap"] = max(agg["gap"], k["worst_gap_s"])
            agg["read"] = max(agg["read"], k.get("worst_read_gap_s", 0.0))
            agg["write"] = max(agg["write"], k["worst_write_s"])
            agg["unknown"] += k["unknown_writes"]
            agg["recovery"] += k["recovery_s"]
            agg["left"] += k.get("departures", 0)
            agg["copies"] += k.get("copies", 0)
            agg["notes"].update(n for n in k["notes"] if "maintenance" in n)
    out += ["", "| fault | count | worst write gap s | worst read gap s | slowest acked write s |"
            " unknown writes | recovery s p50 / max (n) | left | copies |",
            "|---|---|---|---|---|---|---|---|---|"]
    for kind, agg in sorted(kinds.items()):
        rec = agg["recovery"]
        recovery = (f"{_s(_pct(rec, 0.5))} / {_s(max(rec))} ({len(rec)})" if rec else "-")
        notes = f" ({', '.join(sorted(agg['notes']))})" if agg["notes"] else ""
        out.append(f"| {kind}{notes} | {agg['count']} | {agg['gap']:.1f} | {agg['read']:.1f} |"
                   f" {agg['write']:.1f} | {agg['unknown']} | {recovery} | {agg['left']} |"
                   f" {agg['copies']} |")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print(matrix(load(sys.argv[1:])))


if __name__ == "__main__":
    main()
