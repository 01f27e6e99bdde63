"""Shared pieces of the benchmarks (tools for measuring the product, not part of it).

* a throw-away ZooKeeper on loopback, with the tick and heap the benchmark asks for;
* child processes that cannot outlive the benchmark, killed on exit, Ctrl-C or exception;
* :class:`ClusterWatch`, a watch-driven mirror of members, statuses, plan/meta and epoch,
  so that an instant is taken when ZooKeeper reports a change, not at the next poll;
* znode walks (sizes, mzxids), percentiles and a plain-text table.

Clocks: every instant is wall-clock ``time.time()``, because the product stamps
``plan/meta.created`` with it and ZooKeeper stamps a znode's ``mtime`` with the server's
wall clock (milliseconds); client and server share one machine, so the three compare.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from shardkeeper import cluster as clusterstate
from shardkeeper.dev.zkserver import MAIN_CLASS, ZK_CONF_DIR, ZkServer, find_zookeeper, free_port
from shardkeeper.layout import AgentStatus, Paths, PlanMeta
from shardkeeper.poll import poll_until
from shardkeeper.process import cli_command
from shardkeeper.summary import under_replicated
from shardkeeper.vocab import CorruptZnode, ShardState
from shardkeeper.zk import ZkTarget

T = TypeVar("T")

# The kernel SIGKILLs a child when the benchmark dies, even by SIGKILL or a harness timeout:
# a leftover fleet of agents would otherwise keep eating the machine's cores.
DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL", "--")
# Children run from the repository root so that `python -m bench...` resolves there too.
REPO = Path(__file__).resolve().parents[1]


class BenchTimeout(Exception):
    """A condition the benchmark waits for did not come true in time."""


class RoleDied(Exception):
    """A process the benchmark did not kill has exited: the run is not valid."""


# -- statistics ------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (p99 of 20 samples is their maximum); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def table(rows: Iterable[Sequence[str]]) -> str:
    rows = [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(row: Sequence[str]) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

    return "\n".join(line(r) for r in rows)


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def machine() -> dict[str, Any]:
    """Where the figures were taken: other load on a small machine moves them."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_threads(pid: int) -> int:
    """The number of threads of a live process (from /proc)."""
    return int(_proc_status(pid)["Threads"])


def proc_rss_mb(pid: int) -> float:
    """A live process's resident set size in MB (VmRSS)."""
    return int(_proc_status(pid)["VmRSS"].split()[0]) / 1024


def _proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def process_figures(pids: dict[str, int], window: float) -> dict[str, dict[str, float]]:
    """name -> threads, RSS (MB) and CPU (% of one core, averaged over ``window``)."""
    before = {n: cpu_seconds(p) for n, p in pids.items()}
    t0 = time.monotonic()
    time.sleep(window)  # the measuring window itself
    elapsed = time.monotonic() - t0
    return {
        n: {
            "threads": proc_threads(p),
            "rss_mb": round(proc_rss_mb(p), 1),
            "cpu_pct": round(100 * (cpu_seconds(p) - before[n]) / elapsed, 2),
        }
        for n, p in pids.items()
    }


class PeakSampler:
    """The most threads and RSS each process of ``pids()`` had, sampled every ``period``
    seconds in a daemon thread until ``stop``: what an agent costs while it works (copies,
    failovers), not only when idle."""

    def __init__(self, pids: Callable[[], dict[str, int]], period: float = 0.5):
        self.pids = pids
        self.period = period
        self.threads: dict[str, int] = {}
        self.rss_mb: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peaks")

    def start(self) -> PeakSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for name, pid in self.pids().items():
                with contextlib.suppress(OSError, KeyError, ValueError):
                    self.threads[name] = max(self.threads.get(name, 0), proc_threads(pid))
                    self.rss_mb[name] = round(max(self.rss_mb.get(name, 0.0),
                                                  proc_rss_mb(pid)), 1)


