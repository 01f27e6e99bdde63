"""How a znode's JSON is written and read strictly: the helpers under every codec of
``shardkeeper.layout`` (which owns the formats themselves).

Decoders raise :class:`CorruptZnode` with the path and the reason, never another
exception, and bound every number they accept.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from shardkeeper.vocab import CorruptZnode


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


# Bounds on what a decoder accepts: a damaged or forged znode must not become a huge or
# non-finite number that later code trusts (an LSN, a generation, a shard index).
MAX_COUNT = (1 << 63) - 1  # fits SQLite's INTEGER and ZooKeeper's versions
MAX_SHARD = 999_999  # shard numbers are below config.MAX_SHARDS


def decode_object(path: str, data: bytes | None) -> dict[str, Any]:
    """The znode's JSON object, or CorruptZnode: never another exception, whatever the
    bytes (invalid UTF-8, deep nesting, numbers past Python's int-string limit, ...)."""
    if not data:
        raise CorruptZnode(f"{path}: empty znode")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeError included
        raise CorruptZnode(f"{path}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise CorruptZnode(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def field(path: str, obj: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in obj:
        raise CorruptZnode(f"{path}: missing field {key!r}")
    value = obj[key]
    # bool is an int subclass: a JSON true must not pass as a count.
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise CorruptZnode(f"{path}: field {key!r} must be a number, got {value!r}")
    if not isinstance(value, kind):
        raise CorruptZnode(f"{path}: field {key!r} has the wrong type ({show(value)})")
    if isinstance(value, float) and not math.isfinite(value):
        raise CorruptZnode(f"{path}: field {key!r} must be finite, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_COUNT:
        raise CorruptZnode(f"{path}: field {key!r} is out of range")
    return value


def count(path: str, obj: dict[str, Any], key: str, default: int | None = None) -> int:
    """A non-negative integer field (a generation, an epoch, an LSN, a count)."""
    if key not in obj and default is not None:
        return default
    value = field(path, obj, key, int)
    if value < 0:
        raise CorruptZnode(f"{path}: field {key!r} must be >= 0, got {value}")
    return value


def number(path: str, obj: dict[str, Any], key: str, default: float | None = None) -> float:
    if key not in obj and default is not None:
        return default
    return float(field(path, obj, key, (int, float)))


def text(path: str, obj: dict[str, Any], key: str, default: str | None = None,
          limit: int = 4096) -> str:
    if key not in obj and default is not None:
        return default
    value = field(path, obj, key, str)
    if len(value) > limit:
        raise CorruptZnode(f"{path}: field {key!r} is longer than {limit} characters")
    return value


def shard(path: str, key: Any) -> int:
    """A shard number used as a JSON object key: ASCII digits, within range."""
    if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 6):
        raise CorruptZnode(f"{path}: bad shard number {show(key)}")
    return int(key)


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _text_key(fragment: tuple[int, str, str]) -> str:
    return fragment[1]


def encode_with(fields: dict[str, Any], name: str, items: dict[int, Any]) -> bytes:
    """:func:`encode` of ``fields`` plus ``name``: an object of shard -> entry, built
    from each entry's ``json_text()`` (keys sorted as text, as ``sort_keys`` does)."""
    made = []
    for s, e in items.items():
        # Each entry keeps its '"shard":json' text (entries are frozen, and most are the
        # same objects as in the agent's previous plan or status).
        fragment = e.__dict__.get("_fragment")
        if fragment is None or fragment[0] != s:
            key = str(s)
            fragment = (s, key, f'"{key}":{e.json_text()}')
            object.__setattr__(e, "_fragment", fragment)
        made.append(fragment)
    made.sort(key=_text_key)
    body = ",".join([f[2] for f in made])
    parts = {key: json.dumps(value, separators=(",", ":"), sort_keys=True)
             for key, value in fields.items()}
    parts[name] = f"{{{body}}}"
    return ("{" + ",".join(f"{json.dumps(k)}:{parts[k]}" for k in sorted(parts))
            + "}").encode()


Entries = dict[str, tuple[Any, int, Any]]  # JSON key -> (raw entry, shard, decoded)


def entries(path: str, raw: dict[str, Any], previous: object,
            entry_of: Callable[[int, Any], Any]) -> tuple[dict[int, Any], Entries]:
    """Decode a znode's shard -> entry object, taking over each entry whose raw JSON is
    the same as in ``previous`` (a decoded object of the same kind, or None).

    An agent's plan and status each hold an entry per replica (hundreds to thousands),
    and re-replication rewrites them at every plan step with a few entries changed:
    comparing the parsed JSON is a fraction of validating and building each entry again.
    An entry equal to one that passed the checks passes them again with the same result.
    """
    known: Entries = getattr(previous, "__dict__", {}).get("_entries") or {}
    out: dict[int, Any] = {}
    seen: Entries = {}
    for key, entry in raw.items():
        hit = known.get(key)
        if hit is not None and hit[0] == entry:
            number, value = hit[1], hit[2]
        else:
            number = shard(path, key)
            value = entry_of(number, entry)
        out[number] = value
        seen[key] = (entry, number, value)
    return out, seen
