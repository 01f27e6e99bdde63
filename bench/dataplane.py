"""`python -m bench.dataplane [--json]`: the data plane's throughput and latency.

Real HTTP on 127.0.0.1, real SQLite files, the same DataPlane the agents run; no ZooKeeper
(the shard table is set by hand, as the runtime would). Two topologies, in the same run:
*in-process* (every node a DataPlane in this one Python process, sharing its GIL with the
client: the bench as it always was, every figure without a suffix) and *per-process* (each
node in a process of its own, ``bench.dataplane_node``, the client in this one: how agents
run; the figures ending in ``_procs``). Measured in one run:

* bootstrap: a fresh replica copies one shard (``--rows`` rows of ``--value-size`` bytes)
  from its primary with ``copy_shard``, as an agent does: the source's store file as a
  consistent image over HTTP (sendfile out, splice in, writeback started as it lands),
  installed durably (fsynced before it replaces the store), then the rows stream from the
  image's sync point (one empty page here). Next to it, in the same run,
  ``shutil.copyfile`` of that same file (checkpointed, hot in the page cache, no fsync):
  the raw local copy. Both MB/s figures divide the same bytes, the source's SQLite file
  size, by the median time of ``--runs`` runs, raw copies and bootstraps interleaved (on
  a shared machine a single 10 ms copy swings several-fold), so ``bootstrap_ratio`` is
  median raw copy time / median bootstrap time. ``load_avg_1m`` is the machine's load
  average when the bootstraps end: the ratio falls with CPU contention. The
  text output also shows the raw copy with an fsync of the result, and ``--rows-stream``
  measures the row-by-row path alone (what a resumed copy uses).
* acknowledged puts/s from one client, one key per request, with a primary and two in-sync
  replicas (R=3) and with a primary alone (R=1); and keys/s with batches of ``--batch``
  (``puts_per_s_r3``, ``puts_per_s_r1``, ``batched_keys_per_s_r3``: in-process, R=3 for
  ``--seconds`` then R=1 for as long, as always). ``put_ratio`` is R=3 / R=1 of that run.
* read latency (GET from the primary), p50 and p99 over ``--reads`` sequential reads
  (in-process).
* the same puts with each node in its own process (``puts_per_s_r3_procs``,
  ``puts_per_s_r1_procs``, their ``put_ratio_procs``, ``batched_keys_per_s_r3_procs``), and
  puts from ``--clients`` client threads at once, each its own keys
  (``concurrent_puts_per_s_r3_procs``, ``concurrent_puts_per_s_r1_procs``,
  ``concurrent_put_ratio_procs``); ``concurrent_puts_per_batch_r3_procs`` is how many of
  those R=3 puts the primary wrote per batch (one transaction, one forward per replica:
  group commit). Afterwards the R=3 primary and replicas must hold the same rows (digest),
  or the run fails. ``load_avg_1m_end`` is the load average at the end.
* the floor (``bench.dataplane_floor``): the same one-client puts through the least code
  that does what an acknowledged put must (a process per node, one thread, blocking
  sockets, length-prefixed bytes, one SQLite transaction per node per put, forwards sent
  to both replicas before either answer is read): ``floor_puts_per_s_r3``,
  ``floor_puts_per_s_r1``, ``floor_put_ratio``; and with the primary's commit after its
  forwards went out, the order the data plane refuses (``floor_puts_per_s_r3_overlap``,
  ``floor_put_ratio_overlap``). ``put_ratio_procs`` over ``floor_put_ratio`` is how far the
  data plane is from what this machine allows.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from agents.dataplane import DataPlane, ShardRoute, ShardTable, copy_shard
from agents.shardsm import ShardState
from agents.store import make_lsn
from agents.storeset import StoreSet
from bench.dataplane_floor import floor_rate
from shardkeeper.peer import PeerClient
from shardkeeper.wire import Row

TOKEN = "bench-token"
PEER_TOKEN = "bench-peer-token"  # agents' replication calls (issue 10)
SHARD = 1
MB = 1 << 20
REPO = Path(__file__).resolve().parents[1]  # the node processes run `-m bench...` from here


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


class Node:
    def __init__(self, root: Path, name: str):
        self.stores = StoreSet(root / name)
        self.table = ShardTable()
        self.plane = DataPlane(self.stores, self.table, TOKEN, peer_token=PEER_TOKEN,
                               forward_timeout=5.0).start()
        self.store = self.stores.open(SHARD)

    @property
    def address(self) -> str:
        return self.plane.address

    def lead(self, replicas: Sequence[Node] = ()) -> None:
        self.lead_addresses([r.address for r in replicas])
        for r in replicas:
            r.follow(self.address)

    def lead_addresses(self, in_sync: Sequence[str]) -> None:
        """Become SHARD's primary at term 1, with ``in_sync`` as its in-sync replicas."""
        self.store.mark_promoted()
        self.table.set_route(SHARD, ShardRoute(
            ShardState.PRIMARY, term=1, primary=self.address, in_sync=tuple(in_sync)))

    def follow(self, primary: str) -> None:
        self.table.set_route(SHARD, ShardRoute(ShardState.REPLICA, term=1, primary=primary))

    def close(self) -> None:
        self.plane.stop()
        self.stores.close_all()


