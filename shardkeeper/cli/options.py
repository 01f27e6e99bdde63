"""Options and error handling shared by every `shardkeeper` command.

Exit codes: 0 done; 1 the operation failed (ZooKeeper unreachable, a request refused, a
key not found); 2 the input was refused: a bad option or value, missing or wrong ZooKeeper
credentials, or a corrupt or incomplete znode read from the cluster. Either way the error
is one line on stderr, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoAuthError
from kazoo.handlers.threading import KazooTimeoutError

from shardkeeper.layout import Paths
from shardkeeper.vocab import ConfigError, CorruptZnode, ShardkeeperError
from shardkeeper.zk import (
    AUTH_HINT,
    Credential,
    NotAuthorised,
    Tls,
    ZkTarget,
    ZkTargetError,
    close,
    connect,
)

DEFAULT_ZK = "127.0.0.1:2181"
DEFAULT_CLUSTER = "default"


class InputError(click.ClickException):
    """Input refused while a command runs (not while click parses it): one line, and exit 2
    like a usage error."""

    exit_code = 2


class CredentialType(click.ParamType):
    """USER:PASSWORD; several in SHARDKEEPER_ZK_AUTH are separated by newlines (a password
    may hold any other printable character). Messages never repeat the value."""

    name = "USER:PASSWORD"

    def split_envvar_value(self, rv: str) -> list[str]:
        return [line for line in rv.split("\n") if line.strip("\r ")]

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Credential:
        if isinstance(value, Credential):
            return value
        try:
            return Credential.parse(str(value).strip("\r"))
        except ZkTargetError as e:
            self.fail(str(e), param, ctx)


def read_credentials(path: Path) -> tuple[Credential, ...]:
    """A credentials file: one USER:PASSWORD per line (two during a rotation)."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--zk-auth-file {path}: cannot read it"
                         f" ({getattr(e, 'strerror', None) or e})") from None
    lines = [line.strip("\r") for line in text.split("\n") if line.strip()]
    if not lines:
        raise InputError(f"--zk-auth-file {path}: no USER:PASSWORD line in it")
    try:
        return tuple(Credential.parse(line) for line in lines)
    except ZkTargetError as e:
        raise InputError(f"--zk-auth-file {path}: {e}") from None


def write_credentials(path: Path, credentials: tuple[Credential, ...]) -> Path:
    """Write a credentials file only its owner can read; returns its absolute path."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # O_CREAT keeps the mode of a file that already exists
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write("".join(f"{c.user}:{c.password}\n" for c in credentials))
    return path.resolve()


def build_target(hosts: str, auth: tuple[Credential, ...] = (), auth_file: Path | None = None,
                 tls: bool = False, ca: Path | None = None, cert: Path | None = None,
                 key: Path | None = None) -> ZkTarget:
    """The ZkTarget of a command's options; every problem is an InputError naming the option."""
    credentials = tuple(auth) + (read_credentials(auth_file) if auth_file else ())
    tls_options = None
    if tls or ca or cert or key:
        try:
            tls_options = Tls(ca, cert, key)
            tls_options.check()
        except ZkTargetError as e:
            raise InputError(f"--zk-tls: {e}") from None
    try:
        return ZkTarget.parse(hosts, tuple(dict.fromkeys(credentials)), tls_options)
    except ZkTargetError as e:
        raise InputError(f"--zk: {e}") from None


_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange lets NaN through (every comparison with it is false)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


def writable_dir(path: Path, option: str) -> Path:
    """Create ``path`` if needed and prove it writable now: a bad directory is one line at
    start-up, not a traceback from the first file written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise InputError(f"{option} {path}: cannot create or write it ({reason})") from None
    return path


def auth_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--zk-auth and --zk-auth-file, handed over as ``zk_auth`` and ``zk_auth_file``."""
    f = click.option(
        "--zk-auth-file", type=_FILE, envvar="SHARDKEEPER_ZK_AUTH_FILE",
        help="File holding USER:PASSWORD (one per line; two during a password rotation):"
             " keeps the password out of `ps` and the environment."
             " Env: SHARDKEEPER_ZK_AUTH_FILE.")(f)
    return click.option(
        "--zk-auth", type=CredentialType(), multiple=True, envvar="SHARDKEEPER_ZK_AUTH",
        help="ZooKeeper digest credential USER:PASSWORD (printable ASCII). With it, znodes"
             " are created readable and writable only with it; repeat it during a password"
             " rotation. Shown by `ps`: prefer the env var or --zk-auth-file."
             " Env: SHARDKEEPER_ZK_AUTH (several: one per line).")(f)


