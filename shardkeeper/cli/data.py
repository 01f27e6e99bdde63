"""Data commands of `shardkeeper`: put, get, delete, load and verify (through shardkeeper.client).

Keys and values given on the command line are UTF-8 text. The cluster token comes from
SHARDKEEPER_TOKEN or, failing that, from the cluster's token znode.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import click
import xxhash

from shardkeeper.cli.options import InputError, emit_json, operator_errors, zk_options, zk_session
from shardkeeper.cli.term import Progress
from shardkeeper.client import DataClient, agree, check_shards
from shardkeeper.layout import Paths
from shardkeeper.peer import ShardInfo
from shardkeeper.zk import ZkTarget

LOAD_BATCH = 500


def load_key(i: int, prefix: str = "key-") -> bytes:
    return f"{prefix}{i:08d}".encode(errors="surrogateescape")


def load_value(key: bytes, size: int) -> bytes:
    """The value `load` writes for ``key``: deterministic, so a reader can check it."""
    seed = xxhash.xxh64_hexdigest(key).encode()
    return (seed * (size // len(seed) + 1))[:size]


def _encoded(text: str, what: str, empty: bool = False) -> bytes:
    # Command-line bytes that are not UTF-8 arrive as lone surrogates: store them as given.
    try:
        data = text.encode(errors="surrogateescape")
    except UnicodeEncodeError:
        raise click.BadParameter(f"{what} is not text the command line can carry") from None
    if not data and not empty:
        raise click.BadParameter(f"{what} must not be empty")
    return data



@click.command()
@zk_options
@click.argument("key")
@click.argument("value")
@operator_errors
def put(target: ZkTarget, paths: Paths, key: str, value: str) -> None:
    """Store VALUE under KEY (acknowledged once every in-sync replica has it)."""
    with zk_session(target, paths) as zk:
        lsn = DataClient(zk, paths).put(_encoded(key, "KEY"), _encoded(value, "VALUE", empty=True))
    click.echo(f"stored {key!r} at lsn {lsn}", err=True)

@click.command()
@zk_options
@click.argument("key")
@operator_errors
def get(target: ZkTarget, paths: Paths, key: str) -> None:
    """Print KEY's value alone on stdout; exit 1 if the key is absent."""
    with zk_session(target, paths) as zk:
        value = DataClient(zk, paths).get(_encoded(key, "KEY"))
    if value is None:
        click.echo(f"{key!r}: not found", err=True)
        sys.exit(1)
    click.echo(value)

@click.command()
@zk_options
@click.argument("key")
@operator_errors
def delete(target: ZkTarget, paths: Paths, key: str) -> None:
    """Delete KEY (a tombstone that replicates like any write)."""
    with zk_session(target, paths) as zk:
        lsn = DataClient(zk, paths).delete(_encoded(key, "KEY"))
    click.echo(f"deleted {key!r} at lsn {lsn}", err=True)

@click.command()
@zk_options
@click.option("--keys", "count", type=click.IntRange(min=1), required=True,
              help="Number of keys to write (key-00000000, key-00000001, ...).")
@click.option("--value-size", type=click.IntRange(min=0, max=1 << 20), default=100,
              show_default=True, help="Bytes per value.")
@click.option("--prefix", default="key-", show_default=True, help="Key prefix.")
@click.option("--parallel", type=click.IntRange(min=1, max=64), default=8,
              show_default=True, help="Batches in flight at once.")
@operator_errors
def load(target: ZkTarget, paths: Paths, count: int, value_size: int, prefix: str,
         parallel: int) -> None:
    """Bulk-load keys with deterministic values, batched per shard, with a progress bar."""
    _encoded(prefix, "--prefix", empty=True)
    with zk_session(target, paths) as zk:
        kv = DataClient(zk, paths)
        items = ((k, load_value(k, value_size)) for k in map(
            lambda i: load_key(i, prefix), range(count)))
        batches = [
            (shard, group[i : i + LOAD_BATCH])
            for shard, group in sorted(kv.by_shard(items).items())
            for i in range(0, len(group), LOAD_BATCH)
        ]
        with (
            click.progressbar(length=count, label="loading", file=sys.stderr) as bar,
            ThreadPoolExecutor(parallel) as pool,
        ):
            futures = {pool.submit(kv.put_batch, s, b): len(b) for s, b in batches}
            for future in as_completed(futures):
                future.result()
                bar.update(futures[future])
    click.echo(f"loaded {count} keys of {value_size} bytes", err=True)

