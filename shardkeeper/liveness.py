"""The liveness link's protocol, shared by both ends: an agent connects to the address the
leader advertises in the epoch znode and sends one line, ``HELLO agent started token``;
then neither side sends anything. The leader's end is ``coordinator/liveness.py``, the
agent's ``agents/leaderlink.py``; what the link is for is said there."""

from __future__ import annotations

from collections.abc import Iterable

from shardkeeper.token import accepted

HELLO = b"shardkeeper-liveness 1"
MAX_HELLO = 512


def hello(agent: str, started: float, token: str) -> bytes:
    """The one line an agent sends after connecting."""
    return b" ".join([HELLO, agent.encode(), repr(started).encode(), token.encode()]) + b"\n"


class HelloRefused(Exception):
    """A hello the leader does not take: ``reason``, and the agent it names if it names one
    (printable ASCII, at most 64 characters: the line may be anyone's)."""

    def __init__(self, reason: str, agent: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.agent = agent


def check_hello(line: bytes, tokens: Iterable[str]) -> tuple[str, float]:
    """(agent, started) from a hello line carrying one of the peer ``tokens`` (two during a
    rotation); raises HelloRefused otherwise."""
    parts = line.strip().split(b" ")
    if len(parts) != 5 or b" ".join(parts[:2]) != HELLO:
        raise HelloRefused("not a liveness hello")
    name = parts[2].decode("ascii", "replace")
    agent = name if name.isascii() and name.isprintable() and len(name) <= 64 else None
    if not accepted(parts[4], tokens):
        raise HelloRefused("its peer token is not one this leader accepts", agent)
    try:
        return parts[2].decode("ascii"), float(parts[3])
    except (UnicodeDecodeError, ValueError):
        raise HelloRefused("a malformed hello", agent) from None


def parse_hello(line: bytes, tokens: Iterable[str]) -> tuple[str, float] | None:
    """``check_hello``, with None for a refused hello."""
    try:
        return check_hello(line, tokens)
    except HelloRefused:
        return None
