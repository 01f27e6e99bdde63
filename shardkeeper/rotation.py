"""Rotating a data-plane token without downtime: the three steps of `shardkeeper token rotate`.

A token znode lists tokens, the first sent and every one accepted (``shardkeeper/token.py``);
agents, the leader and clients follow it through a watch. A rotation of the token or of the
peer token takes three writes of its znode, each a versioned ``multi`` with the step
recorded beside it (``token_rotation`` / ``peer_token_rotation``, ``layout.RotationStep``):

1. ``begin``: ``old`` -> ``old new``. Every agent accepts both, and still sends ``old``.
2. ``switch``: ``old new`` -> ``new old``. Every one sends ``new`` (clients and agents),
   and still accepts ``old`` from whoever has not switched yet.
3. ``finish``: ``new old`` -> ``new``. ``old`` is refused from now on.

``abort`` walks back before ``finish``: from ``switched`` it writes ``old new`` (the step
is ``begun`` again: both still accepted, ``old`` sent) and waits until every agent sends
``old``; from ``begun`` it checks that every agent sends ``old``, then writes ``old``
alone. Each write is the mirror of a forward step, with the same wait before the next.

No request is refused on the way, provided each step has reached every agent before the
next is written: ``begin`` and ``switch`` wait until every live member answers
``GET /v1/auth`` with the new token (for ``switch``: as the token it sends), and each step
first checks what the previous one waited for, so that nothing is written while an agent
lags. Agents that take a token from an environment variable do not follow the znode: the
checks name them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from shardkeeper import cluster as clusterstate
from shardkeeper.layout import Paths, RotationStep
from shardkeeper.peer import PeerClient, PeerUnavailable
from shardkeeper.poll import poll_until
from shardkeeper.token import (
    PEER_TOKEN_ENV,
    TOKEN_ENV,
    NoToken,
    fingerprint,
    no_token_message,
    split_tokens,
)
from shardkeeper.vocab import ShardkeeperError

AUTH_PATH = "/v1/auth"
DEFAULT_TIMEOUT = 30.0


class OutOfOrder(ShardkeeperError):
    """A step asked for out of turn, or a token znode changed by hand mid-rotation."""


class Lagging(ShardkeeperError):
    """Some live agents did not take the new token in time (the message names them)."""


@dataclass(frozen=True)
class Kind:
    """Which token: the cluster (client) token or the peer token."""

    name: str  # for messages: "token" or "peer token"
    path: str
    marker: str  # where the rotation's step is recorded
    env: str
    credential: str  # what GET /v1/auth answers for it
    flag: str  # the CLI's option for it

    @classmethod
    def of(cls, paths: Paths, peer: bool) -> Kind:
        if peer:
            return cls("peer token", paths.peer_token, paths.rotation(paths.peer_token),
                       PEER_TOKEN_ENV, "peer", " --peer")
        return cls("token", paths.token, paths.rotation(paths.token), TOKEN_ENV, "client", "")

    def command(self, step: str) -> str:
        return f"`shardkeeper token rotate {step}{self.flag}`"


@dataclass(frozen=True)
class State:
    """One read of a token znode and of its rotation step (None: no rotation under way)."""

    tokens: tuple[str, ...]
    version: int
    step: RotationStep | None
    step_version: int

    def describe(self, kind: Kind) -> dict:
        """For `token status`: how many tokens, their fingerprints (sent first), the step."""
        following = {"begun": "switch", "switched": "finish"}
        return {
            "accepted": len(self.tokens),
            "fingerprints": [fingerprint(t) for t in self.tokens],
            "rotation": self.step.step if self.step else None,
            "next": kind.command(following[self.step.step]) if self.step else None,
        }


def read_state(client: KazooClient, paths: Paths, kind: Kind) -> State:
    try:
        data, stat = client.get(kind.path)
    except NoNodeError:
        raise NoToken(no_token_message(paths)) from None
    try:
        raw, step_stat = client.get(kind.marker)
    except NoNodeError:
        return State(split_tokens(data.decode(errors="replace")), stat.version, None, -1)
    step = RotationStep.decode(kind.marker, raw)
    return State(split_tokens(data.decode(errors="replace")), stat.version, step,
                 step_stat.version)


def _expect(state: State, kind: Kind, step: str | None) -> None:
    """Refuse a step unless the rotation is at ``step`` (None: none under way) and the znode
    still lists what the previous step wrote."""
    if state.step is None and step is None:
        if len(state.tokens) != 1:
            raise OutOfOrder(f"the {kind.name} znode lists {len(state.tokens)} tokens and no"
                             f" rotation is recorded: set it to one token first")
        return
    if state.step is None:
        raise OutOfOrder(f"no rotation of the {kind.name} is under way: start one with"
                         f" {kind.command('begin')}")
    following = {"begun": "switch", "switched": "finish"}[state.step.step]
    if state.step.step != step:
        raise OutOfOrder(f"a rotation of the {kind.name} is under way ({state.step.step}):"
                         f" its next step is {kind.command(following)}")
    where = 1 if step == "begun" else 0
    if len(state.tokens) != 2 or fingerprint(state.tokens[where]) != state.step.new:
        raise OutOfOrder(f"the {kind.name} znode was changed by hand during a rotation: set"
                         f" it to one token and delete {kind.marker}")


def _write(client: KazooClient, kind: Kind, state: State, tokens: list[str],
           step: RotationStep | None) -> None:
    """The token znode and the step, in one versioned multi: a concurrent step loses."""
    tx = client.transaction()
    tx.set_data(kind.path, " ".join(tokens).encode(), version=state.version)
    marker = kind.marker
    if step is None:
        tx.delete(marker, version=state.step_version)
    elif state.step is None:
        tx.create(marker, step.encode())
    else:
        tx.set_data(marker, step.encode(), version=state.step_version)
    if any(isinstance(result, Exception) for result in tx.commit()):
        raise OutOfOrder(f"the {kind.name} or its rotation changed meanwhile (another"
                         " rotation step?): nothing written; run `shardkeeper token status`")


def begin(client: KazooClient, paths: Paths, kind: Kind) -> str:
    """Step 1: list a new token after the old one. Returns the new token."""
    state = read_state(client, paths, kind)
    _expect(state, kind, None)
    new = secrets.token_urlsafe(32)
    _write(client, kind, state, [state.tokens[0], new],
           RotationStep("begun", fingerprint(new), time.time()))
    return new


def switch(client: KazooClient, paths: Paths, kind: Kind,
           check: Callable[[str], None]) -> str:
    """Step 2: the new token first. ``check(new)`` runs before writing (every agent must
    accept it). Returns the new token."""
    state = read_state(client, paths, kind)
    _expect(state, kind, "begun")
    old, new = state.tokens
    check(new)
    _write(client, kind, state, [new, old],
           RotationStep("switched", state.step.new, state.step.since))
    return new


def finish(client: KazooClient, paths: Paths, kind: Kind,
           check: Callable[[str], None]) -> str:
    """Step 3: the new token alone. ``check(new)`` runs before writing (every agent must
    send it already). Returns the new token."""
    state = read_state(client, paths, kind)
    _expect(state, kind, "switched")
    new = state.tokens[0]
    check(new)
    _write(client, kind, state, [new], None)
    return new


def step_back(client: KazooClient, paths: Paths, kind: Kind) -> str:
    """Undo ``switch``: ``new old`` -> ``old new``, the rotation ``begun`` again; both are
    still accepted everywhere, and ``old`` is sent again. Returns the old token."""
    state = read_state(client, paths, kind)
    _expect(state, kind, "switched")
    new, old = state.tokens
    _write(client, kind, state, [old, new],
           RotationStep("begun", state.step.new, state.step.since))
    return old


def abort(client: KazooClient, paths: Paths, kind: Kind,
          check: Callable[[str], None]) -> str:
    """Undo ``begin``: ``old new`` -> ``old``; the new token is refused from now on.
    ``check(old)`` runs before writing (every agent must send the old token). Returns it."""
    state = read_state(client, paths, kind)
    if state.step is None:
        raise OutOfOrder(f"no rotation of the {kind.name} is under way: nothing to abort")
    _expect(state, kind, "begun")
    old = state.tokens[0]
    check(old)
    _write(client, kind, state, [old], None)
    return old


def step_of(client: KazooClient, paths: Paths, kind: Kind) -> str | None:
    """The rotation's step ("begun", "switched"), or None if none is under way."""
    step = read_state(client, paths, kind).step
    return step.step if step else None


