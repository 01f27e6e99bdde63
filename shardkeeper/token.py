"""The data plane's two secrets: one reader for agents, clients and the CLI.

- The **cluster token** (``token`` znode, ``SHARDKEEPER_TOKEN``): what clients send. It opens
  the client endpoints: reads, writes, batches, digests.
- The **peer token** (``peer_token`` znode, ``SHARDKEEPER_PEER_TOKEN``): what agents send each
  other. It opens the replication endpoints (replicate, rows, snapshot, repair) as well, so
  that a client token holder cannot forge a forward or read a whole shard out of band.
  Clients never read it.

`shardkeeper init` creates both znodes; the environment variable on a host overrides each.

Either may hold several tokens separated by white space, so that a token can be rotated
without downtime (``shardkeeper/rotation.py``, `shardkeeper token rotate`): the first is
the one sent, every one listed is accepted. One token is the same format with one entry.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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


def split_tokens(text: str | None) -> tuple[str, ...]:
    """The tokens a znode or variable holds, in order: separated by any white space."""
    return tuple(text.split()) if text else ()


def fingerprint(token: str) -> str:
    """Says which token is meant without saying it: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def accepted(given: bytes, tokens: Iterable[str], prefix: bytes = b"") -> bool:
    """Whether ``given`` is ``prefix`` + one of ``tokens``: each is compared, in constant
    time, whatever matched before (no early exit tells which, or how many, there are)."""
    found = False
    for token in tokens:
        found |= hmac.compare_digest(given, prefix + token.encode())
    return found


@dataclass(frozen=True)
class Tokens:
    """What an agent needs: the client token it accepts, the peer token it sends and accepts.

    ``client`` and ``peer`` are the tokens sent (the first of each list); ``client_accepted``
    and ``peer_accepted`` every one accepted, sent first (left empty: the sent one alone).
    """

    client: str
    peer: str
    client_accepted: tuple[str, ...] = field(default=())
    peer_accepted: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.client or not self.peer:
            raise BadTokens("both data-plane tokens must be non-empty")
        for name, sent in (("client_accepted", self.client), ("peer_accepted", self.peer)):
            listed = getattr(self, name) or (sent,)
            if listed[0] != sent or any(not t or t != "".join(t.split()) for t in listed):
                raise BadTokens("a token list must start with the token sent and hold no"
                                " white space inside a token")
            object.__setattr__(self, name, tuple(listed))
        if set(self.client_accepted) & set(self.peer_accepted):
            # Equal tokens would give every client the replication endpoints again.
            raise BadTokens(f"no token in {PEER_TOKEN_ENV} (or the peer_token znode) may"
                            " equal a cluster token")

    @classmethod
    def parse(cls, client: str, peer: str) -> Tokens:
        """From the two znodes' (or variables') text; BadTokens if either lists none."""
        clients, peers = split_tokens(client), split_tokens(peer)
        if not clients or not peers:
            raise BadTokens("both data-plane tokens must be non-empty")
        return cls(clients[0], peers[0], clients, peers)

    def __repr__(self) -> str:  # never the tokens themselves, should one be logged
        return (f"Tokens(client={fingerprint(self.client)}, peer={fingerprint(self.peer)},"
                f" {self.counts()})")

    def counts(self) -> str:
        """For a log line: how many tokens each set accepts, and the fingerprint of the peer
        token sent (never a token)."""
        return (f"accepting {len(self.client_accepted)} client token(s) and"
                f" {len(self.peer_accepted)} peer token(s), sending peer token"
                f" {fingerprint(self.peer)}")


def no_token_message(paths: Paths) -> str:
    return f"cluster {paths.cluster!r} has no token: run `shardkeeper init` or set {TOKEN_ENV}"


def no_tokens_message(paths: Paths) -> str:
    """For an agent, which needs both: `init` adds a missing peer token to an older cluster."""
    return (f"cluster {paths.cluster!r} lacks its token or peer token: run `shardkeeper init`"
            f" or set {TOKEN_ENV} and {PEER_TOKEN_ENV}")


def _read(client: KazooClient, path: str, env: str, watch: Watch | None) -> str | None:
    """The raw text (the variable's, else the znode's); None if neither holds a token."""
    if split_tokens(os.environ.get(env)):
        return os.environ[env]
    if client.exists(path, watch=watch) is None:
        return None
    try:
        data, _ = client.get(path)
    except NoNodeError:
        return None
    text = data.decode() if data else ""
    return text if split_tokens(text) else None


def _first(text: str | None) -> str | None:
    return split_tokens(text)[0] if text else None


def read_token(client: KazooClient, paths: Paths, watch: Watch | None = None) -> str | None:
    """The cluster token to send (the first listed in SHARDKEEPER_TOKEN, else in the token
    znode); None if neither is set. ``watch`` (if given) fires when the znode is created or
    changes, so that a waiting agent wakes at once."""
    return _first(_read(client, paths.token, TOKEN_ENV, watch))


def read_peer_token(client: KazooClient, paths: Paths, watch: Watch | None = None) -> str | None:
    """The peer token to send (SHARDKEEPER_PEER_TOKEN, else the peer_token znode; the first
    listed); None if neither is set. Agents only."""
    return _first(_read(client, paths.peer_token, PEER_TOKEN_ENV, watch))


def read_peer_tokens(client: KazooClient, paths: Paths) -> tuple[str, ...]:
    """Every peer token accepted (the leader's liveness check); () if none is set."""
    return split_tokens(_read(client, paths.peer_token, PEER_TOKEN_ENV, None))


def peer_tokens_of(data: bytes | None) -> tuple[str, ...]:
    """The peer tokens accepted, from the peer_token znode's data as a DataWatch gives it
    (SHARDKEEPER_PEER_TOKEN, if set, still wins)."""
    if split_tokens(os.environ.get(PEER_TOKEN_ENV)):
        return split_tokens(os.environ[PEER_TOKEN_ENV])
    return split_tokens(data.decode(errors="replace") if data else None)


def read_tokens(client: KazooClient, paths: Paths, watch: Watch | None = None) -> Tokens | None:
    """Both token lists, or None while either is missing (``watch`` is set on each missing
    one); BadTokens if they cannot be used together."""
    token = _read(client, paths.token, TOKEN_ENV, watch)
    peer = _read(client, paths.peer_token, PEER_TOKEN_ENV, watch)
    if token is None or peer is None:
        return None
    return Tokens.parse(token, peer)


def follow_token(client: KazooClient, paths: Paths, use: Callable[[str], None]) -> None:
    """Call ``use(token)`` with the cluster token to send each time the token znode changes
    (a client follows a rotation); nothing if SHARDKEEPER_TOKEN is set (it wins)."""
    if split_tokens(os.environ.get(TOKEN_ENV)):
        return

    def changed(data: bytes | None, _stat: object) -> None:
        token = _first(data.decode(errors="replace") if data else None)
        if token:
            use(token)

    client.DataWatch(paths.token, changed)


def require_token(client: KazooClient, paths: Paths) -> str:
    token = read_token(client, paths)
    if token is None:
        raise NoToken(no_token_message(paths))
    return token
