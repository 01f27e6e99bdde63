"""`python -m bench.rolling [--json]`: a rolling restart under a live client load.

A cluster of ``--agents`` agents (session timeout T = ``--session-timeout``, 10 s by
default) and two coordinator candidates on a throw-away ZooKeeper holds ``--shards``
shards at R = ``--replicas``, preloaded with ``--keys`` keys. ``--clients`` client threads
(one shared ``DataClient``, the product's client library with its own retries) each put a
new key and read back one they wrote before, ``--rate`` times a second, from before the
first restart to after the last. After ``--before`` seconds of that load, every agent in
turn gets SIGTERM, is started again with the same id and data dir, and the next one goes
once the cluster has settled again (every shard R replicas in sync on the planned agents,
no copy in flight, every status matching the plan: ``cluster.settled``).

A rolling restart is run twice, each on a fresh cluster, unless ``--mode`` says otherwise:
first the **baseline**, agents started with the hand-off disabled
(``SHARDKEEPER_HANDOFF_TIMEOUT=0``: SIGTERM closes the session at once, as before issue
14), then with the hand-off. On code without a hand-off the two are the same.

Figures per run: ``ops`` (puts and gets issued), ``failed_ops`` (operations that raised
after the client library's own retries, its 20 s deadline), ``wrong_reads`` (a get that
returned something other than the last acknowledged value), ``max_write_stall_s`` (the
longest single put, retries included, over the whole run), write p50/p99 in the ``--before``
seconds before the first SIGTERM and from it to the last agent's return to a settled
cluster (``*_before``, ``*_during``), ``lost_writes`` (acknowledged puts, all of them,
read back at the end with another value or none), and per restart how long the agent took
to exit after SIGTERM and the cluster to settle after its new start.

``--rebalance-delay`` (60 s by default) is the operator's setting for a rolling restart
(README, Operations: a reboot comes back to its data): a departed agent's replicas wait
for it instead of being copied elsewhere, and it catches up when it returns. 0 measures
the product's default instead, where every restart re-homes the agent's replicas.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

import click
from kazoo.client import KazooClient

from bench.common import (
    BenchTimeout,
    RoleDied,
    Workspace,
    agent_argv,
    coordinator_argv,
    init_argv,
    machine,
    percentile,
    progress,
    rounded,
    table,
    workspace,
)
from shardkeeper import admin
from shardkeeper import cluster as clusterstate
from shardkeeper.client import DataClient, DataError
from shardkeeper.layout import Paths
from shardkeeper.poll import poll_until
from shardkeeper.zk import close, connect, ensure_layout

CANDIDATES = ("c1", "c2")
HANDOFF_ENV = "SHARDKEEPER_HANDOFF_TIMEOUT"
GOAL_STALL_S = 0.5
@dataclass(frozen=True)
class Options:
    agents: int
    shards: int
    replicas: int
    session_timeout: float
    clients: int
    rate: float
    keys: int
    value_size: int
    before: float
    rebalance_delay: float
    settle_timeout: float
    seed: int


@dataclass(frozen=True)
class Op:
    kind: str  # "put" or "get"
    start: float  # wall clock
    seconds: float
    ok: bool


@dataclass(frozen=True)
class Restart:
    agent: str
    exit_s: float  # SIGTERM to the process gone
    exit_code: int | None
    settled_s: float  # new start to the cluster settled again


class Clients:
    """``n`` threads, each a put of a fresh key and a get of an earlier one, paced."""

    def __init__(self, kv: DataClient, n: int, rate: float, value_size: int, seed: int):
        self.kv = kv
        self.rate = rate
        self.value = b"w" * value_size
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.ops: list[Op] = []
        self.acked: dict[bytes, bytes] = {}
        self.wrong_reads: list[str] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i, seed + i), daemon=True,
                                         name=f"client-{i}") for i in range(n)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.halt.set()
        for t in self.threads:
            t.join(60)

    def _timed(self, kind: str, fn: Any) -> tuple[bool, Any]:
        t0, w0 = time.perf_counter(), time.time()
        try:
            result, ok = fn(), True
        except DataError as exc:
            result, ok = None, False
            with self.lock:
                self.errors.append(f"{kind}: {exc}")
        with self.lock:
            self.ops.append(Op(kind, w0, time.perf_counter() - t0, ok))
        return ok, result

    def _run(self, index: int, seed: int) -> None:
        rng = random.Random(seed)
        mine: list[tuple[bytes, bytes]] = []
        period = 1.0 / self.rate
        due = time.monotonic()
        i = 0
        while not self.halt.is_set():
            key = f"c{index}-{i:08d}".encode()
            value = self.value + str(i).encode()
            i += 1
            ok, _ = self._timed("put", lambda k=key, v=value: self.kv.put(k, v))
            if ok:
                mine.append((key, value))
                with self.lock:
                    self.acked[key] = value
            if mine:
                old_key, old_value = mine[rng.randrange(len(mine))]
                ok, got = self._timed("get", lambda k=old_key: self.kv.get(k))
                if ok and got != old_value:
                    with self.lock:
                        self.wrong_reads.append(f"{old_key!r}: got {got!r:.40}")
            due = max(due + period, time.monotonic())
            self.halt.wait(max(0.0, due - time.monotonic()))


class RollingCluster:
    def __init__(self, ws: Workspace, opts: Options, name: str, handoff: bool):
        self.ws, self.opts, self.name, self.handoff = ws, opts, name, handoff
        self.paths = Paths(name)
        self.agents = [f"{name}-a{i}" for i in range(opts.agents)]
        self.client: KazooClient = connect(ws.target, session_timeout=10.0)
        ensure_layout(self.client, self.paths)

    def env(self) -> dict[str, str]:
        # Read by the agent; ignored by code without a hand-off (then both runs are alike).
        return {} if self.handoff else {HANDOFF_ENV: "0"}

    def start_agent(self, agent: str) -> None:
        argv = agent_argv(self.ws.hosts, self.name, agent, self.ws.root / self.name / agent,
                          self.opts.session_timeout)
        self.ws.procs.start(agent, argv, env=self.env())

    def start(self) -> None:
        subprocess.run(init_argv(self.ws.hosts, self.name, self.opts.shards, self.opts.replicas),
                       check=True, capture_output=True)
        admin.set_config(self.client, self.paths,
                         {"rebalance_delay": str(self.opts.rebalance_delay)})
        for c in CANDIDATES:
            self.ws.procs.start(f"{self.name}-{c}", coordinator_argv(
                self.ws.hosts, self.name, f"{self.name}-{c}", self.opts.session_timeout))
        for agent in self.agents:
            self.start_agent(agent)
        self.wait_settled("the first plan to be held")

    def check(self) -> None:
        self.ws.procs.check()

    def wait_settled(self, what: str) -> float:
        t0 = time.monotonic()
        poll_until(lambda: self.check() or clusterstate.settled(
            self.client, self.paths, set(self.agents)), self.opts.settle_timeout, what,
            interval=0.1, error=BenchTimeout)
        return time.monotonic() - t0

    def preload(self, kv: DataClient) -> None:
        items = ((f"pre-{i:08d}".encode(), b"p" * self.opts.value_size)
                 for i in range(self.opts.keys))
        for shard, batch in kv.by_shard(items).items():
            kv.put_batch(shard, batch)

    def restart(self, agent: str) -> Restart:
        proc = self.ws.procs.running.pop(agent)
        t0 = time.monotonic()
        proc.terminate()
        try:
            code: int | None = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            code = None
        exit_s = time.monotonic() - t0
        t1 = time.monotonic()
        self.start_agent(agent)
        self.wait_settled(f"the cluster to settle after {agent} restarted")
        return Restart(agent, exit_s, code, time.monotonic() - t1)

    def close(self) -> None:
        close(self.client)


def lost_writes(kv: DataClient, acked: dict[bytes, bytes]) -> list[str]:
    lost = []
    for key, value in acked.items():
        try:
            got = kv.get(key)
        except DataError as exc:
            lost.append(f"{key!r}: {exc}")
            continue
        if got != value:
            lost.append(f"{key!r}: read {got!r:.40}")
    return lost


def ms(values: list[float], q: float) -> float | None:
    p = percentile(values, q)
    return None if p is None else round(p * 1000, 2)


def summarize(ops: list[Op], during: tuple[float, float], before: tuple[float, float]
              ) -> dict[str, Any]:
    def writes(lo: float, hi: float) -> list[float]:
        return [o.seconds for o in ops if o.kind == "put" and o.ok and lo <= o.start < hi]

    wb, wd = writes(*before), writes(*during)
    puts = [o.seconds for o in ops if o.kind == "put"]
    reads = [o.seconds for o in ops if o.kind == "get" and o.ok]
    return {
        "ops": len(ops),
        "failed_ops": sum(not o.ok for o in ops),
        "max_write_stall_s": rounded(max(puts, default=0.0), 3),
        "write_p50_ms_before": ms(wb, 50),
        "write_p99_ms_before": ms(wb, 99),
        "write_p50_ms_during": ms(wd, 50),
        "write_p99_ms_during": ms(wd, 99),
        "read_p50_ms": ms(reads, 50),
        "read_p99_ms": ms(reads, 99),
        "writes_before": len(wb),
        "writes_during": len(wd),
        # When the slowest operations started (wall clock), to read against the logs.
        "slowest": [
            [time.strftime("%H:%M:%S", time.localtime(o.start)) + f".{int(o.start % 1 * 1000):03d}",
             o.kind, round(o.seconds, 3), o.ok]
            for o in sorted(ops, key=lambda o: -o.seconds)[:10]
        ],
    }


def rolling_run(ws: Workspace, opts: Options, handoff: bool, name: str) -> dict[str, Any]:
    started = time.monotonic()
    label = "with hand-off" if handoff else "baseline, hand-off disabled"
    progress(f"{name} ({label}): starting {opts.agents} agents, {opts.shards} shards,"
             f" R={opts.replicas}")
    rc = RollingCluster(ws, opts, name, handoff)
    restarts: list[Restart] = []
    failures: list[str] = []
    clients: Clients | None = None
    try:
        rc.start()
        kv = DataClient(rc.client, rc.paths)
        rc.preload(kv)
        progress(f"{name}: {opts.keys} keys loaded; {opts.clients} clients for {opts.before:g}s")
        clients = Clients(kv, opts.clients, opts.rate, opts.value_size, opts.seed)
        t_before = time.time()
        clients.start()
        time.sleep(opts.before)  # the load's quiet phase: a measuring window, not a wait
        t_during = time.time()
        for agent in rc.agents:
            r = rc.restart(agent)
            restarts.append(r)
            progress(f"{name}: {agent} exited {r.exit_s:.2f}s after SIGTERM (code"
                     f" {r.exit_code}); settled {r.settled_s:.1f}s after its new start")
        t_end = time.time()
        clients.stop()
        lost = lost_writes(kv, clients.acked)
    except (BenchTimeout, RoleDied) as e:
        failures.append(str(e))
        progress(f"{name} FAILED: {e}")
        if clients is not None:
            clients.stop()
        t_before = t_during = t_end = time.time()
        lost = []
    finally:
        rc.close()
        for proc in [p for p in ws.procs.running if p.startswith(f"{name}-")]:
            ws.procs.kill(proc)
    ops = clients.ops if clients else []
    out = {
        "handoff": handoff,
        "agents_restarted": len(restarts),
        **summarize(ops, (t_during, t_end), (t_before, t_during)),
        "wrong_reads": len(clients.wrong_reads) if clients else 0,
        "lost_writes": len(lost),
        "acked_writes": len(clients.acked) if clients else 0,
        "duration_s": round(time.monotonic() - started, 1),
        "restart_window_s": round(t_end - t_during, 1),
        "exit_s": [round(r.exit_s, 2) for r in restarts],
        "exit_codes": [r.exit_code for r in restarts],
        "settled_s": [round(r.settled_s, 1) for r in restarts],
        "errors": (clients.errors[:10] if clients else []) + failures,
        "examples_lost": lost[:5],
    }
    out["goal_met"] = (not failures and out["failed_ops"] == 0 and out["lost_writes"] == 0
                       and out["wrong_reads"] == 0 and out["agents_restarted"] == opts.agents
                       and out["max_write_stall_s"] <= GOAL_STALL_S)
    progress(f"{name}: {out['ops']} ops, {out['failed_ops']} failed, longest write"
             f" {out['max_write_stall_s']}s, p99 before/during {out['write_p99_ms_before']}/"
             f"{out['write_p99_ms_during']} ms")
    return out


def render(result: dict[str, Any]) -> str:
    runs = [("baseline (no hand-off)", result.get("baseline"))] if "baseline" in result else []
    runs.append(("hand-off" if result["handoff"] else "no hand-off", result))
    keys = ["agents_restarted", "ops", "failed_ops", "wrong_reads", "lost_writes",
            "max_write_stall_s", "write_p50_ms_before", "write_p99_ms_before",
            "write_p50_ms_during", "write_p99_ms_during", "read_p99_ms", "duration_s"]
    rows = [["figure", *(label for label, _ in runs)]]
    rows += [[k, *("-" if r.get(k) is None else str(r.get(k)) for _, r in runs)] for k in keys]
    rows.append(["agent exit after SIGTERM, max s",
                 *(str(max(r["exit_s"], default=0)) for _, r in runs)])
    verdict = "met" if result["goal_met"] else "NOT met"
    o = result["options"]
    return "\n".join([
        f"rolling restart: {o['agents']} agents, {o['shards']} shards, R={o['replicas']},"
        f" T={o['session_timeout']:g}s, {o['clients']} clients x {o['rate']:g} put+get/s,"
        f" rebalance_delay {o['rebalance_delay']:g}s",
        table(rows),
        f"goal: failed_ops 0 and longest write <= {GOAL_STALL_S}s: {verdict}",
        *(f"  {e}" for _, r in runs for e in r["errors"][:3]),
        f"machine: {json.dumps(result['machine_at_end'])}",
    ])


def run(opts: Options, mode: str, keep: bool) -> dict[str, Any]:
    with workspace("rolling", keep=keep) as ws:
        # The client library's retries, for reading a slow write against the agents' logs.
        handler = logging.FileHandler(ws.root / "logs" / "clients.log")
        handler.setFormatter(logging.Formatter(
            "%(asctime)s.%(msecs)03d %(threadName)s %(message)s", "%H:%M:%S"))
        client_log = logging.getLogger("shardkeeper.client")
        client_log.addHandler(handler)
        client_log.setLevel(logging.DEBUG)
        result: dict[str, Any] = {}
        baseline = None
        if mode in ("both", "baseline"):
            baseline = rolling_run(ws, opts, handoff=False, name="base")
        if mode in ("both", "handoff"):
            result = rolling_run(ws, opts, handoff=True, name="roll")
            if baseline is not None:
                result["baseline"] = baseline
        else:
            result = baseline or {}
    result["options"] = {k: getattr(opts, k) for k in opts.__dataclass_fields__}
    result["machine_at_end"] = machine()
    return result


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--mode", type=click.Choice(["both", "handoff", "baseline"]), default="both",
              show_default=True, help="Run the baseline (hand-off disabled), the hand-off,"
              " or both, each on a fresh cluster.")
@click.option("--agents", type=click.IntRange(min=2), default=6, show_default=True)
@click.option("--shards", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--replicas", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--session-timeout", type=click.FloatRange(min=1), default=10.0,
              show_default=True, help="Session timeout T of every role, seconds.")
@click.option("--clients", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--rate", type=click.FloatRange(min=0.1), default=20.0, show_default=True,
              help="Put+get pairs per second per client.")
@click.option("--keys", type=click.IntRange(min=0), default=20_000, show_default=True,
              help="Keys preloaded before the load starts.")
@click.option("--value-size", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--before", type=click.FloatRange(min=1), default=15.0, show_default=True,
              help="Seconds of load before the first SIGTERM.")
@click.option("--rebalance-delay", type=click.FloatRange(min=0), default=60.0,
              show_default=True)
@click.option("--settle-timeout", type=click.FloatRange(min=10), default=300.0,
              show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--keep", is_flag=True, help="Keep the temp dir (logs) for inspection.")
def main(as_json: bool, mode: str, keep: bool, **kwargs: Any) -> None:
    """Restart every agent in turn under a client load; count failed operations and stalls."""
    logging.getLogger("kazoo").setLevel(logging.CRITICAL)
    result = run(Options(**kwargs), mode, keep)
    click.echo(json.dumps(result, indent=2) if as_json else render(result))


if __name__ == "__main__":
    main()