@click.command()
@zk_options
@click.option("--shard", "only", type=click.IntRange(min=0), multiple=True,
              help="Check only this shard (repeatable).")
@click.option("--parallel", type=click.IntRange(min=1, max=256), default=16,
              show_default=True, help="Shards checked at once.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@operator_errors
def verify(target: ZkTarget, paths: Paths, only: tuple[int, ...], parallel: int,
           as_json: bool) -> None:
    """Check that every shard's in-sync replicas have equal digests; exit 1 if not.

    One routing read per pass and shards checked in parallel, with a progress bar on
    stderr; shards that differ (a write may be reaching replicas one after another, a
    routing change landing) are checked again, up to three more passes."""
    t0 = time.monotonic()
    with zk_session(target, paths) as zk:
        kv = DataClient(zk, paths)
        routing = kv.routing()
        for shard in only:
            if shard >= routing.shards:
                raise InputError(f"--shard {shard}: shards are 0..{routing.shards - 1}")
        shards = sorted(set(only)) if only else list(range(routing.shards))
        progress = Progress("verifying")
        checked: list[int] = []

        def done(_shard: int) -> None:
            checked.append(_shard)
            progress.update(len(checked), len(shards))

        try:
            infos = check_shards(kv.peers, routing, shards, parallel, done)
        finally:
            progress.close()
        progress.update(len(checked), len(shards), final=True)
        passes = 1
        while passes < VERIFY_PASSES and not all(agree(i) for i in infos.values()):
            time.sleep(VERIFY_PAUSE)  # let writes in flight land before looking again
            kv.invalidate()
            routing = kv.routing()
            again = [s for s, i in infos.items() if not agree(i)]
            infos.update(check_shards(kv.peers, routing, again, parallel))
            passes += 1
    bad = {s: i for s, i in sorted(infos.items()) if not agree(i)}
    report = {
        "generation": routing.generation,
        "shards": len(shards),
        "agree": len(shards) - len(bad),
        "differ": [{"shard": s, "replicas": {a: _info_json(x) for a, x in sorted(i.items())}}
                   for s, i in bad.items() if i],
        "unavailable": [s for s, i in bad.items() if not i],
        "passes": passes,
        "seconds": round(time.monotonic() - t0, 3),
    }
    if as_json:
        emit_json(report)
    else:
        for entry in report["differ"]:
            click.echo(f"shard {entry['shard']}: replicas differ")
            for agent, info in entry["replicas"].items():
                if "error" in info:
                    click.echo(f"  {agent}: unreadable: {info['error']}")
                else:
                    click.echo(f"  {agent}: digest {info['digest'][:16]} rows {info['rows']}"
                               f" max_lsn {info['max_lsn']} state {info['state']}")
        if report["unavailable"]:
            click.echo(f"no in-sync replica to read: shards {_listed(report['unavailable'])}")
    if bad:
        raise click.ClickException(f"{len(bad)} of {len(shards)} shards differ or cannot be"
                                   " read")
    if not as_json:
        click.echo(f"{len(shards)} shards verified in {report['seconds']:.1f}s: every"
                   " replica's digest is equal")


COMMANDS = (put, get, delete, load, verify)

VERIFY_PASSES = 4
VERIFY_PAUSE = 0.5


def _info_json(info: ShardInfo | str) -> dict[str, object]:
    return dataclasses.asdict(info) if isinstance(info, ShardInfo) else {"error": info}


def _listed(shards: list[int]) -> str:
    return ", ".join(map(str, shards[:20])) + (" ..." if len(shards) > 20 else "")
