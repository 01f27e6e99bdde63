"""The data plane's two secrets: one reader for agents, clients and the CLI.

- The **cluster token** (``token`` znode, ``SHARDKEEPER_TOKEN``): what clients send. It opens
  the client endpoints: reads, writes, batches, digests.
- The **peer token** (``peer_token`` znode, ``SHARDKEEPER_PEER_TOKEN``): what agents send each
  other. It opens the replication endpoints (replicate, rows, snapshot, repair) as well, so
  that a client token holder cannot forge a forward or read a whole shard out of band.
  Clients never read it.

`shardkeeper init` creates both znodes; the environment variable on a host overrides each.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from shardkeeper.layout import Paths
from shardkeeper.vocab import ShardkeeperError

TOKEN_ENV = "SHARDKEEPER_TOKEN"
PEER_TOKEN_ENV = "SHARDKEEPER_PEER_TOKEN"

Watch = Callable[[object], None]


class NoToken(ShardkeeperError):
    """The cluster has no token yet and none is set in the environment."""


class BadTokens(ShardkeeperError):
    """The tokens set cannot be used (empty, or the peer token equal to the cluster token)."""


@dataclass(frozen=True)
class Tokens:
    """What an agent needs: the client token it accepts, the peer token it sends and accepts."""

    client: str
    peer: str

    def __post_init__(self) -> None:
        if not self.client or not self.peer:
            raise BadTokens("both data-plane tokens must be non-empty")
        if self.client == self.peer:
            # Equal tokens would give every client the replication endpoints again.
            raise BadTokens(f"{PEER_TOKEN_ENV} must differ from the cluster token")


def no_token_message(paths: Paths) -> str:
    return f"cluster {paths.cluster!r} has no token: run `shardkeeper init` or set {TOKEN_ENV}"


def no_tokens_message(paths: Paths) -> str:
    """For an agent, which needs both: `init` adds a missing peer token to an older cluster."""
    return (f"cluster {paths.cluster!r} lacks its token or peer token: run `shardkeeper init`"
            f" or set {TOKEN_ENV} and {PEER_TOKEN_ENV}")


def _read(client: KazooClient, path: str, env: str, watch: Watch | None) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    if client.exists(path, watch=watch) is None:
        return None
    try:
        data, _ = client.get(path)
    except NoNodeError:
        return None
    return data.decode() if data else None


def read_token(client: KazooClient, paths: Paths, watch: Watch | None = None) -> str | None:
    """SHARDKEEPER_TOKEN, else the token znode; None if neither is set. ``watch`` (if given)
    fires when the znode is created or changes, so that a waiting agent wakes at once."""
    return _read(client, paths.token, TOKEN_ENV, watch)


def read_peer_token(client: KazooClient, paths: Paths, watch: Watch | None = None) -> str | None:
    """SHARDKEEPER_PEER_TOKEN, else the peer_token znode; None if neither is set. Agents only."""
    return _read(client, paths.peer_token, PEER_TOKEN_ENV, watch)


def read_tokens(client: KazooClient, paths: Paths, watch: Watch | None = None) -> Tokens | None:
    """Both tokens, or None while either is missing (``watch`` is set on each missing one)."""
    token = read_token(client, paths, watch)
    peer = read_peer_token(client, paths, watch)
    if token is None or peer is None:
        return None
    return Tokens(token, peer)


def require_token(client: KazooClient, paths: Paths) -> str:
    token = read_token(client, paths)
    if token is None:
        raise NoToken(no_token_message(paths))
    return token
