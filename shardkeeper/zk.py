"""Connecting to ZooKeeper, with errors a person can act on."""

from __future__ import annotations

import contextlib
import logging

from kazoo.client import KazooClient
from kazoo.exceptions import NodeExistsError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.retry import KazooRetry

from shardkeeper.layout import Paths
from shardkeeper.vocab import ShardkeeperError

log = logging.getLogger(__name__)


class ZkUnavailable(ShardkeeperError):
    pass


def connect(hosts: str, session_timeout: float = 10.0, connect_timeout: float = 5.0) -> KazooClient:
    """Start a session, or raise ZkUnavailable naming the hosts and the wait.

    Reconnection after a session loss is kazoo's job (a new session is made); the
    shells re-create their ephemeral znodes when they see CONNECTED after LOST.
    """
    client = KazooClient(
        hosts=hosts,
        timeout=session_timeout,
        connection_retry=KazooRetry(max_tries=-1, delay=0.05, max_delay=1.0),
        command_retry=KazooRetry(max_tries=3, delay=0.05, max_delay=0.5),
        logger=logging.getLogger("kazoo.client"),
    )
    try:
        client.start(timeout=connect_timeout)
    except KazooTimeoutError:
        client.stop()
        client.close()
        raise ZkUnavailable(
            f"cannot reach ZooKeeper at {hosts} within {connect_timeout:g}s:"
            " check --zk / SHARDKEEPER_ZK and that the server is running"
        ) from None
    except ValueError as e:
        client.close()
        raise ZkUnavailable(f"bad ZooKeeper address {hosts!r}: {e}") from None
    return client


def close(client: KazooClient) -> None:
    """Close the session now, so that its ephemeral znodes vanish at once."""
    try:
        client.stop()
    finally:
        client.close()


def ensure_layout(client: KazooClient, paths: Paths) -> None:
    for path in paths.persistent_dirs():
        with contextlib.suppress(NodeExistsError):
            client.ensure_path(path)