def wait_idle(
    pids: Callable[[], Iterable[int]],
    timeout: float,
    what: str,
    window: float = 1.0,
    busy: float = 0.05,
) -> None:
    """Until the processes together use under ``busy`` of a core over ``window``.

    A measurement then starts from a quiet cluster: agents that still catch up shards
    after a start, or a leader still reacting to statuses, would slow what is measured.
    """

    def idle() -> bool:
        watched = list(pids())
        before = sum(cpu_seconds(p) for p in watched)
        time.sleep(window)
        return sum(cpu_seconds(p) for p in watched) - before < busy * window

    poll_until(idle, timeout, what, interval=0.0, error=BenchTimeout)


STARTED = time.monotonic()


def progress(message: str) -> None:
    """A progress line on stderr (stdout carries only the table or the JSON)."""
    elapsed = time.monotonic() - STARTED
    print(f"{time.strftime('%H:%M:%S')} +{elapsed:4.0f}s {message}", file=sys.stderr, flush=True)


@dataclass
class Phase:
    """The samples of one scenario, and what went wrong in it."""

    samples: list[Any] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def failed(self, what: str, error: Exception) -> None:
        self.failures.append(f"{what}: {error}")
        progress(f"{what} FAILED: {error}")


# -- processes and ZooKeeper -------------------------------------------------------------


class Processes:
    """Every child the benchmark starts, by name; ``close`` kills whatever is left."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self,
        name: str,
        argv: Sequence[str],
        capture_stdout: bool = False,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        if name in self.running:
            raise ValueError(f"process {name!r} is already running")
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [*DIE_WITH_PARENT, *argv],
                stdout=subprocess.PIPE if capture_stdout else log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env={**os.environ, **(env or {})},
            )
        self.running[name] = proc
        return proc

    def check(self) -> None:
        """Raise RoleDied, with the tail of its log, if a process ended on its own."""
        for name, proc in self.running.items():
            if proc.poll() is not None:
                log = (self.log_dir / f"{name}.log").read_text(errors="replace")
                tail = "\n".join(log.splitlines()[-15:])
                raise RoleDied(f"{name} exited with code {proc.returncode}; its log ends:\n{tail}")

    def reap(self) -> list[str]:
        """Forget the processes that ended on their own; returns their names."""
        dead = [name for name, proc in self.running.items() if proc.poll() is not None]
        for name in dead:
            del self.running[name]
        return dead

    def kill(self, name: str) -> float:
        """SIGKILL ``name``; returns the wall-clock instant the signal was sent."""
        proc = self.running.pop(name)
        at = time.time()
        proc.kill()
        proc.wait(10)
        return at

    def signal(self, name: str, sig: signal.Signals) -> float:
        """Send ``sig`` to ``name`` (still registered); the wall-clock instant it was sent."""
        at = time.time()
        self.running[name].send_signal(sig)
        return at

    def terminate(self, name: str, timeout: float = 15.0) -> None:
        proc = self.running.pop(name)
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def close(self) -> None:
        for proc in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        for proc in self.running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.running.clear()


@dataclass
class BenchZooKeeper(ZkServer):
    """shardkeeper.dev.zkserver's server with a chosen heap and the die-with-parent wrapper."""

    heap_mb: int = 256

    def start(self, detach: bool = False) -> None:
        java, jar = find_zookeeper()
        cfg = self.write_config()
        with open(self.data_dir / "zookeeper.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    *DIE_WITH_PARENT,
                    java,
                    f"-Xmx{self.heap_mb}m",
                    f"-Dzookeeper.log.dir={self.data_dir}",
                    "-cp",
                    f"{ZK_CONF_DIR}:{jar}",
                    MAIN_CLASS,
                    str(cfg),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )


@dataclass
class Workspace:
    root: Path
    zk: BenchZooKeeper
    procs: Processes

    @property
    def hosts(self) -> str:
        return self.zk.address

    @property
    def target(self) -> ZkTarget:
        return ZkTarget.parse(self.zk.address)