class NodeProcess:
    """A Node in a process of its own (``bench.dataplane_node``), driven over its stdin."""

    def __init__(self, root: Path, name: str):
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.dataplane_node", str(root), name],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        if not self.address:
            raise RuntimeError(f"node {name} did not start (exit {self.proc.wait(10)})")

    def command(self, **command: object) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        if "error" in answer:
            raise RuntimeError(f"node {self.name}: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # end of commands: the node stops
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def rate(seconds: float, op: Callable[[int], int]) -> float:
    """Calls ``op(i)`` (which returns items done) for ``seconds``; items per second."""
    done, i = 0, 0
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        done += op(i)
        i += 1
    return done / elapsed


def concurrent_rate(seconds: float, clients: int, op: Callable[[int, int], int]) -> float:
    """``clients`` threads each call ``op(client, i)`` for ``seconds``; items per second."""
    done = [0] * clients
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def loop(client: int) -> None:
        start.wait()
        i = 0
        while time.perf_counter() < deadline[0]:
            done[client] += op(client, i)
            i += 1

    threads = [threading.Thread(target=loop, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    start.wait()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - t0)


def checkpoint(path: Path) -> None:
    db = sqlite3.connect(str(path))
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def durable_copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with dst.open("rb+") as f:
        os.fsync(f.fileno())


def bench_bootstrap(
    root: Path, rows: int, value_size: int, page: int, rows_stream: bool, runs: int
) -> dict[str, float]:
    """Median times of ``runs`` interleaved raw copies and bootstraps of the same file."""
    source = Node(root, "source")
    targets: list[Node] = []
    try:
        value = b"v" * value_size
        for start in range(0, rows, 5000):
            batch = [Row(f"key-{i:09d}".encode(), value, make_lsn(1, i + 1))
                     for i in range(start, min(rows, start + 5000))]
            source.store.apply_forward(batch, sync_lsn=batch[-1].lsn)
        source.lead()
        path = source.stores.path_for(SHARD)
        checkpoint(path)
        size = path.stat().st_size
        shutil.copyfile(path, root / "warm.sqlite3")  # both copies start with a hot cache
        client = PeerClient(PEER_TOKEN, timeout=30.0)  # copies are an agent's call
        raw_s, durable_s, copy_s = [], [], []
        for run in range(runs):
            raw_s.append(timed(lambda: shutil.copyfile(path, root / "raw.sqlite3")))
            durable_s.append(timed(lambda: durable_copy(path, root / "durable.sqlite3")))
            target = Node(root, f"target-{run}")
            targets.append(target)
            target.table.set_route(SHARD, ShardRoute(ShardState.BOOTSTRAPPING,
                                                     primary=source.address))
            image = None if rows_stream else target.stores.incoming_path(SHARD)
            results = []
            copy_s.append(timed(lambda: results.append(copy_shard(  # noqa: B023
                target.store, SHARD, source.address, client, page_size=page,  # noqa: B023
                image_path=image))))  # noqa: B023
            assert rows_stream or results[0].image_bytes == size, "fell back to the rows stream"
            assert target.store.digest() == source.store.digest()
        return {
            "bootstrap_mb_s": size / MB / statistics.median(copy_s),
            "raw_copy_mb_s": size / MB / statistics.median(raw_s),
            "raw_copy_fsync_mb_s": size / MB / statistics.median(durable_s),
            "shard_mb": size / MB,
            "load_avg_1m": os.getloadavg()[0],
        }
    finally:
        for node in (source, *targets):
            node.close()


def batch_putter(client: PeerClient, address: str, value: bytes,
                 batch: int) -> Callable[[int], int]:
    """The i-th call puts ``batch`` keys in one request; returns how many it put."""
    def put_batch(i: int) -> int:
        items = [(f"b{i:06d}-{j:05d}".encode(), value) for j in range(batch)]
        client.batch_put(address, SHARD, items)
        return batch
    return put_batch


def bench_writes(root: Path, seconds: float, batch: int, reads: int) -> dict[str, float]:
    primary, r1, r2, solo = (Node(root, n) for n in ("p", "r1", "r2", "solo"))
    try:
        primary.lead([r1, r2])
        solo.lead()
        client = PeerClient(TOKEN, timeout=10.0)
        value = b"x" * 100

        def put(node: Node) -> Callable[[int], int]:
            return lambda i: (client.put(node.address, SHARD, f"k{i:09d}".encode(), value), 1)[1]

        put_batch = batch_putter(client, primary.address, value, batch)

        out = {
            "puts_per_s_r3": rate(seconds, put(primary)),
            "puts_per_s_r1": rate(seconds, put(solo)),
            "batched_keys_per_s_r3": rate(seconds, put_batch),
        }
        latencies = []
        for i in range(reads):
            t0 = time.perf_counter()
            client.get(primary.address, SHARD, f"k{i % 1000:09d}".encode())
            latencies.append((time.perf_counter() - t0) * 1000)
        out["read_p50_ms"] = percentile(latencies, 50)
        out["read_p99_ms"] = percentile(latencies, 99)
        return out
    finally:
        for node in (primary, r1, r2, solo):
            node.close()


def bench_writes_procs(root: Path, seconds: float, batch: int, clients: int) -> dict[str, float]:
    """The puts of ``bench_writes`` with each node in a process of its own, the client
    (threads) in this one; then checks that the three holders of the R=3 shard agree."""
    nodes: list[NodeProcess] = []
    try:
        for name in ("pp", "pr1", "pr2", "psolo"):
            nodes.append(NodeProcess(root, name))
        primary, r1, r2, solo = nodes
        for replica in (r1, r2):
            replica.command(follow=primary.address)
        primary.command(lead=[r1.address, r2.address])
        solo.command(lead=[])
        client = PeerClient(TOKEN, timeout=10.0)
        value = b"x" * 100

        def put(node: NodeProcess) -> Callable[[int], int]:
            return lambda i: (client.put(node.address, SHARD, f"k{i:09d}".encode(), value), 1)[1]

        def put_concurrent(node: NodeProcess) -> Callable[[int, int], int]:
            def op(c: int, i: int) -> int:
                client.put(node.address, SHARD, f"c{c:03d}-{i:09d}".encode(), value)
                return 1
            return op

        put_batch = batch_putter(client, primary.address, value, batch)

        out = {
            "puts_per_s_r3_procs": rate(seconds, put(primary)),
            "puts_per_s_r1_procs": rate(seconds, put(solo)),
            "batched_keys_per_s_r3_procs": rate(seconds, put_batch),
        }
        before = primary.command(batches=True)
        out["concurrent_puts_per_s_r3_procs"] = concurrent_rate(seconds, clients,
                                                                put_concurrent(primary))
        after = primary.command(batches=True)
        out["concurrent_puts_per_batch_r3_procs"] = (
            (after["writes"] - before["writes"]) / max(1, after["batches"] - before["batches"]))
        out["concurrent_puts_per_s_r1_procs"] = concurrent_rate(seconds, clients,
                                                                put_concurrent(solo))
        held = [node.command(digest=True) for node in (primary, r1, r2)]
        if len({(h["digest"], h["rows"]) for h in held}) != 1:
            raise AssertionError(f"the R=3 holders disagree after the run: {held}")
        return out
    finally:
        for node in nodes:
            node.close()


def bench_floor(root: Path, seconds: float) -> dict[str, float]:
    """One client's puts/s through ``bench.dataplane_floor``: R=3, R=1, R=3 overlapped."""
    runs = {"floor_puts_per_s_r3": (3, False), "floor_puts_per_s_r1": (1, False),
            "floor_puts_per_s_r3_overlap": (3, True)}
    return {key: floor_rate(root, key, replicas, overlap, lambda op: rate(seconds, op))
            for key, (replicas, overlap) in runs.items()}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--rows", default=20_000, show_default=True, help="Rows in the bootstrapped shard.")
@click.option("--value-size", default=1000, show_default=True, help="Bytes per value.")
@click.option("--page", default=10_000, show_default=True, help="Rows per bootstrap page.")
@click.option("--seconds", default=3.0, show_default=True, help="Duration of each put run.")
@click.option("--batch", default=500, show_default=True, help="Keys per batched put.")
@click.option("--reads", default=3000, show_default=True, help="Reads timed for latency.")
@click.option("--rows-stream", is_flag=True, help="Bootstrap row by row, without a file image.")
@click.option("--runs", default=5, show_default=True, help="Bootstraps and raw copies (median).")
@click.option("--clients", default=8, show_default=True,
              help="Client threads of the concurrent put runs (per-process nodes).")
def main(as_json: bool, rows: int, value_size: int, page: int, seconds: float, batch: int,
         reads: int, rows_stream: bool, runs: int, clients: int) -> None:
    """Measure bootstrap MB/s against a raw file copy, acknowledged puts/s, read latency."""
    with tempfile.TemporaryDirectory(prefix="bench-dataplane-") as tmp:
        root = Path(tmp)
        result = bench_bootstrap(root, rows, value_size, page, rows_stream, runs)
        result.update(bench_writes(root, seconds, batch, reads))
        result.update(bench_writes_procs(root, seconds, batch, clients))
        result.update(bench_floor(root, seconds))
    result["bootstrap_ratio"] = result["bootstrap_mb_s"] / result["raw_copy_mb_s"]
    result["put_ratio"] = result["puts_per_s_r3"] / result["puts_per_s_r1"]
    result["put_ratio_procs"] = result["puts_per_s_r3_procs"] / result["puts_per_s_r1_procs"]
    result["concurrent_put_ratio_procs"] = (result["concurrent_puts_per_s_r3_procs"]
                                            / result["concurrent_puts_per_s_r1_procs"])
    result["floor_put_ratio"] = result["floor_puts_per_s_r3"] / result["floor_puts_per_s_r1"]
    result["floor_put_ratio_overlap"] = (result["floor_puts_per_s_r3_overlap"]
                                         / result["floor_puts_per_s_r1"])
    result["clients"] = clients
    result["load_avg_1m_end"] = os.getloadavg()[0]
    keys = ["bootstrap_mb_s", "raw_copy_mb_s", "bootstrap_ratio", "puts_per_s_r3",
            "puts_per_s_r1", "batched_keys_per_s_r3", "read_p50_ms", "read_p99_ms", "load_avg_1m",
            "put_ratio", "puts_per_s_r3_procs", "puts_per_s_r1_procs", "put_ratio_procs",
            "batched_keys_per_s_r3_procs", "concurrent_puts_per_s_r3_procs",
            "concurrent_puts_per_s_r1_procs", "concurrent_put_ratio_procs", "clients",
            "concurrent_puts_per_batch_r3_procs", "floor_puts_per_s_r3", "floor_puts_per_s_r1",
            "floor_put_ratio", "floor_puts_per_s_r3_overlap", "floor_put_ratio_overlap",
            "load_avg_1m_end"]
    if as_json:
        click.echo(json.dumps({k: round(result[k], 3) for k in keys}))
        return
    click.echo(f"shard of {rows} rows x {value_size} B = {result['shard_mb']:.1f} MB")
    for k in [*keys[:2], "raw_copy_fsync_mb_s", *keys[2:]]:
        click.echo(f"{k:24} {result[k]:12.3f}")


if __name__ == "__main__":
    main()
