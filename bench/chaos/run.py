"""One chaos run, start to finish: network, fleet, data, workload, nemesis, healing,
convergence, the final reads, the checker and the report.

Everything made is removed in ``finally`` blocks (processes, namespaces, the tmpfs), and
what an earlier run that died left behind is swept first.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.chaos import disk, net
from bench.chaos.checker import UNREADABLE, Op, Verdict, check, write_gaps
from bench.chaos.fleet import Fleet, FleetOptions, start_fleet, tail
from bench.chaos.nemesis import FAULTS, KINDS, Nemesis, Record, schedule
from bench.chaos.workload import Workload, WorkloadOptions, final_values
from bench.common import machine, shielded, unsettled
from shardkeeper import admin
from shardkeeper import cluster as clusterstate
from shardkeeper.cli.data import load_key, load_value
from shardkeeper.client import DataClient
from shardkeeper.layout import AuditEvent
from shardkeeper.poll import poll_until
from shardkeeper.token import read_token
from shardkeeper.vocab import ShardState
from shardkeeper.zk import close, connect


@dataclass(frozen=True)
class RunOptions:
    seed: int = 1
    duration: float = 60.0  # seconds of faults
    kinds: tuple[str, ...] = KINDS
    every_kind: bool = True
    mean_gap: float = 4.0
    max_active: int = 3
    quorum_span: tuple[float, float] | None = None
    preload_keys: int = 40_000  # of preload_value bytes: a few MB per shard
    preload_value: int = 1000
    converge_timeout: float = 180.0
    fleet: FleetOptions = field(default_factory=FleetOptions)
    workload: WorkloadOptions = field(default_factory=WorkloadOptions)
    keep: bool = False


STARTED = time.monotonic()


def progress(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} +{time.monotonic() - STARTED:5.0f}s {message}",
          file=sys.stderr, flush=True)


@dataclass
class Sample:
    at: float
    healthy: bool | None  # None: could not read the cluster
    reason: str = ""
    maintenance: bool = False
    load: float = 0.0  # the machine's 1-minute load average then


class Monitor(threading.Thread):
    """Samples the cluster twice a second: settled or not, in maintenance or not; and
    notices processes that exit on their own."""

    def __init__(self, fleet: Fleet, clock: float):
        super().__init__(name="monitor", daemon=True)
        self.fleet = fleet
        self.clock = clock
        self.samples: list[Sample] = []
        self.events: list[AuditEvent] = []  # the leader's audit log, kept as it is trimmed
        self._last_event = ""
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.fleet.check_exits()
            at = time.monotonic() - self.clock
            load = os.getloadavg()[0]
            try:
                reason = unsettled(self.fleet.client, self.fleet.paths,
                                   self.fleet.opts.replicas, self.fleet.live_agents())
                paused = admin.maintenance(self.fleet.client, self.fleet.paths) is not None
                self.samples.append(Sample(at, not reason, reason, paused, load))
                self.read_events()
            except Exception as exc:  # noqa: BLE001 - ZooKeeper down: a gap in the samples
                self.samples.append(Sample(at, None, type(exc).__name__, load=load))
            self.halt.wait(0.5)  # the sampling period

    def settled_now(self) -> bool:
        """The latest sample found the cluster settled (no copy running, every replica in
        sync): a fault that must run alone starts only then, so that the churn after it
        is its own and not the tail of the fault before (a drain's undrain, say)."""
        samples = self.samples
        return bool(samples) and samples[-1].healthy is True

    def read_events(self) -> None:
        for name, event in admin.events(self.fleet.client, self.fleet.paths, self._last_event):
            self.events.append(event)
            self._last_event = name

    def events_between(self, kind: str, a: float, b: float) -> list[AuditEvent]:
        return [e for e in self.events if e.kind == kind and a <= e.time <= b]

    def healthy_after(self, t: float) -> float | None:
        return next((s.at for s in self.samples if s.at >= t and s.healthy), None)

    def maintenance_between(self, a: float, b: float) -> bool:
        return any(s.maintenance for s in self.samples if a <= s.at <= b)


@dataclass
class KindReport:
    count: int = 0
    worst_gap_s: float = 0.0  # longest window without an acknowledged write, overlapping
    worst_read_gap_s: float = 0.0  # longest window without a successful read, overlapping
    worst_write_s: float = 0.0  # slowest acknowledged write invoked during the fault
    unknown_writes: int = 0  # writes invoked during the fault with no known outcome
    recovery_s: list[float] = field(default_factory=list)  # end -> settled, faults alone
    # Churn the fault caused, from the audit log (during it and for 20 s after; for a fault
    # that runs alone, only until the next fault starts): members the leader saw leave,
    # copies it started.
    departures: int = 0
    copies: int = 0
    notes: list[str] = field(default_factory=list)


CHURN_WINDOW = 20.0


def _copies_started(message: str) -> int:
    """N in a plan event's "generation G: N copies started, ..." (0 if absent)."""
    m = re.search(r"(\d+) copies started", message)
    return int(m.group(1)) if m else 0


def churn_until(r: Record, records: list[Record]) -> float:
    """The end of the window whose churn is put down to ``r`` (wall clock)."""
    end = (r.wall_end or r.wall_start) + CHURN_WINDOW
    if FAULTS[r.kind].exclusive and r.wall_end:
        # Nothing else ran meanwhile: what happens before the next fault is r's alone.
        later = [o.wall_start for o in records if o.wall_start >= r.wall_end]
        end = min([end, *later])
    return end


def per_kind(records: list[Record], ops: list[Op], monitor: Monitor, start: float,
             end: float) -> dict[str, KindReport]:
    gaps = write_gaps(ops, start, end)
    read_gaps = write_gaps(ops, start, end, reads=True)
    writes = [op for op in ops if op.is_write]
    out: dict[str, KindReport] = defaultdict(KindReport)
    for r in records:
        report = out[r.kind]
        report.count += 1
        r_end = r.end if r.end is not None else end
        for a, b in gaps:
            if a <= r_end and b >= r.start:
                report.worst_gap_s = max(report.worst_gap_s, b - a)
        for a, b in read_gaps:
            if a <= r_end and b >= r.start:
                report.worst_read_gap_s = max(report.worst_read_gap_s, b - a)
        during = [w for w in writes if r.start <= w.invoke <= r_end]
        for w in during:
            if w.outcome == "ok":
                report.worst_write_s = max(report.worst_write_s, w.complete - w.invoke)
            elif w.outcome == "unknown":
                report.unknown_writes += 1
        healthy = monitor.healthy_after(r_end)
        alone = healthy is not None and not any(
            o is not r and o.start <= healthy and (o.end or end) >= r.start
            for o in records)
        if alone:
            report.recovery_s.append(round(healthy - r_end, 2))
        churn_end = churn_until(r, records)
        report.departures += len(monitor.events_between("member-left", r.wall_start, churn_end))
        report.copies += sum(_copies_started(e.message)
                             for e in monitor.events_between("plan", r.wall_start, churn_end))
        if r.kind == "mass-departure":
            tripped = monitor.maintenance_between(r.start, r_end + 5)
            report.notes.append("maintenance entered" if tripped else "maintenance NOT entered")
        if r.error:
            report.notes.append(r.error)
    return dict(out)


_ERROR_LINE = re.compile(r"^\S+ ERROR ")  # the roles' format: time, level, logger


def load_figures(monitor: Monitor) -> dict[str, float]:
    """The machine's load average over the run (other work shares the two cores)."""
    loads = [s.load for s in monitor.samples]
    if not loads:
        return {}
    return {"load_min": round(min(loads), 2), "load_mean": round(sum(loads) / len(loads), 2),
            "load_max": round(max(loads), 2)}


def scan_logs(log_dir: Path) -> dict[str, Any]:
    """Tracebacks and ERROR lines in the role logs (noise hides real errors)."""
    tracebacks: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for path in sorted(log_dir.glob("*.log")):
        if path.name.startswith("zk"):
            continue
        text = path.read_text(errors="replace")
        tracebacks[path.stem] += text.count("Traceback (most recent call last)")
        for line in text.splitlines():
            if _ERROR_LINE.match(line):
                errors[path.stem] += 1
                key = re.sub(r"\d+", "N", line.split(" ERROR ", 1)[1])[:120]
                examples.setdefault(key, line[:300])
    return {"tracebacks": sum(tracebacks.values()), "error_lines": sum(errors.values()),
            "by_process": {k: {"tracebacks": tracebacks[k], "errors": errors[k]}
                           for k in sorted(set(tracebacks) | set(errors))
                           if tracebacks[k] or errors[k]},
            "error_examples": list(examples.values())[:10]}


def stuck(fleet: Fleet) -> list[str]:
    """Replicas in ERROR, copies in flight, replicas still catching up."""
    found = []
    plan = clusterstate.read_plan(fleet.client, fleet.paths)
    for shard, p in enumerate(plan.shards):
        for agent, source in p.bootstrapping:
            found.append(f"shard {shard}: {agent} still copying from {source}")
    for agent, status in sorted(clusterstate.read_statuses(fleet.client, fleet.paths).items()):
        for shard, st in sorted(status.shards.items()):
            if st.state in (ShardState.ERROR, ShardState.BOOTSTRAPPING) or st.catching_up:
                found.append(f"{agent} shard {shard}: {st.state}"
                             f"{' catching up' if st.catching_up else ''} {st.reason}".strip())
    return found


def preload(fleet: Fleet, opts: RunOptions) -> None:
    done = fleet.cli("load", "--keys", str(opts.preload_keys), "--value-size",
                     str(opts.preload_value), timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"load failed: {done.stderr.strip()[-500:]}")


def preload_lost(fleet: Fleet, opts: RunOptions, token: str, every: int = 40) -> list[str]:
    """Preloaded keys (never written again) that no longer read back right; a sample."""
    zk = connect(fleet.target, session_timeout=10.0)
    try:
        kv = DataClient(zk, fleet.paths, token, deadline=30.0)
        wrong = []
        for i in range(0, opts.preload_keys, every):
            key = load_key(i)
            try:
                if kv.get(key) != load_value(key, opts.preload_value):
                    wrong.append(key.decode())
            except Exception as exc:  # noqa: BLE001 - unreadable counts as not there
                wrong.append(f"{key.decode()} ({type(exc).__name__})")
        return wrong
    finally:
        close(zk)


def run(opts: RunOptions) -> dict[str, Any]:
    swept = net.sweep()
    swept_mounts = disk.sweep()
    root = Path(tempfile.mkdtemp(prefix=f"shardkeeper-chaos-{os.getpid()}-"))
    network = net.Network()
    fleet: Fleet | None = None
    try:
        network.up()
        progress(f"network 10.{network.octet}.0.0/16 in namespaces {network.tag}-*"
                 + (f" (swept runs {swept}, mounts {swept_mounts})" if swept or swept_mounts
                    else ""))
        fleet = start_fleet(root, opts.fleet, network, progress)
        return _run(fleet, opts, root)
    finally:
        with shielded():  # a second Ctrl-C must not leave namespaces or mounts behind
            if fleet is not None:
                fleet.close()
            network.down()
            if opts.keep:
                progress(f"kept {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)


def _run(fleet: Fleet, opts: RunOptions, root: Path) -> dict[str, Any]:
    t_load = time.monotonic()
    preload(fleet, opts)
    progress(f"loaded {opts.preload_keys} keys of {opts.preload_value} B in"
             f" {time.monotonic() - t_load:.1f}s")
    poll_until(lambda: clusterstate.settled(fleet.client, fleet.paths, set(fleet.agents)), 120,
               "the cluster to settle after the load")
    token = read_token(fleet.client, fleet.paths)
    assert token is not None
    clock = time.monotonic()
    plan = schedule(opts.seed, opts.duration, opts.kinds, opts.every_kind, opts.mean_gap,
                    opts.quorum_span)
    monitor = Monitor(fleet, clock)
    workload = Workload(opts.seed, fleet.target, fleet.paths, token, opts.workload, clock)
    nemesis = Nemesis(fleet, plan, opts.seed, clock, opts.max_active,
                      settled=monitor.settled_now)
    monitor.start()
    workload.start()
    try:
        time.sleep(3.0)  # a baseline of writes before the first fault (a schedule pause)
        start = time.monotonic() - clock
        nemesis.start()
        progress(f"nemesis: {len(plan)} faults planned over {opts.duration:g}s")
        nemesis.join(opts.duration * 3 + 120)
    finally:
        nemesis.stop()
    healed = time.monotonic() - clock
    progress(f"faults over at +{healed:.1f}s: {Counter(r.kind for r in nemesis.records)}")
    live = set(fleet.live_agents())
    converge_s: float | None = None
    reason = ""
    try:
        time.sleep(5.0)  # writes keep coming for a while after healing (a schedule pause)
        workload.stop()

        def settled() -> bool:
            nonlocal reason
            live.clear()
            live.update(fleet.live_agents())
            reason = unsettled(fleet.client, fleet.paths, opts.fleet.replicas, live)
            return not reason

        poll_until(settled, opts.converge_timeout, "the cluster to converge", interval=0.5)
        converge_s = round(time.monotonic() - clock - healed, 2)
        progress(f"converged {converge_s}s after the faults ended")
    except Exception as exc:  # noqa: BLE001 - reported, the run goes on to check
        progress(f"did not converge: {exc} ({reason})")
    finally:
        workload.stop()
        monitor.halt.set()
        monitor.join(10)
    verify = fleet.cli("verify", timeout=300)
    verify_ok = verify.returncode == 0
    if not verify_ok:
        progress(f"verify failed:\n{verify.stdout[-2000:]}{verify.stderr[-1000:]}")
    stuck_now = stuck(fleet)
    ops = workload.ops()
    final = final_values(fleet.target, fleet.paths, token, opts.workload.keys)
    verdict = check(ops, final)
    if opts.keep:  # for a post-mortem: every operation, and the final values
        with open(root / "history.jsonl", "w") as f:
            for op in ops:
                f.write(json.dumps(asdict(op)) + "\n")
        (root / "final.json").write_text(json.dumps(
            {k: (v if v is not UNREADABLE else "<unreadable>") for k, v in final.items()}))
    lost_preload = preload_lost(fleet, opts, token)
    fleet.check_exits()
    kinds = per_kind(nemesis.records, ops, monitor, start, healed)
    gaps = write_gaps(ops, start, healed)
    read_gaps = write_gaps(ops, start, healed, reads=True)
    with contextlib.suppress(Exception):
        monitor.read_events()
    report = summary(opts, verdict, nemesis, kinds, gaps, read_gaps, converge_s, verify_ok,
                     stuck_now, fleet, lost_preload, workload, root, reason, monitor)
    return report


def summary(opts: RunOptions, verdict: Verdict, nemesis: Nemesis,
            kinds: dict[str, KindReport], gaps: list[tuple[float, float]],
            read_gaps: list[tuple[float, float]],
            converge_s: float | None, verify_ok: bool, stuck_now: list[str], fleet: Fleet,
            lost_preload: list[str], workload: Workload, root: Path, reason: str,
            monitor: Monitor) -> dict[str, Any]:
    lost = verdict.lost_count + len(lost_preload)
    events = Counter(e.kind for e in monitor.events)
    report: dict[str, Any] = {
        "seed": opts.seed,
        "duration_s": opts.duration,
        "ops": verdict.ops,
        "acked": verdict.acked,
        "lost": lost,
        "unknown": verdict.unknown,
        "failed": verdict.failed,
        "reads": verdict.reads,
        "stale_reads": len(verdict.stale_reads),
        "faults": dict(sorted(Counter(r.kind for r in nemesis.records).items())),
        "converged": converge_s is not None,
        "converge_s": converge_s,
        "verify_ok": verify_ok,
        "stuck_replicas": len(stuck_now),
        "unexpected_exits": len(fleet.unexpected),
        "longest_write_gap_s": round(max((b - a for a, b in gaps), default=0.0), 2),
        "longest_read_gap_s": round(max((b - a for a, b in read_gaps), default=0.0), 2),
        "per_kind": {k: {**asdict(v), "worst_gap_s": round(v.worst_gap_s, 2),
                         "worst_read_gap_s": round(v.worst_read_gap_s, 2),
                         "worst_write_s": round(v.worst_write_s, 2)}
                     for k, v in sorted(kinds.items())},
        "details": {
            "lost_writes": [f"{a.key}: {a.what}" for a in verdict.lost[:20]],
            "unexplained": [f"{a.key}: {a.what}" for a in verdict.unexplained[:20]],
            "lost_preload": lost_preload[:20],
            "stale_reads": [f"{a.key}: {a.what}" for a in verdict.stale_reads[:20]],
            "unreadable_keys": verdict.unreadable[:20],
            "stuck": stuck_now[:20],
            "unexpected_exits": fleet.unexpected[:20],
            "skipped_faults": nemesis.skipped[:20],
            # Every fault as it happened, beside the leader's log (wall) and the history
            # (run clock), for a post-mortem of what the tables charge to a kind.
            "fault_log": [{"kind": r.kind, "start": round(r.start, 2),
                           "end": None if r.end is None else round(r.end, 2),
                           "wall_start": round(r.wall_start, 3),
                           "wall_end": round(r.wall_end, 3), "targets": list(r.targets)}
                          for r in nemesis.records],
            "fault_errors": [f"{r.kind}: {r.error}" for r in nemesis.records if r.error],
            "unconverged_reason": reason if converge_s is None else "",
            "client_errors": workload.errors(),
            "audit_events": dict(sorted(events.items())),
            "logs": scan_logs(root / "logs"),
            "agents": len(fleet.agents),
        },
        "machine": {**machine(), **load_figures(monitor)},
    }
    report["ok"] = (lost == 0 and report["stale_reads"] == 0 and report["converged"]
                    and verify_ok and not stuck_now and not fleet.unexpected)
    if not report["ok"]:
        for name in sorted({n.split()[0] for n in fleet.unexpected}):
            progress(f"{name} log tail:\n{tail(root / 'logs' / f'{name}.log')}")
    return report
