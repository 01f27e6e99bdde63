"""The data plane's cluster token: one reader for agents, clients and the CLI.

Every data-plane request carries it. ``SHARDKEEPER_TOKEN`` on a host overrides the
cluster's ``token`` znode, which `shardkeeper init` creates.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from shardkeeper.layout import Paths
from shardkeeper.vocab import ShardkeeperError

TOKEN_ENV = "SHARDKEEPER_TOKEN"


class NoToken(ShardkeeperError):
    """The cluster has no token yet and none is set in the environment."""


def no_token_message(paths: Paths) -> str:
    return f"cluster {paths.cluster!r} has no token: run `shardkeeper init` or set {TOKEN_ENV}"


def read_token(client: KazooClient, paths: Paths,
               watch: Callable[[object], None] | None = None) -> str | None:
    """SHARDKEEPER_TOKEN, else the token znode; None if neither is set. ``watch`` (if given)
    fires when the znode is created or changes, so that a waiting agent wakes at once."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    if client.exists(paths.token, watch=watch) is None:
        return None
    try:
        data, _ = client.get(paths.token)
    except NoNodeError:
        return None
    return data.decode() if data else None


def require_token(client: KazooClient, paths: Paths) -> str:
    token = read_token(client, paths)
    if token is None:
        raise NoToken(no_token_message(paths))
    return token
