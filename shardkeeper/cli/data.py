"""Data commands of `shardkeeper`: put, get, delete, load and verify (through shardkeeper.client).

Keys and values given on the command line are UTF-8 text. The cluster token comes from
SHARDKEEPER_TOKEN or, failing that, from the cluster's token znode.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor, as_completed

import click
import xxhash
from tenacity import retry, retry_if_result, stop_after_attempt, wait_fixed

from shardkeeper.cli.options import operator_errors, zk_options, zk_session
from shardkeeper.client import DataClient
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
@operator_errors
def verify(target: ZkTarget, paths: Paths) -> None:
    """Check that every shard's in-sync replicas have equal digests; exit 1 if not."""
    with zk_session(target, paths) as zk:
        kv = DataClient(zk, paths)
        bad = {}
        for shard in range(kv.routing().shards):
            infos = _settled_infos(kv, shard)
            if not _agree(infos):
                bad[shard] = infos
    for shard, infos in sorted(bad.items()):
        click.echo(f"shard {shard}: replicas differ")
        for agent, info in sorted(infos.items()):
            if isinstance(info, ShardInfo):
                click.echo(f"  {agent}: digest {info.digest[:16]} rows {info.rows}"
                           f" max_lsn {info.max_lsn} state {info.state}")
            else:
                click.echo(f"  {agent}: unreadable: {info}")
    if bad:
        raise click.ClickException(f"{len(bad)} of {kv.routing().shards} shards differ")
    click.echo(f"{kv.routing().shards} shards verified: every replica's digest is equal")


COMMANDS = (put, get, delete, load, verify)


def _agree(infos: dict[str, ShardInfo | str]) -> bool:
    if not infos:
        return False
    if not all(isinstance(i, ShardInfo) for i in infos.values()):
        return False
    return len({i.digest for i in infos.values()}) == 1


@retry(retry=retry_if_result(lambda infos: not _agree(infos)), stop=stop_after_attempt(4),
       wait=wait_fixed(0.5), retry_error_callback=lambda state: state.outcome.result())
def _settled_infos(kv: DataClient, shard: int) -> dict[str, ShardInfo | str]:
    """A shard's replica digests, read again a few times if they differ: a write in flight
    reaches replicas one after another, and a routing change may be landing."""
    kv.invalidate()
    return kv.shard_infos(shard)
