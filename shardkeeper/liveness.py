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


def parse_hello(line: bytes, tokens: Iterable[str]) -> tuple[str, float] | None:
    """(agent, started) from a hello line carrying one of the peer ``tokens`` (two during a
    rotation), else None."""
    parts = line.strip().split(b" ")
    if len(parts) != 5 or b" ".join(parts[:2]) != HELLO:
        return None
    if not accepted(parts[4], tokens):
        return None
    try:
        return parts[2].decode("ascii"), float(parts[3])
    except (UnicodeDecodeError, ValueError):
        return None
