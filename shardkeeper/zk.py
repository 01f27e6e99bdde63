"""Connecting to ZooKeeper, with errors a person can act on.

One place owns the connection settings: a :class:`ZkTarget` (servers, digest credentials,
TLS), validated once when it is built (by the CLI's shared options, the dev cluster, the
tests and the benchmarks) and handed to :func:`connect`. Nothing else builds a KazooClient.

Access control: a client with credentials authenticates with every one of them (digest
scheme) and creates every znode with an ACL that grants all permissions to exactly those
credentials (kazoo's ``default_acl``), so callers never pass an ACL themselves. During a
password rotation a process holds the old and the new credential: it can read znodes
that carry either, and what it creates carries both (see docs/security.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError, NodeExistsError, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.retry import KazooRetry
from kazoo.security import ACL, ANYONE_ID_UNSAFE, Permissions, make_digest_acl

from shardkeeper.layout import ROOT, Paths
from shardkeeper.vocab import ShardkeeperError

log = logging.getLogger(__name__)

DEFAULT_PORT = 2181

# The parent of every cluster is shared by all clusters on the ensemble: anyone may create
# their own cluster under it (and list the names), nobody may delete it or change its ACL.
# Each cluster root below it carries its own credentials' ACL.
PARENT_ACL = (ACL(Permissions.READ | Permissions.CREATE, ANYONE_ID_UNSAFE),)

AUTH_HINT = "pass --zk-auth USER:PASSWORD (or SHARDKEEPER_ZK_AUTH, or --zk-auth-file PATH)"


class ZkUnavailable(ShardkeeperError):
    pass


class NotAuthorised(ZkUnavailable):
    """ZooKeeper answers but refuses our credentials for the cluster's znodes.

    A subclass of ZkUnavailable on purpose: an agent or coordinator treats both alike and
    waits, retrying with backoff, until an operator fixes the credentials or the ACL (during
    a password rotation the ACL may grant a new credential a little later)."""


class ZkTargetError(ValueError):
    """A connect string, credential or TLS setting is malformed; the message says how."""


def _port(text: str, entry: str, allow_zero: bool = False) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text):
        what = "missing" if not text else f"{text!r} is not a number"
        raise ZkTargetError(f"bad port in {entry!r}: {what}")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ZkTargetError(f"bad port in {entry!r}: {port} is outside {low}-65535")
    return port


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def _hostname(host: str, entry: str) -> str:
    if not host:
        raise ZkTargetError(f"missing host in {entry!r}")
    if len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise ZkTargetError(f"bad host {host!r} in {entry!r}: expected a DNS name or an IP"
                            " address (IPv6 in brackets, e.g. [::1]:2181)")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ZkTargetError(f"bad IPv4 address {host!r} in {entry!r}") from None
    return host


def split_host_port(entry: str, default_port: int | None = DEFAULT_PORT,
                    allow_zero: bool = False) -> tuple[str, int]:
    """Parse ``host:port``, ``[v6]:port`` (or, with a default port, ``host``, ``[v6]``)
    strictly: every malformed part raises ZkTargetError naming it. ``allow_zero``: port 0
    (any free port) is allowed, for addresses to listen on."""
    if entry.startswith("["):
        end = entry.find("]")
        if end < 0:
            raise ZkTargetError(f"unbalanced '[' in {entry!r}")
        host, rest = entry[1:end], entry[end + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ZkTargetError(f"bad IPv6 address {host!r} in {entry!r}") from None
        if rest and not rest.startswith(":"):
            raise ZkTargetError(f"unexpected {rest!r} after ']' in {entry!r}")
        port_text, has_port = rest[1:], bool(rest)
    else:
        if "]" in entry:
            raise ZkTargetError(f"unbalanced ']' in {entry!r}")
        if entry.count(":") > 1:
            raise ZkTargetError(f"IPv6 addresses need brackets, e.g. [::1]:2181, in {entry!r}")
        host, sep, port_text = entry.partition(":")
        has_port = bool(sep)
        _hostname(host, entry)
    if not has_port:
        if default_port is None:
            raise ZkTargetError(f"missing port in {entry!r}: expected HOST:PORT")
        return host, default_port
    return host, _port(port_text, entry, allow_zero)


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Credential:
    """A ZooKeeper digest credential. The password never appears in a repr or a message."""

    user: str
    password: str = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> Credential:
        user, sep, password = text.partition(":")
        if not sep or not user or not password:
            raise ZkTargetError("expected USER:PASSWORD, both non-empty")
        # ZooKeeper decodes the digest in the server's locale: beyond ASCII the hash it
        # computes may differ from ours and the credential would never match.
        for what, value in (("user", user), ("password", password)):
            if not all("!" <= ch <= "~" for ch in value):
                raise ZkTargetError(f"the {what} must be printable ASCII without spaces")
        return cls(user, password)

    @property
    def auth(self) -> tuple[str, str]:
        return ("digest", f"{self.user}:{self.password}")

    def acl(self) -> ACL:
        return make_digest_acl(self.user, self.password, all=True)


@dataclass(frozen=True)
class Tls:
    """TLS to ZooKeeper's secureClientPort. The server's certificate is always verified
    (against ``ca``, else the system's trusted CAs) and must name the host in --zk;
    ``cert``/``key`` are the client's certificate, which ZooKeeper requires by default
    (``ssl.clientAuth=need``)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ZkTargetError("a TLS client certificate needs its key, and the key its"
                                " certificate: give --zk-tls-cert and --zk-tls-key together")

    def check(self) -> None:
        """Load the files now, so that a bad one is reported before connecting (inside
        kazoo's connection thread it would only look like an unreachable server)."""
        try:
            context = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        except (ssl.SSLError, OSError) as e:
            raise ZkTargetError(f"cannot load CA certificates from {self.ca}: {e}") from None
        if self.cert is not None and self.key is not None:
            try:
                context.load_cert_chain(str(self.cert), str(self.key))
            except (ssl.SSLError, OSError) as e:
                raise ZkTargetError(f"cannot load the TLS client certificate {self.cert}"
                                    f" with key {self.key}: {e}") from None


@dataclass(frozen=True)
class ZkTarget:
    """Where ZooKeeper is and how to talk to it: servers, credentials, TLS."""

    hosts: tuple[tuple[str, int], ...]
    credentials: tuple[Credential, ...] = ()
    tls: Tls | None = None

    @classmethod
    def parse(cls, hosts: str, credentials: tuple[Credential, ...] = (),
              tls: Tls | None = None) -> ZkTarget:
        """``host:port[,host:port...]``, strictly: no empty entries, ports 1-65535,
        IPv6 in brackets. A chroot suffix is refused: a cluster always lives under
        /shardkeeper/<cluster>, where its ACL is managed."""
        text = hosts.strip()
        if not text:
            raise ZkTargetError("no ZooKeeper servers given: expected HOST:PORT[,HOST:PORT...]")
        if "/" in text:
            raise ZkTargetError(f"a chroot suffix is not supported in {hosts!r}:"
                                " expected HOST:PORT[,HOST:PORT...]")
        entries = [e.strip() for e in text.split(",")]
        if not all(entries):
            raise ZkTargetError(f"empty server entry in {hosts!r} (a stray comma?)")
        return cls(tuple(split_host_port(e) for e in entries), tuple(credentials), tls)

    @property
    def connect_string(self) -> str:
        return ",".join(format_host_port(h, p) for h, p in self.hosts)

    def __str__(self) -> str:
        return self.connect_string

    def acl(self) -> list[ACL] | None:
        """The ACL of every znode this target's client creates (None: ZooKeeper's open
        default, as without credentials)."""
        return [c.acl() for c in self.credentials] or None


class _RecordingLog(logging.LoggerAdapter):
    """kazoo's logger for one client, remembering the last connection failure, so that a
    timeout can say why (a refused TLS handshake otherwise looks like a dead server)."""

    REASONS = ("Connection dropped", "Connection time-out", "Cannot resolve")

    def __init__(self) -> None:
        super().__init__(logging.getLogger("kazoo.client"), {})
        self.last_failure = ""

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if level >= logging.WARNING and str(msg).startswith(self.REASONS):
            with contextlib.suppress(TypeError, ValueError):
                self.last_failure = str(msg) % args
        super().log(level, msg, *args, **kwargs)


def not_authorised_message(target: ZkTarget, path: str) -> str:
    if not target.credentials:
        return f"not authorised to read {path}: the cluster has an ACL; {AUTH_HINT}"
    users = ", ".join(sorted({c.user for c in target.credentials}))
    return (f"not authorised to read {path} with the credentials given (user {users}):"
            f" the cluster's ACL does not grant them; {AUTH_HINT} with the cluster's")


def connect(target: ZkTarget, session_timeout: float = 10.0, connect_timeout: float = 5.0,
            *, root: str | None = None) -> KazooClient:
    """Start a session, or raise ZkUnavailable naming the hosts and the wait.

    With ``root`` (a cluster's root znode), check that we may read it: NotAuthorised says
    which credentials to pass, instead of a NoAuth on the first read of the caller.

    Reconnection after a session loss is kazoo's job (a new session is made); the
    shells re-create their ephemeral znodes when they see CONNECTED after LOST.
    """
    recorder = _RecordingLog()
    tls = target.tls
    client = KazooClient(
        hosts=target.connect_string,
        timeout=session_timeout,
        connection_retry=KazooRetry(max_tries=-1, delay=0.05, max_delay=1.0),
        command_retry=KazooRetry(max_tries=3, delay=0.05, max_delay=0.5),
        logger=recorder,
        auth_data=[c.auth for c in target.credentials] or None,
        default_acl=target.acl(),
        use_ssl=tls is not None,
        ca=str(tls.ca) if tls and tls.ca else None,
        certfile=str(tls.cert) if tls and tls.cert else None,
        keyfile=str(tls.key) if tls and tls.key else None,
        verify_certs=True,
        check_hostname=tls is not None,
    )
    try:
        client.start(timeout=connect_timeout)
    except KazooTimeoutError:
        client.stop()
        client.close()
        reason = f" (last error: {recorder.last_failure})" if recorder.last_failure else ""
        hint = "check --zk / SHARDKEEPER_ZK and that the server is running"
        if tls is not None:
            hint += "; with TLS, that --zk names a secureClientPort and the certificates fit"
        raise ZkUnavailable(
            f"cannot reach ZooKeeper at {target} within {connect_timeout:g}s{reason}: {hint}"
        ) from None
    if root is not None:
        try:
            client.get(root)
        except NoNodeError:
            pass  # a cluster not created yet: the caller creates it or reports it
        except NoAuthError:
            close(client)
            raise NotAuthorised(not_authorised_message(target, root)) from None
    return client


def close(client: KazooClient) -> None:
    """Close the session now, so that its ephemeral znodes vanish at once."""
    try:
        client.stop()
    finally:
        client.close()


def ensure_layout(client: KazooClient, paths: Paths) -> None:
    """Create the cluster's containers; with credentials, under ACLs (the client's
    default), and the shared parent with PARENT_ACL so as not to lock out other clusters."""
    if client.default_acl:
        with contextlib.suppress(NodeExistsError):
            client.ensure_path(ROOT, acl=list(PARENT_ACL))
    for path in paths.persistent_dirs():
        with contextlib.suppress(NodeExistsError):
            client.ensure_path(path)


def walk(client: KazooClient, top: str) -> Iterator[str]:
    """``top`` and every znode below it, parents before children, a level at a time
    (each level's listings are issued together). Znodes that vanish meanwhile are skipped."""
    level = [top]
    while level:
        yield from level
        pending = [(p, client.get_children_async(p)) for p in level]
        level = []
        for parent, result in pending:
            try:
                children = result.get()
            except NoNodeError:
                continue
            base = parent.rstrip("/")
            level += [f"{base}/{c}" for c in sorted(children)]


def set_acl_tree(client: KazooClient, top: str, acl: list[ACL]) -> int:
    """Give ``top`` and every znode below it ``acl``; returns how many were changed.

    A znode created meanwhile by another process carries that process's default ACL: run
    this once every process holds the credentials ``acl`` grants (docs/security.md)."""
    changed = 0
    for path in walk(client, top):
        try:
            current, _ = client.get_acls(path)
            if set(current) != set(acl):
                client.set_acls(path, acl)
                changed += 1
        except NoNodeError:
            continue  # an ephemeral znode gone meanwhile
    return changed


def acl_census(client: KazooClient, top: str) -> dict[tuple[str, ...], int]:
    """How many znodes under ``top`` (itself included) carry each ACL, each ACL written as
    sorted ``scheme:name=perms`` entries (digest entries by user name, never the hash)."""
    counts: dict[tuple[str, ...], int] = {}
    for path in walk(client, top):
        try:
            acl, _ = client.get_acls(path)
        except NoNodeError:
            continue
        key = tuple(sorted(describe_acl(a) for a in acl))
        counts[key] = counts.get(key, 0) + 1
    return counts


def describe_acl(acl: ACL) -> str:
    perms = "".join(letter for bit, letter in (
        (Permissions.READ, "r"), (Permissions.WRITE, "w"), (Permissions.CREATE, "c"),
        (Permissions.DELETE, "d"), (Permissions.ADMIN, "a")) if acl.perms & bit)
    name = acl.id.id.split(":", 1)[0] if acl.id.scheme == "digest" else acl.id.id
    return f"{acl.id.scheme}:{name}={perms}"
