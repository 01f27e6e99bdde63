"""Admin requests: what `shardkeeper drain/pause/move/config/...` write under admin/.

The CLI never writes a plan; it records a request and the leader carries it out.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from dataclasses import replace

from kazoo.client import KazooClient
from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random

from shardkeeper import cluster
from shardkeeper.config import ClusterConfig
from shardkeeper.layout import AuditEvent, Maintenance, MoveRequest, Paths, decode_events
from shardkeeper.vocab import ConfigError, CorruptZnode, ShardkeeperError
from shardkeeper.zk import ensure_layout


def init_cluster(client: KazooClient, paths: Paths, config: ClusterConfig,
                 overwrite: bool) -> ClusterConfig | None:
    """Create the cluster's znodes, its data-plane token and its config.

    Returns the config already in place, untouched, when there is one and ``overwrite`` is
    false; None when ``config`` was written. With ``overwrite``, an existing config takes
    the new replica count and keeps its policies (set with `config set`); a damaged one
    is replaced. The shard count never changes: ConfigError if it would.
    """
    ensure_layout(client, paths)
    with contextlib.suppress(NodeExistsError):
        # The data plane's shared secret; SHARDKEEPER_TOKEN on a host overrides it.
        client.create(paths.token, secrets.token_urlsafe(32).encode())
    with contextlib.suppress(NodeExistsError):  # agents' replication secret (issue 10)
        client.create(paths.peer_token, secrets.token_urlsafe(32).encode())
    try:
        client.create(paths.config, config.encode())
        return None
    except NodeExistsError:
        pass
    try:
        existing: ClusterConfig | None = cluster.read_config(client, paths)
    except CorruptZnode:
        existing = None  # damaged: --force is how an operator replaces it
    if not overwrite:
        if existing is None:
            raise ConfigError(f"cluster {paths.cluster!r} has a damaged config: pass --force"
                              " with its shard count to replace it")
        return existing
    try:
        meta = cluster.read_plan_meta(client, paths)
    except CorruptZnode:
        meta = None
    fixed = existing.shards if existing else (meta.shards if meta else None)
    if fixed is not None and fixed != config.shards:
        raise ConfigError(
            f"cluster {paths.cluster!r} has {fixed} shards and that is fixed: every key maps"
            f" to a shard by it, so another count would strand data. To use {config.shards}"
            f" shards, create a new cluster: shardkeeper init --cluster NEW-NAME --shards"
            f" {config.shards} --replicas {config.replicas}")
    new = replace(existing, replicas=config.replicas) if existing else config
    client.set(paths.config, new.encode())
    return None


def drain(client: KazooClient, paths: Paths, agent: str) -> bool:
    """Mark ``agent`` draining; False if it already was."""
    try:
        client.create(paths.drain(agent), b"{}", makepath=True)
        return True
    except NodeExistsError:
        return False


def undrain(client: KazooClient, paths: Paths, agent: str) -> bool:
    try:
        client.delete(paths.drain(agent))
        return True
    except NoNodeError:
        return False


def draining(client: KazooClient, paths: Paths) -> set[str]:
    try:
        return set(client.get_children(paths.drains))
    except NoNodeError:
        return set()


def maintenance(client: KazooClient, paths: Paths) -> Maintenance | None:
    try:
        data, _ = client.get(paths.maintenance)
    except NoNodeError:
        return None
    return Maintenance.decode(paths.maintenance, data)


def pause(client: KazooClient, paths: Paths, note: str) -> Maintenance | None:
    """Enter manual maintenance; returns the maintenance already in force, if any."""
    try:
        client.create(paths.maintenance, Maintenance("manual", time.time(), note).encode(),
                      makepath=True)
        return None
    except NodeExistsError:
        return maintenance(client, paths)


def resume(client: KazooClient, paths: Paths) -> bool:
    try:
        client.delete(paths.maintenance)
        return True
    except NoNodeError:
        return False


def request_rebalance(client: KazooClient, paths: Paths) -> None:
    """Bump admin/rebalance's version: the leader re-plans at once, ignoring the delay."""
    with contextlib.suppress(NodeExistsError):
        client.create(paths.rebalance, b"{}", makepath=True)
    client.set(paths.rebalance, b"{}")


def request_move(client: KazooClient, paths: Paths, move: MoveRequest) -> str:
    config = cluster.read_config(client, paths)
    if not 0 <= move.shard < config.shards:
        raise ShardkeeperError(f"no shard {move.shard}: shards are 0..{config.shards - 1}")
    if move.source == move.dest:
        raise ShardkeeperError("--from and --to name the same agent")
    return client.create(paths.move_prefix, move.encode(), sequence=True, makepath=True)


def set_config(client: KazooClient, paths: Paths, settings: dict[str, str]) -> ClusterConfig:
    """Apply KEY=VALUE settings with a version check, so that concurrent edits don't mix:
    on a concurrent write, read again and re-apply (a few times, then give up)."""

    @retry(retry=retry_if_exception_type(BadVersionError), stop=stop_after_attempt(5),
           wait=wait_random(0.01, 0.1), reraise=True)
    def attempt() -> ClusterConfig:
        try:
            data, stat = client.get(paths.config)
        except NoNodeError:
            raise cluster.NoConfig(
                f"cluster {paths.cluster!r} has no config: run `shardkeeper init`"
            ) from None
        new = ClusterConfig.decode(paths.config, data).with_settings(settings)
        client.set(paths.config, new.encode(), version=stat.version)
        return new

    try:
        return attempt()
    except BadVersionError:
        raise ShardkeeperError("config keeps changing under us: try again") from None


def events(client: KazooClient, paths: Paths, after: str = "") -> list[tuple[str, AuditEvent]]:
    """Audit log entries in order, optionally only those in znodes after ``after``."""
    try:
        names = sorted(n for n in client.get_children(paths.events) if n > after)
    except NoNodeError:
        return []
    out = []
    pending = [(n, client.get_async(f"{paths.events}/{n}")) for n in names]
    for name, result in pending:
        try:
            data, _ = result.get()
            out += [(name, e) for e in decode_events(f"{paths.events}/{name}", data)]
        except (NoNodeError, CorruptZnode):
            continue  # trimmed meanwhile, or damaged: skip it
    return out
