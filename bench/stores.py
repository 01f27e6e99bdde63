"""`python -m bench.stores [--json]`: the memory of one process holding many shard stores.

Issue 14: an agent holds ~600 replicas, and each store's SQLite connection costs ~130 KiB
plus a mapped WAL index. This bench creates ``--stores`` stores in a throw-away directory
(``--rows`` rows of ``--value-bytes`` each, written in a few transactions, as forwards
would), then reads every store once more (a digest and its markers, as a status or
compaction pass would) and measures, in a fresh process per bound, the resident memory
(VmRSS), SQLite's own accounting (``sqlite3_memory_used``), the connections left open and
the stores' files beside the main one (-wal, -shm). Each bound in ``--open-stores`` is one
process: the bound is what differs, the data the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from agents.storeset import StoreSet
from shardkeeper.wire import Row


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sqlite_used_mb() -> float:
    """SQLite's own count of the memory it holds (the library _sqlite3 is linked to)."""
    name = ctypes.util.find_library("sqlite3")
    if name is None:
        return float("nan")
    lib = ctypes.CDLL(name)
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return lib.sqlite3_memory_used() / 2**20


def measure(root: Path, stores: int, rows: int, value_bytes: int, open_stores: int) -> dict:
    """In this process: write then read every store under the bound; the figures after."""
    base = rss_mb()
    held = StoreSet(root, max_open=open_stores)
    started = time.perf_counter()
    for shard in range(stores):
        store = held.open(shard)
        lsn = store.max_lsn()
        for batch in range(0, rows, 50):
            page = [Row(f"k{shard}-{i}".encode(), b"v" * value_bytes, lsn + i + 1)
                    for i in range(batch, min(rows, batch + 50))]
            store.apply_forward(page, sync_lsn=page[-1].lsn)
    written = time.perf_counter() - started
    started = time.perf_counter()
    for shard in range(stores):
        store = held.open(shard)
        store.digest()
        store.sync_lsn(), store.max_lsn(), store.count()
    read = time.perf_counter() - started
    side = sum(1 for p in root.iterdir() if p.name.endswith(("-wal", "-shm")))
    figures = {
        "open_stores": open_stores,
        "stores": stores,
        "rss_mb": round(rss_mb(), 1),
        "rss_mb_before": round(base, 1),
        "sqlite_memory_used_mb": round(sqlite_used_mb(), 1),
        "connections_open": len(held.open_stores),
        "wal_and_shm_files": side,
        "write_s": round(written, 2),
        "read_all_s": round(read, 2),
    }
    held.close_all()
    return figures


@click.command()
@click.option("--stores", default=600, show_default=True, help="Stores (shard replicas).")
@click.option("--rows", default=300, show_default=True, help="Rows per store.")
@click.option("--value-bytes", default=1000, show_default=True, help="Bytes per value.")
@click.option("--open-stores", "bounds", default="600,64", show_default=True,
              help="Comma-separated bounds on open stores, one process each.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--one", is_flag=True, hidden=True, help="Measure one bound in this process.")
def main(stores: int, rows: int, value_bytes: int, bounds: str, as_json: bool, one: bool) -> None:
    if one:
        with tempfile.TemporaryDirectory(prefix="bench-stores-") as tmp:
            figures = measure(Path(tmp), stores, rows, value_bytes, int(bounds))
        print(json.dumps(figures))
        return
    results = []
    for bound in bounds.split(","):
        out = subprocess.run(
            [sys.executable, "-m", "bench.stores", "--one", "--stores", str(stores), "--rows",
             str(rows), "--value-bytes", str(value_bytes), "--open-stores", bound.strip()],
            check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout))
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    report = {"results": results, "load_average_1m": load}
    if as_json:
        print(json.dumps(report, indent=2))
        return
    for r in results:
        click.echo(f"open-stores {r['open_stores']}: {r['stores']} stores, {r['rss_mb']} MB RSS"
                   f" ({r['rss_mb_before']} MB before), SQLite {r['sqlite_memory_used_mb']} MB,"
                   f" {r['connections_open']} open, {r['wal_and_shm_files']} -wal/-shm files;"
                   f" write {r['write_s']} s, read all {r['read_all_s']} s")
    click.echo(f"load average (1 min) at the end: {load}")


if __name__ == "__main__":
    main()