def zk_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--zk, credentials, TLS and --cluster on a command, validated, handed over as
    ``target`` (a ZkTarget) and ``paths``."""

    @click.option("--zk", "zk_hosts", envvar="SHARDKEEPER_ZK", default=DEFAULT_ZK,
                  show_default=True, help="ZooKeeper servers HOST:PORT[,HOST:PORT...]"
                  " (IPv6 as [ADDR]:PORT). Env: SHARDKEEPER_ZK.")
    @auth_options
    @click.option("--zk-tls", is_flag=True, envvar="SHARDKEEPER_ZK_TLS",
                  help="Talk TLS to ZooKeeper (its secureClientPort); on by itself when a"
                  " --zk-tls-* file is given. Env: SHARDKEEPER_ZK_TLS=1.")
    @click.option("--zk-tls-ca", type=_FILE, envvar="SHARDKEEPER_ZK_TLS_CA",
                  help="PEM file of the CA that signed ZooKeeper's certificate (default:"
                  " the system's). Env: SHARDKEEPER_ZK_TLS_CA.")
    @click.option("--zk-tls-cert", type=_FILE, envvar="SHARDKEEPER_ZK_TLS_CERT",
                  help="PEM client certificate for ZooKeeper (it requires one unless"
                  " ssl.clientAuth=none). Env: SHARDKEEPER_ZK_TLS_CERT.")
    @click.option("--zk-tls-key", type=_FILE, envvar="SHARDKEEPER_ZK_TLS_KEY",
                  help="PEM private key of --zk-tls-cert. Env: SHARDKEEPER_ZK_TLS_KEY.")
    @click.option("--cluster", envvar="SHARDKEEPER_CLUSTER", default=DEFAULT_CLUSTER,
                  show_default=True, help="Cluster name. Env: SHARDKEEPER_CLUSTER.")
    @functools.wraps(f)
    def wrapper(*args: Any, zk_hosts: str, zk_auth: tuple[Credential, ...],
                zk_auth_file: Path | None, zk_tls: bool, zk_tls_ca: Path | None,
                zk_tls_cert: Path | None, zk_tls_key: Path | None, cluster: str,
                **kwargs: Any) -> Any:
        try:
            paths = Paths(cluster)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--cluster") from None
        target = build_target(zk_hosts, zk_auth, zk_auth_file, zk_tls, zk_tls_ca,
                              zk_tls_cert, zk_tls_key)
        return f(*args, target=target, paths=paths, **kwargs)

    return wrapper


def operator_errors(f: Callable[..., Any]) -> Callable[..., Any]:
    """Turn errors meant for the operator into click's one-line `Error: ...`: exit 2 for
    refused input (values, credentials, what was read from ZooKeeper), 1 for the rest."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except NotAuthorised as e:
            raise InputError(str(e)) from None
        except NoAuthError:
            raise InputError(f"not authorised: the cluster's ACL refused a request;"
                             f" {AUTH_HINT} with the cluster's credentials") from None
        except (CorruptZnode, ConfigError) as e:
            raise InputError(str(e)) from None
        except ShardkeeperError as e:
            raise click.ClickException(str(e)) from None
        except (KazooException, KazooTimeoutError) as e:
            raise click.ClickException(f"ZooKeeper request failed ({type(e).__name__}):"
                                       " try again; check ZooKeeper's health") from None
        except BrokenPipeError:
            # The reader went away (`| head`): nothing more to say, and nowhere to say it.
            # stdout's file is pointed at /dev/null so that the flush at exit cannot fail.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(1) from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        except KeyboardInterrupt:
            # Ctrl-C outside the waits that handle it: the shell's status, no traceback
            # (click would print "Aborted!" and exit 1).
            raise click.exceptions.Exit(130) from None

    return wrapper


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


@contextlib.contextmanager
def zk_session(target: ZkTarget, paths: Paths) -> Iterator[KazooClient]:
    """A ZooKeeper session for one admin command, closed when the command ends. Refuses
    at once (NotAuthorised) when the credentials do not open the cluster's root."""
    client = connect(target, root=paths.root)
    try:
        yield client
    finally:
        close(client)
