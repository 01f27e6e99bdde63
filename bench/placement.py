"""Placement benchmark: shardkeeper's sticky placement against hash-ring baselines, and
against its own engine from before issue 11 under churn.

    python -m bench.placement          # tables
    python -m bench.placement --json   # {"machine": ..., "hash": [rows], "churn": [rows]}
    python -m bench.placement --quick  # without the S=100,000 scenarios
    python -m bench.placement --part churn --baseline none   # churn, this engine only
    python -m bench.placement --part mass   # the largest single changes, S=100,000 (see
                                            # bench/placement_mass.py), against an earlier engine

Hash part. For each scenario and algorithm: a full plan from scratch (timed), then the
plan after removing one node and the plan after adding one, each from the full plan.

- balance, primary_balance: max / mean replicas (primaries) per node, mean over all nodes;
- moves_remove: (shard, node) replica assignments that are new after the removal, against
  optimal_remove = the replicas the removed node held; moves_add likewise, against
  optimal_add = ceil(R * S / (N + 1));
- zone_violations: shards with more replicas in one zone than the zone rule allows (1 when
  zones >= R); the baselines do not know zones;
- seconds: the full plan, best of up to 3 runs (1 run when a run takes over 0.5 s).
The table adds the time of the two single-change plans; for the stateless baselines a
change is a full recomputation.

Churn part (issue 11). A cluster with weights and zones of unequal size goes through a
fixed random sequence of changes (joins, leaves, drains, undrains, weight changes), each
followed by one place() call from the previous plan; both engines see the same sequence.
The last scenario is the largest single change there is: a weight from 0.1 to 100 and
back, among 1,000 members at 0.1.
- runs: independent random sequences (cluster and changes), their calls pooled;
- full_s: CPU seconds of the first plan (the slowest of the runs);
- p50_s, p99_s, max_s: CPU seconds of one call (nearest rank);
- outside: the most replicas any member held outside [floor, ceil] of its fair share,
  over all calls (0: every call met the bound); max_over_ceil: the largest load / ceil(fair);
- moves, lower_bound: summed over the calls; a call's lower bound is the larger of the
  replicas orphaned by the change and the sum over members of how far each is below the
  floor of its new fair share;
- capped: baseline calls stopped at --cap CPU seconds (counted as taking the cap, which
  understates them; the sequence then goes on from this engine's plan for that change).
The baseline is coordinator/placement.py at --baseline (default: the last commit before
issue 11's work), loaded from git.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from bench import baselines, placement_mass
from coordinator.placement import Member, fair_shares, place

Rows = Sequence[Sequence[str]]
Algorithm = Callable[[list[Member], int, int, "Rows | None"], Rows]


@dataclass(frozen=True)
class Scenario:
    name: str
    shards: int
    replicas: int
    nodes: int
    zones: int = 0

    def members(self) -> list[Member]:
        return [self.member(i) for i in range(self.nodes)]

    def member(self, i: int) -> Member:
        zone = f"zone-{i % self.zones}" if self.zones else ""
        return Member(f"node-{i:04d}", zone=zone)


SCENARIOS = [
    Scenario("S4096 R3 N10", 4096, 3, 10),
    Scenario("S4096 R3 N100", 4096, 3, 100),
    Scenario("S4096 R3 N10 3 zones", 4096, 3, 10, 3),
    Scenario("S4096 R3 N100 3 zones", 4096, 3, 100, 3),
    Scenario("S100000 R3 N1000", 100_000, 3, 1000),
]


def ids(members: list[Member]) -> list[str]:
    return [m.id for m in members]


def shardkeeper(members: list[Member], shards: int, replicas: int, previous: Rows | None) -> Rows:
    return place(previous, members, shards, replicas).replicas


ALGORITHMS: dict[str, tuple[Algorithm, bool]] = {
    # name -> (plan function, R=1 only)
    "shardkeeper": (shardkeeper, False),
    "seed-ring": (lambda m, s, r, _: baselines.seed_ring(ids(m), s, r), False),
    "vnode-ring": (lambda m, s, r, _: baselines.vnode_ring(ids(m), s, r), False),
    "uhashring": (lambda m, s, r, _: baselines.uhashring_ring(ids(m), s, r), False),
    "kazoo-partitioner": (lambda m, s, r, _: baselines.kazoo_partitioner(ids(m), s), True),
}


@dataclass(frozen=True)
class Timing:
    cpu: float  # CPU seconds of this process: what the computation costs
    wall: float  # elapsed seconds: the same on a quiet machine, more when others compete


def timed(fn: Callable[[], Rows]) -> tuple[Timing, Rows]:
    """Best of up to 3 runs (1 when a run takes over 0.5 s)."""
    cpu = wall = math.inf
    result: Rows = ()
    for _ in range(3):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        result = fn()
        cpu = min(cpu, time.process_time() - start_cpu)
        wall = min(wall, time.perf_counter() - start_wall)
        if wall > 0.5:
            break
    return Timing(cpu, wall), result


def balance(counts: Counter[str], nodes: int) -> float:
    total = sum(counts.values())
    return max(counts.values()) / (total / nodes) if total else 0.0


def moves(before: Rows, after: Rows) -> int:
    return sum(len(set(a) - set(b)) for b, a in zip(before, after, strict=True))


def zone_violations(rows: Rows, members: list[Member], replicas: int) -> int:
    zone = {m.id: m.zone or m.id for m in members}
    zones = len(set(zone.values()))
    cap = max(1, math.ceil(min(replicas, len(members)) / zones))
    return sum(1 for row in rows if row and max(Counter(zone[a] for a in row).values()) > cap)


def run(scenario: Scenario, name: str) -> dict:
    algorithm, r1_only = ALGORITHMS[name]
    replicas = 1 if r1_only else scenario.replicas
    members = scenario.members()
    shards = scenario.shards
    seconds, full = timed(lambda: algorithm(members, shards, replicas, None))
    gone = members[len(members) // 2]
    fewer = [m for m in members if m is not gone]
    remove_seconds, after_remove = timed(lambda: algorithm(fewer, shards, replicas, full))
    new = scenario.member(scenario.nodes)
    new = Member("node-new", zone=new.zone)
    more = [*members, new]
    add_seconds, after_add = timed(lambda: algorithm(more, shards, replicas, full))
    load = Counter(a for row in full for a in row)
    # The best max/mean any placement obeying the zone rule can reach (1 + rounding).
    fair = fair_shares(members, shards, replicas)
    best = max(math.ceil(f - 1e-9) for f in fair.values()) / (replicas * shards / len(members))
    return {
        "scenario": scenario.name,
        "algorithm": name,
        "shards": shards,
        "replicas": replicas,
        "nodes": scenario.nodes,
        "zones": scenario.zones,
        "balance": round(balance(load, scenario.nodes), 4),
        "primary_balance": round(balance(Counter(row[0] for row in full), scenario.nodes), 4),
        "moves_remove": moves(full, after_remove),
        "optimal_remove": load[gone.id],
        "moves_add": moves(full, after_add),
        "optimal_add": math.ceil(replicas * shards / (scenario.nodes + 1)),
        "zone_violations": zone_violations(full, members, replicas) if scenario.zones else 0,
        "seconds": round(seconds.cpu, 4),
        # Table only (left out of the JSON output).
        "_wall": seconds.wall,
        "_best": best,
        "_remove_seconds": remove_seconds.cpu,
        "_add_seconds": add_seconds.cpu,
    }


# -- churn ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Churn:
    name: str
    shards: int
    replicas: int
    nodes: tuple[int, int]  # members at the start: a random count in this range
    zones: tuple[int, ...]  # relative zone sizes; zone 0 holds a single member
    weights: tuple[float, ...]  # drawn from, with equal odds; () = log-uniform in (0.1, 100)
    changes: int
    unzoned: float = 0.0  # share of members without a zone
    round_robin: bool = False  # instead: member i in zone i mod len(zones), equal zones
    runs: int = 1  # independent sequences (random clusters and changes), calls pooled
    spike: bool = False  # instead: a member's weight jumps to 100 and back, in turn

    def weight(self, rnd: random.Random) -> float:
        return rnd.choice(self.weights) if self.weights else round(10 ** rnd.uniform(-1, 2), 2)

    def zone(self, rnd: random.Random, i: int) -> str:
        if self.round_robin:
            return f"z{i % len(self.zones)}"
        if rnd.random() < self.unzoned:
            return ""
        return f"z{rnd.choices(range(1, len(self.zones)), weights=self.zones[1:])[0]}"

    def sequence(self, seed: int) -> list[list[Member]]:
        """The member lists: the start, then one per change."""
        rnd = random.Random(f"{self.name}/{seed}")
        n = rnd.randint(*self.nodes)
        members = [Member("m0000", "z0", self.weight(rnd))]
        members += [Member(f"m{i:04d}", self.zone(rnd, i), self.weight(rnd)) for i in range(1, n)]
        out = [members]
        spiked = 0
        for step in range(self.changes):
            members = list(members)
            if self.spike:  # even steps raise a member's weight to 100, odd ones undo it
                if step % 2 == 0:
                    spiked = rnd.randrange(len(members))
                m = members[spiked]
                weight = 100.0 if step % 2 == 0 else self.weight(rnd)
                members[spiked] = Member(m.id, m.zone, weight, m.draining)
                out.append(members)
                continue
            kind = rnd.choice(["join", "leave", "drain", "undrain", "weight"])
            if kind == "join" or len(members) < 4:
                members.append(Member(f"j{step:04d}", self.zone(rnd, n + step), self.weight(rnd)))
            else:
                i = rnd.randrange(len(members))
                m = members[i]
                if kind == "leave":
                    del members[i]
                else:
                    draining = {"drain": True, "undrain": False}.get(kind, m.draining)
                    weight = self.weight(rnd) if kind == "weight" else m.weight
                    members[i] = Member(m.id, m.zone, weight, draining)
            out.append(members)
        return out


CHURNS = [
    # The issue's class: 10-16 members, weights 1, 2 and 4, a zone of one member and a zone
    # with more weight than its cap (one replica per shard) lets it use.
    Churn(
        "S4096 R3 N10-16 w1,2,4 zones 1/8/2/2",
        4096,
        3,
        (10, 16),
        (1, 8, 2, 2),
        (1, 2, 4),
        60,
        runs=4,
    ),
    Churn(
        "S4096 R3 N10-16 w1,2,4 zones 1/3/1", 4096, 3, (10, 16), (1, 3, 1), (1, 2, 4), 60, runs=4
    ),
    Churn(
        "S4096 R3 N60-100 w0.1-100 uneven",
        4096,
        3,
        (60, 100),
        (1, 20, 8, 4, 2),
        (),
        60,
        0.1,
        runs=2,
    ),
    Churn("S4096 R3 N100 equal, 3 zones", 4096, 3, (100, 100), (1, 1, 1), (1.0,), 60, 0, True),
    Churn(
        "S100000 R3 N1000 w0.1-100 uneven", 100_000, 3, (900, 1000), (1, 20, 8, 4, 2), (), 50, 0.1
    ),
    Churn(
        "S100000 R3 N1000 equal, 3 zones", 100_000, 3, (1000, 1000), (1, 1, 1), (1.0,), 50, 0, True
    ),
    # The largest single change: one of 1,000 members at weight 0.1 goes to 100 (its share
    # from 300 replicas to about 84,000) and back, four times.
    Churn(
        "S100000 R3 N1000 w0.1, one to 100",
        100_000,
        3,
        (1000, 1000),
        (1,) * 5,
        (0.1,),
        8,
        round_robin=True,
        spike=True,
    ),
]


class Capped(Exception):
    """A baseline call ran out of its CPU-time cap."""


def _capped(*_args: object) -> None:
    raise Capped


def call_capped(fn: Callable[[], object], cap: float) -> tuple[float, object | None]:
    """CPU seconds of fn() and its result; (cap, None) when it needs more than `cap`."""
    previous = signal.signal(signal.SIGPROF, _capped)
    start = time.process_time()
    try:
        signal.setitimer(signal.ITIMER_PROF, cap)
        try:
            result = fn()
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
    except Capped:
        return cap, None
    finally:
        signal.signal(signal.SIGPROF, previous)
    return time.process_time() - start, result


def lower_bound(before: Rows, members: list[Member], shards: int, replicas: int) -> int:
    live = {m.id for m in members if not m.draining}
    held = Counter(a for row in before for a in row)
    fair = fair_shares(members, shards, replicas)
    short = sum(max(0, math.floor(fair[a] + 1e-7) - held[a]) for a in live)
    orphaned = sum(n for a, n in held.items() if a not in live)
    return max(short, orphaned if len(live) >= replicas else 0)


def churn_run(sc: Churn, engine: ModuleType | None, cap: float) -> dict:
    """One engine (None: this one) through the scenario's sequences."""
    this = place

    def plan(previous: Rows | None, members: list[Member]) -> Rows:
        if engine is None:
            return this(previous, members, sc.shards, sc.replicas).replicas
        theirs = [engine.Member(m.id, m.zone, m.weight, m.draining) for m in members]
        return engine.place(previous, theirs, sc.shards, sc.replicas).replicas

    full: list[float] = []
    seconds: list[float] = []
    capped = moved = bound = outside = 0
    ratio = 0.0
    for run in range(sc.runs):
        sequence = sc.sequence(run)
        spent, rows = call_capped(lambda s=sequence: plan(None, s[0]), 600.0)  # noqa: B023
        full.append(spent)
        for members in sequence[1:]:
            spent, after = call_capped(lambda m=members: plan(rows, m), cap)  # noqa: B023
            if after is None:
                capped += 1
                after = this(rows, members, sc.shards, sc.replicas).replicas
            seconds.append(spent)
            moved += moves(rows, after)
            bound += lower_bound(rows, members, sc.shards, sc.replicas)
            fair = fair_shares(members, sc.shards, sc.replicas)
            load = Counter(a for row in after for a in row)
            for m in members:
                f, n = fair[m.id], load[m.id]
                outside = max(outside, n - math.ceil(f - 1e-7), math.floor(f + 1e-7) - n)
                if f > 0:
                    ratio = max(ratio, n / math.ceil(f - 1e-7))
            rows = after
    return {
        "scenario": sc.name,
        "engine": "before issue 11" if engine is not None else "shardkeeper",
        "shards": sc.shards,
        "replicas": sc.replicas,
        "runs": sc.runs,
        "calls": len(seconds),
        "full_s": round(max(full), 4),
        "p50_s": round(percentile(seconds, 50), 4),
        "p99_s": round(percentile(seconds, 99), 4),
        "max_s": round(max(seconds), 4),
        "capped": capped,
        "outside": outside,
        "max_over_ceil": round(ratio, 4),
        "moves": moved,
        "lower_bound": bound,
    }


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def churn_table(rows: list[dict]) -> str:
    head = (
        f"{'scenario':<38} {'engine':<16} {'calls':>5} {'full s':>7} {'p50 s':>7} "
        f"{'p99 s':>7} {'max s':>7} {'capped':>6} {'outside':>7} {'max/ceil':>8} "
        f"{'moves/bound':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        mb = f"{r['moves']}/{r['lower_bound']}"
        ratio = r["moves"] / r["lower_bound"] if r["lower_bound"] else 1.0
        lines.append(
            f"{r['scenario']:<38} {r['engine']:<16} {r['calls']:>5} {r['full_s']:>7.3f} "
            f"{r['p50_s']:>7.3f} {r['p99_s']:>7.3f} {r['max_s']:>7.3f} {r['capped']:>6} "
            f"{r['outside']:>7} {r['max_over_ceil']:>8.3f} {mb:>10} {ratio:>4.2f}"
        )
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = (
        f"{'scenario':<22} {'algorithm':<18} {'R':>1} {'balance':>7} {'(best)':>6} {'primary':>7} "
        f"{'remove moves/opt':>17} {'add moves/opt':>17} {'zone viol':>9} "
        f"{'full s':>7} {'(wall)':>7} {'remove s':>8} {'add s':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        rm = f"{r['moves_remove']}/{r['optimal_remove']}"
        add = f"{r['moves_add']}/{r['optimal_add']}"
        rm_ratio = r["moves_remove"] / r["optimal_remove"] if r["optimal_remove"] else 0.0
        add_ratio = r["moves_add"] / r["optimal_add"]
        lines.append(
            f"{r['scenario']:<22} {r['algorithm']:<18} {r['replicas']:>1} {r['balance']:>7.3f} "
            f"{r['_best']:>6.3f} {r['primary_balance']:>7.3f} {rm:>11} {rm_ratio:>5.2f} "
            f"{add:>11} {add_ratio:>5.2f} "
            f"{r['zone_violations']:>9} {r['seconds']:>7.3f} {r['_wall']:>7.3f} "
            f"{r['_remove_seconds']:>8.3f} {r['_add_seconds']:>7.3f}"
        )
    return "\n".join(lines)


def machine() -> str:
    return (
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} cores, {platform.machine()} {platform.system()}"
    )


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.placement", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--quick", action="store_true", help="skip the S=100,000 / N=1,000 scenarios"
    )
    parser.add_argument("--part", choices=["all", "hash", "churn", "mass"], default="all")
    parser.add_argument(
        "--baseline",
        default=baselines.ENGINE_BEFORE_ISSUE_11,
        help="git revision whose coordinator/placement.py is the churn baseline ('none': skip)",
    )
    parser.add_argument(
        "--cap", type=float, default=5.0, help="CPU seconds a baseline call may take"
    )
    parser.add_argument(
        "--mass-baseline",
        default=placement_mass.BEFORE,
        help="git revision whose coordinator/placement runs the mass part beside this one "
        "('none': skip)",
    )
    args = parser.parse_args(argv)
    load_start = load_average()
    hash_rows, churn_rows = [], []
    for scenario in SCENARIOS if args.part in ("all", "hash") else ():
        if args.quick and scenario.shards > 10_000:
            continue
        for name in ALGORITHMS:
            hash_rows.append(run(scenario, name))
            if not args.json:
                print(f"  done: {scenario.name} / {name}", file=sys.stderr)
    baseline = None
    if args.part in ("all", "churn") and args.baseline != "none":
        baseline = baselines.engine_at(args.baseline, Path(__file__).resolve().parents[1])
    for sc in CHURNS if args.part in ("all", "churn") else ():
        if args.quick and sc.shards > 10_000:
            continue
        for engine in (None, baseline) if baseline is not None else (None,):
            churn_rows.append(churn_run(sc, engine, args.cap))
            if not args.json:
                print(f"  done: {sc.name} / {churn_rows[-1]['engine']}", file=sys.stderr)
    mass_rows = []
    if args.part in ("all", "mass") and not args.quick:
        baseline_rev = None if args.mass_baseline == "none" else args.mass_baseline
        mass_rows = placement_mass.run(baseline_rev, progress=not args.json)
    load_end = load_average()
    if args.json:
        doc = {
            "machine": machine(),
            "load_average": [load_start, load_end],
            "hash": [{k: v for k, v in r.items() if not k.startswith("_")} for r in hash_rows],
            "churn": churn_rows,
            "mass": mass_rows,
        }
        print(json.dumps(doc))
        return 0
    print(
        f"python -m bench.placement  ({machine()}, load average {load_start:.1f} at the start, "
        f"{load_end:.1f} at the end)"
    )
    if hash_rows:
        print(
            "balance = max/mean replicas per node; (best) = the least max/mean the zone rule "
            "allows;\nfull s = CPU seconds of the full plan, best of up to 3 runs, (wall) = its "
            "elapsed time;\nremove s, add s = CPU seconds of the plan after one change"
        )
        print(table(hash_rows))
    if churn_rows:
        if hash_rows:
            print()
        print(
            "churn: one place() per change, CPU seconds per call; outside = most replicas "
            "outside floor/ceil\nof the fair share; moves/bound = moves over the lower bound; "
            f"capped = baseline calls stopped at {args.cap:g} CPU s"
        )
        print(churn_table(churn_rows))
    if mass_rows:
        if hash_rows or churn_rows:
            print()
        print(
            "mass: the largest single changes, one place() call each; CPU s = best of up to 3 "
            "runs,\neach engine in a child process of its own, alternating; outside = most "
            "replicas outside floor/ceil"
        )
        print(placement_mass.table(mass_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