def lagging(client: KazooClient, paths: Paths, kind: Kind, token: str,
            sent: bool) -> dict[str, str]:
    """Live members (``members/``) that do not accept ``token`` as ``kind`` (with ``sent``:
    as the one they send), each with why. One GET /v1/auth per member, in parallel."""
    members = clusterstate.read_members(client, paths, skip_corrupt=True)
    peer = PeerClient(token, timeout=2.0, attempts=1)

    def why(address: str) -> str | None:
        try:
            reply = peer.call(address, "GET", AUTH_PATH)
        except PeerUnavailable:
            return "no answer"
        if reply.status != 200:
            return f"answers {reply.status}"
        if reply.body.get("credential") != kind.credential:
            return f"takes it for a {reply.body.get('credential')} token"
        if sent and not reply.body.get("current"):
            return "still sends the old one"
        return None

    if not members:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(members))) as pool:
        answers = dict(zip(members, pool.map(why, [m.address for m in members.values()]),
                           strict=True))
    return {agent: reason for agent, reason in sorted(answers.items()) if reason}


def wait_for_agents(client: KazooClient, paths: Paths, kind: Kind, token: str, sent: bool,
                    timeout: float) -> None:
    """Until every live member accepts ``token`` (``sent``: sends it); Lagging on timeout."""
    last: dict[str, str] = {}

    def done() -> bool:
        last.clear()
        last.update(lagging(client, paths, kind, token, sent))
        return not last

    try:
        poll_until(done, timeout, "agents", interval=0.2)
    except ShardkeeperError:
        what = "send" if sent else "accept"
        named = ", ".join(f"{agent} ({reason})" for agent, reason in last.items())
        raise Lagging(f"timed out after {timeout:g}s: agents that do not {what} the new"
                      f" {kind.name}: {named}") from None