def _interrupt(*_args: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while a cleanup runs, and raise KeyboardInterrupt after it.

    A Ctrl-C reaches the whole foreground process group, and ``timeout -s INT`` signals the
    child and then the group: the bench often gets a second SIGINT while its ``finally``
    block is still killing processes, and that one used to end the cleanup halfway, leaving
    the temp dir (tens of MB) or, in bench.chaos, network namespaces and a tmpfs mount.
    The block must be bounded in time (each of its waits is). Only the main thread can
    set signal handlers; elsewhere the block runs unshielded.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        held.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            raise KeyboardInterrupt(f"{signal.Signals(held[0]).name} during the cleanup")


@contextlib.contextmanager
def workspace(
    name: str, tick_ms: int = 250, heap_mb: int = 256, keep: bool = False
) -> Iterator[Workspace]:
    """A temp dir, a ZooKeeper in it and a process registry, all gone on exit.

    SIGTERM is turned into KeyboardInterrupt so that `finally` runs for it as for Ctrl-C.
    """
    root = Path(tempfile.mkdtemp(prefix=f"shardkeeper-bench-{name}-"))
    procs = Processes(root / "logs")
    zk = BenchZooKeeper(
        data_dir=root / "zk", client_port=free_port(), tick_ms=tick_ms, heap_mb=heap_mb
    )
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        zk.start()
        zk.wait_ready()
        yield Workspace(root, zk, procs)
    finally:
        try:
            with shielded():
                procs.close()
                zk.stop()
                if keep:
                    print(f"kept {root}", file=sys.stderr, flush=True)
                else:
                    shutil.rmtree(root, ignore_errors=True)
        finally:
            signal.signal(signal.SIGTERM, previous)


def agent_argv(
    hosts: str, cluster: str, agent: str, data_dir: Path, session_timeout: float
) -> list[str]:
    return cli_command(
        "agent",
        "run",
        "--zk",
        hosts,
        "--cluster",
        cluster,
        "--id",
        agent,
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--data-dir",
        str(data_dir),
        "--session-timeout",
        str(session_timeout),
    )


def coordinator_argv(hosts: str, cluster: str, candidate: str, session_timeout: float) -> list[str]:
    return cli_command(
        "coordinator",
        "run",
        "--zk",
        hosts,
        "--cluster",
        cluster,
        "--id",
        candidate,
        "--session-timeout",
        str(session_timeout),
    )


def init_argv(hosts: str, cluster: str, shards: int, replicas: int) -> list[str]:
    return cli_command(
        "init",
        "--zk",
        hosts,
        "--cluster",
        cluster,
        "--shards",
        str(shards),
        "--replicas",
        str(replicas),
    )


# -- watching the cluster ------------------------------------------------------------------


@dataclass(frozen=True)
class MetaSeen:
    """One version of plan/meta as the benchmark saw it."""

    meta: PlanMeta
    observed: float  # when our watch fired
    committed: float  # the znode's mtime: when ZooKeeper applied the write
    mzxid: int


@dataclass(frozen=True)
class EpochSeen:
    version: int
    observed: float
    committed: float


@dataclass(eq=False)
class Trigger:
    condition: Callable[[], object]
    at: float | None = None


@dataclass
class ClusterWatch:
    """Members, statuses, plan/meta and epoch of one cluster, kept current by watches.

    One condition guards everything and ``last_event`` is the instant of the latest
    change, so a waiter woken a little late still reports when ZooKeeper told us.
    DataWatch may coalesce two quick writes into one callback; ``metas`` keeps the
    generations so that a gap can be detected.
    """

    client: KazooClient
    paths: Paths
    cond: threading.Condition = field(default_factory=threading.Condition)
    last_event: float = 0.0
    members: set[str] = field(default_factory=set)
    departures: list[tuple[float, str]] = field(default_factory=list)
    statuses: dict[str, AgentStatus] = field(default_factory=dict)
    metas: list[MetaSeen] = field(default_factory=list)
    epochs: list[EpochSeen] = field(default_factory=list)
    _status_watched: set[str] = field(default_factory=set)
    _triggers: list[Trigger] = field(default_factory=list)

    def start(self, statuses: bool = True) -> ClusterWatch:
        self.client.ChildrenWatch(self.paths.members, self._on_members)
        if statuses:
            self.client.ChildrenWatch(self.paths.status, self._on_status_children)
        self.client.DataWatch(self.paths.plan_meta, self._on_meta)
        self.client.DataWatch(self.paths.epoch, self._on_epoch)
        return self

    def _changed(self) -> None:
        self.last_event = time.time()
        for trigger in self._triggers:
            if trigger.at is None and trigger.condition():
                trigger.at = self.last_event
        self._triggers = [t for t in self._triggers if t.at is None]
        self.cond.notify_all()

    def arm(self, condition: Callable[[], object]) -> Trigger:
        """Record the instant of the first change after which ``condition()`` holds.

        The condition is checked in the watch callback, under the lock, so the instant is
        right even when the benchmark's main thread looks much later.
        """
        with self.cond:
            trigger = Trigger(condition)
            if condition():
                trigger.at = time.time()
            else:
                self._triggers.append(trigger)
            return trigger

    def wait_for(
        self, trigger: Trigger, timeout: float, what: str, check: Callable[[], None] = lambda: None
    ) -> float:
        """The instant ``trigger`` fired; ``check`` runs every half second meanwhile."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while trigger.at is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._triggers = [t for t in self._triggers if t is not trigger]
                    raise BenchTimeout(f"timed out after {timeout:g}s waiting for {what}")
                self.cond.wait(min(left, 0.5))
                check()
            return trigger.at

    def _on_members(self, names: list[str]) -> None:
        with self.cond:
            now = time.time()
            self.departures += [(now, m) for m in sorted(self.members - set(names))]
            self.members = set(names)
            self._changed()

    def departed_since(self, since: float) -> list[str]:
        """Members that vanished at or after ``since`` (a session expired or was closed)."""
        with self.cond:
            return [m for at, m in self.departures if at >= since]

    def _on_status_children(self, names: list[str]) -> None:
        with self.cond:
            fresh = [n for n in names if n not in self._status_watched]
            self._status_watched.update(fresh)
        for name in fresh:
            self.client.DataWatch(self.paths.agent_status(name), self._status_watcher(name))

    def _status_watcher(self, agent: str) -> Callable[[bytes | None, Any], bool]:
        # Exactly two parameters: kazoo passes the event as well to a three-argument callback.
        def on_data(data: bytes | None, _stat: Any) -> bool:
            return self._on_status(agent, data)

        return on_data

    def _on_status(self, agent: str, data: bytes | None) -> bool:
        with self.cond:
            if data is None:
                # Gone with its agent's session: stop watching (replacements get new ids).
                self.statuses.pop(agent, None)
                self._status_watched.discard(agent)
                self._changed()
                return False
            with contextlib.suppress(CorruptZnode):
                self.statuses[agent] = AgentStatus.decode(self.paths.agent_status(agent), data,
                                                          self.statuses.get(agent))
            self._changed()
            return True

    def _on_meta(self, data: bytes | None, stat: Any) -> None:
        if data is None:
            return
        seen = MetaSeen(
            PlanMeta.decode(self.paths.plan_meta, data), time.time(), stat.mtime / 1000, stat.mzxid
        )
        with self.cond:
            self.metas.append(seen)
            self._changed()

    def _on_epoch(self, data: bytes | None, stat: Any) -> None:
        if data is None:
            return
        with self.cond:
            self.epochs.append(EpochSeen(stat.version, time.time(), stat.mtime / 1000))
            self._changed()

    def first_meta(self, since: int, accept: Callable[[PlanMeta], bool]) -> MetaSeen | None:
        """The first plan/meta seen at index >= ``since`` that ``accept`` takes (under lock)."""
        return next((m for m in self.metas[since:] if accept(m.meta)), None)

    def under_replicated(self, shards: int, replicas: int, dead: Iterable[str] = ()) -> int:
        """Shards held (per status) by fewer than R live members: the product's own count.
        ``dead``: members whose process is gone though their session lives on (a SIGKILLed
        agent's member and status znodes stay until its session expires)."""
        # under_replicated only uses the routing table's length and the members' ids.
        live = dict.fromkeys(self.members - set(dead))
        return under_replicated(((),) * shards, replicas, live, self.statuses)


def unsettled(client: KazooClient, paths: Paths, replicas: int, live: set[str]) -> str:
    """Why the cluster is not settled yet, or "" when it is: the plan names exactly
    ``live``, no copy is running or deferred, every shard has R distinct live replicas, and
    every agent applied its plan and reports holding exactly its planned replicas."""
    plan = clusterstate.read_plan(client, paths)
    if plan.meta is None:
        return "no plan yet"
    if set(plan.meta.members) != live:
        return f"plan members differ from {len(live)} live agents"
    copying = sum(1 for p in plan.shards if p.bootstrapping)
    # The order of the secondaries is immaterial: same primary, same set is the target.
    pending = sum(
        1
        for row, target in zip(plan.routing, plan.targets, strict=True)
        if row[:1] != target[:1] or set(row) != set(target)
    )
    if copying or pending:
        return f"{copying} shards copying, {pending} short of their target"
    if any(len(set(row)) != replicas or not set(row) <= live for row in plan.routing):
        return "some shard lacks R live replicas in the plan"
    statuses = clusterstate.read_statuses(client, paths)
    for agent in sorted(live):
        want, got = plan.agents.get(agent), statuses.get(agent)
        if want is None or got is None:
            return f"{agent} has no plan or no status"
        if got.generation < want.generation:
            return f"{agent} applied generation {got.generation} < {want.generation}"
        # Dropped shards may linger in a status as OFFLINE: they are not held.
        held = {s: st for s, st in got.shards.items() if st.state != ShardState.OFFLINE}
        if set(held) != set(want.replicas):
            return f"{agent} holds {len(held)} shards, its plan has {len(want.replicas)}"
        if not all(st.in_sync for st in held.values()):
            return f"{agent} has shards that are not yet in sync (PRIMARY or caught-up REPLICA)"
    return ""


# -- znode walks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ZnodeStat:
    mzxid: int
    version: int
    size: int


def walk(client: KazooClient, root: str, skip: Iterable[str] = ()) -> dict[str, ZnodeStat]:
    """Every znode under ``root`` (inclusive) with its mzxid, version and data length.

    Each level is read with async calls, so a few thousand znodes cost a few round trips.
    """
    skipped = set(skip)
    out: dict[str, ZnodeStat] = {}
    level = [root]
    while level:
        stats = {p: client.exists_async(p) for p in level}
        kids = {p: client.get_children_async(p) for p in level}
        nxt: list[str] = []
        for path in level:
            stat = stats[path].get()
            if stat is None:
                continue
            out[path] = ZnodeStat(stat.mzxid, stat.version, stat.dataLength)
            with contextlib.suppress(NoNodeError):
                nxt += [f"{path}/{c}" for c in kids[path].get() if f"{path}/{c}" not in skipped]
        level = nxt
    return out


def read_stream_lines(stream: IO[bytes], on_line: Callable[[bytes], None]) -> threading.Thread:
    """Call ``on_line`` for each line of a child's stdout, in a daemon thread."""

    def pump() -> None:
        for line in stream:
            on_line(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread
