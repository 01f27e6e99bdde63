"""`shardkeeper token`: the data-plane tokens' state, and rotating one without downtime
(``shardkeeper/rotation.py`` has the steps and why they are safe). No command prints a
token: only how many each znode lists and their fingerprints."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from shardkeeper import rotation
from shardkeeper.cli.options import (
    FiniteFloatRange,
    InputError,
    emit_json,
    operator_errors,
    zk_options,
    zk_session,
)
from shardkeeper.layout import Paths
from shardkeeper.rotation import Kind, OutOfOrder
from shardkeeper.token import fingerprint
from shardkeeper.zk import ZkTarget


@click.group()
def token() -> None:
    """Show the data-plane tokens, or rotate one with no failed request and no restart."""


@token.command("status")
@zk_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@operator_errors
def token_status(target: ZkTarget, paths: Paths, as_json: bool) -> None:
    """How many tokens each znode lists (all accepted, the first sent), their fingerprints
    (the first 8 hex digits of their SHA-256) and any rotation under way."""
    with zk_session(target, paths) as client:
        kinds = (Kind.of(paths, False), Kind.of(paths, True))
        states = {kind: rotation.read_state(client, paths, kind).describe(kind)
                  for kind in kinds}
    if as_json:  # keyed by znode: token, peer_token
        emit_json({kind.path.rsplit("/", 1)[1]: s for kind, s in states.items()})
        return
    for kind, s in states.items():
        name = kind.name
        prints = ", ".join(f"{p} (sent)" if i == 0 else p
                           for i, p in enumerate(s["fingerprints"]))
        line = f"{name + ':':<12} {s['accepted']} accepted: {prints}"
        if s["rotation"]:
            line += f"; rotation {s['rotation']}, next: {s['next']}"
        click.echo(line)


@token.group()
def rotate() -> None:
    """Rotate a token in three steps: begin, switch, finish (or abort before finish)."""


def step_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--timeout", type=FiniteFloatRange(min=0), default=rotation.DEFAULT_TIMEOUT,
        show_default=True,
        help="How long to wait for every live agent to take the new token; on timeout,"
        " exit 1 naming the agents that did not.")(f)
    return click.option("--peer", is_flag=True,
                        help="Rotate the peer token (agents' own) instead of the token"
                        " clients send.")(f)


def _out_of_order(f: Callable[..., Any]) -> Callable[..., Any]:
    """A step out of turn is refused input: exit 2, one line."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except OutOfOrder as e:
            raise InputError(str(e)) from None

    return wrapper


@rotate.command("begin")
@zk_options
@step_options
@operator_errors
@_out_of_order
def rotate_begin(target: ZkTarget, paths: Paths, peer: bool, timeout: float) -> None:
    """Step 1: list a new token after the old one; wait until every agent accepts it."""
    kind = Kind.of(paths, peer)
    with zk_session(target, paths) as client:
        new = rotation.begin(client, paths, kind)
        click.echo(f"{kind.name} {fingerprint(new)} listed: agents accept it and the old one")
        rotation.wait_for_agents(client, paths, kind, new, sent=False, timeout=timeout)
    click.echo(f"every live agent accepts {fingerprint(new)}: next, {kind.command('switch')}")


@rotate.command("switch")
@zk_options
@step_options
@operator_errors
@_out_of_order
def rotate_switch(target: ZkTarget, paths: Paths, peer: bool, timeout: float) -> None:
    """Step 2: send the new token (the old one still accepted); wait until every agent
    does. Checks first that every agent accepts it."""
    kind = Kind.of(paths, peer)
    with zk_session(target, paths) as client:
        new = rotation.switch(client, paths, kind, lambda t: rotation.wait_for_agents(
            client, paths, kind, t, sent=False, timeout=timeout))
        click.echo(f"{kind.name} {fingerprint(new)} is sent from now on")
        rotation.wait_for_agents(client, paths, kind, new, sent=True, timeout=timeout)
    click.echo(f"every live agent sends {fingerprint(new)}: next, {kind.command('finish')}")


@rotate.command("finish")
@zk_options
@step_options
@operator_errors
@_out_of_order
def rotate_finish(target: ZkTarget, paths: Paths, peer: bool, timeout: float) -> None:
    """Step 3: drop the old token; it is refused from now on. Checks first that every agent
    sends the new one."""
    kind = Kind.of(paths, peer)
    with zk_session(target, paths) as client:
        new = rotation.finish(client, paths, kind, lambda t: rotation.wait_for_agents(
            client, paths, kind, t, sent=True, timeout=timeout))
    click.echo(f"{kind.name} rotated: {fingerprint(new)} alone is accepted")


@rotate.command("abort")
@zk_options
@step_options
@operator_errors
@_out_of_order
def rotate_abort(target: ZkTarget, paths: Paths, peer: bool, timeout: float) -> None:
    """Give up a rotation before `finish`: the old token alone again, with no failed request.
    After `switch`, first send the old token again and wait until every agent does; then
    check that every agent sends it, and drop the new one (refused from then on)."""
    kind = Kind.of(paths, peer)
    with zk_session(target, paths) as client:
        if rotation.step_of(client, paths, kind) == "switched":
            old = rotation.step_back(client, paths, kind)
            click.echo(f"{kind.name} {fingerprint(old)} is sent again (both still accepted)")
            rotation.wait_for_agents(client, paths, kind, old, sent=True, timeout=timeout)
        old = rotation.abort(client, paths, kind, lambda t: rotation.wait_for_agents(
            client, paths, kind, t, sent=True, timeout=timeout))
    click.echo(f"rotation of the {kind.name} aborted: {fingerprint(old)} alone is accepted")


COMMANDS = (token,)
