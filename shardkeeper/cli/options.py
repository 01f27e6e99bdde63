"""Options and error handling shared by every `shardkeeper` command."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator
from typing import Any

import click
from kazoo.client import KazooClient

from shardkeeper.layout import Paths
from shardkeeper.vocab import ConfigError, CorruptZnode, ShardkeeperError
from shardkeeper.zk import close, connect

DEFAULT_ZK = "127.0.0.1:2181"
DEFAULT_CLUSTER = "default"


def zk_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--zk and --cluster on a command, validated, handed over as a Paths and hosts."""

    @click.option("--zk", "zk_hosts", envvar="SHARDKEEPER_ZK", default=DEFAULT_ZK,
                  show_default=True, help="ZooKeeper connect string (host:port,...)."
                  " Env: SHARDKEEPER_ZK.")
    @click.option("--cluster", envvar="SHARDKEEPER_CLUSTER", default=DEFAULT_CLUSTER,
                  show_default=True, help="Cluster name. Env: SHARDKEEPER_CLUSTER.")
    @functools.wraps(f)
    def wrapper(*args: Any, zk_hosts: str, cluster: str, **kwargs: Any) -> Any:
        try:
            paths = Paths(cluster)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--cluster") from None
        return f(*args, zk_hosts=zk_hosts, paths=paths, **kwargs)

    return wrapper


def operator_errors(f: Callable[..., Any]) -> Callable[..., Any]:
    """Turn errors meant for the operator into click's one-line `Error: ...` exit 1."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except (ShardkeeperError, CorruptZnode, ConfigError) as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


@contextlib.contextmanager
def zk_session(hosts: str) -> Iterator[KazooClient]:
    """A ZooKeeper session for one admin command, closed when the command ends."""
    client = connect(hosts)
    try:
        yield client
    finally:
        close(client)
