"""The data plane's wire format: what any client or peer of an agent needs to speak to it.

Every request carries a token as ``Authorization: Bearer <token>``, except ``/healthz``,
``/readyz`` and ``/metrics`` (probes and scrapers hold none; they reveal no key, value or
secret); a wrong or missing token gets 401. Clients hold the cluster token, which
opens the client endpoints (keys, batch, digest); agents hold the peer token
(``shardkeeper.token``), which opens every endpoint, and the replication endpoints
(replicate, rows, snapshot, repair) take nothing else: 403 ``forbidden``. Bodies are JSON, except
the two bulk answers (a rows page, a snapshot), which are binary; keys and values are bytes,
sent base64 (standard alphabet) in JSON and percent-encoded in URL paths (``key_path``).

Endpoints (``S`` is the shard number, ``K`` the percent-encoded key)::

    GET    /healthz                        200 {"status","serving","writable","shards"}: alive
    GET    /readyz                         200 {"status"} | 503 {"error": "not_ready", "reason"}
    GET    /metrics                        200 Prometheus text format
    GET    /v1/shards/S/keys/K             200 {"key","value","lsn"} | 404 {"error":"not_found"}
    PUT    /v1/shards/S/keys/K  {"value"}  200 {"lsn"}
    DELETE /v1/shards/S/keys/K             200 {"lsn"}        (writes a tombstone)
    POST   /v1/shards/S/batch   {"puts":[{"key","value"}]}   200 {"lsns":[...]}
    POST   /v1/shards/S/replicate {"term","prev_lsn","sync","rows":[row]}   primary -> replica
                                           200 {"sync_lsn"} | 409 {"error": "stale_term"
                                           | "term_ahead", "term"} | 409 {"error": "gap"
                                           | "diverged", "sync_lsn"} | 409 not_replica
    GET    /v1/shards/S/rows?after=N&limit=M   200 a rows page (binary, ``encode_rows_page``)
    GET    /v1/shards/S/snapshot           200 the store file, a consistent image | 409 busy
    GET    /v1/shards/S/digest             200 {"digest","max_lsn","sync_lsn","promotion_lsn",
                                                "rows","state","term"}
    POST   /v1/shards/S/repair  {"keys":[key]}  200 {"rows":[{"key", "row": row | null}]}

A row is ``{"key": b64, "value": b64 | null, "lsn": int}``; ``null`` marks a tombstone, and
the LSN is in ``1..MAX_LSN`` (what a store's SQLite INTEGER holds).
Client reads and writes, and repair, are served by the shard's primary only; any other
holder answers ``307`` with ``Location`` and ``{"error": "not_primary", "primary": address}``
(or 503 ``no_primary`` when it knows none). Errors (``ErrorCode``), always JSON: 400
malformed, 401 token, 403 the peer token needed, 404 unknown endpoint, shard or key, 405
method, 408 too slow, 409 ordering or fencing, 411 no length, 413 oversized (keys over
``MAX_KEY_BYTES``, values over ``MAX_VALUE_BYTES``, bodies over ``MAX_BODY_BYTES``, batches
over ``MAX_BATCH_KEYS``), 417 expectation, 431 head too large, 503 unavailable (fenced, not
serving, replication failed, overloaded). A request that gets a 4xx changes nothing.

**Terms and fencing.** Each shard's primary holds a *term*: the plan generation that made it
primary. Its LSNs are ``(term << 32) | seq`` and every forward it sends carries its term. A
replica takes a forward only at exactly the term its own plan gives the shard's primary: a
lower term is a deposed primary (409 ``stale_term``), a higher one a primary the replica's
plan does not know yet (409 ``term_ahead``; the primary retries briefly). Neither changes
anything, so a forged forward cannot move a replica's fence.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

API = "/v1/shards"

# -- limits ------------------------------------------------------------------------------
MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1 << 20
MAX_BODY_BYTES = 32 << 20
MAX_BATCH_KEYS = 10_000
MAX_PAGE_ROWS = 10_000
DEFAULT_PAGE_ROWS = 10_000
MAX_PAGE_BYTES = 8 << 20  # keys + values per rows page (at least one row)
MAX_LSN = (1 << 63) - 1  # stores keep LSNs in SQLite's signed 64-bit INTEGER
MAX_TERM = MAX_LSN >> 32  # LSNs are (term << 32) | seq
MAX_SHARD = 10**9 - 1

# The rows stream (bootstrap, catch-up) is binary: per-row JSON and base64 cost more than
# the SQLite work on both ends. Snapshots are the store file itself.
ROWS_CONTENT_TYPE = "application/vnd.shardkeeper.rows"
SNAPSHOT_CONTENT_TYPE = "application/vnd.shardkeeper.snapshot"


class ErrorCode(StrEnum):
    """The ``error`` of every error answer (the status it comes with in the comment)."""

    MALFORMED = "malformed"  # 400
    UNAUTHORIZED = "unauthorized"  # 401
    FORBIDDEN = "forbidden"  # 403: a replication endpoint called without the peer token
    NOT_FOUND = "not_found"  # 404: no live row for the key
    UNKNOWN_SHARD = "unknown_shard"  # 404: this agent does not hold the shard
    NO_SUCH_ENDPOINT = "no_such_endpoint"  # 404
    METHOD_NOT_ALLOWED = "method_not_allowed"  # 405
    NOT_PRIMARY = "not_primary"  # 307, with "primary"
    STALE_TERM = "stale_term"  # 409: a forward from a deposed primary
    TERM_AHEAD = "term_ahead"  # 409: a forward from a primary this replica's plan lacks
    GAP = "gap"  # 409: the replica misses rows before the forward's prev_lsn
    DIVERGED = "diverged"  # 409: the replica holds rows past prev_lsn the forward lacks
    NOT_REPLICA = "not_replica"  # 409: a forward to a holder that takes none
    NOT_A_SOURCE = "not_a_source"  # 409: rows or a snapshot from a holder still copying
    BUSY = "busy"  # 409: another snapshot of the shard is being sent
    BEHIND_HORIZON = "behind_horizon"  # 409: rows asked for past compacted deletes, with "horizon"
    TIMEOUT = "timeout"  # 408: the head or body did not arrive in time
    LENGTH_REQUIRED = "length_required"  # 411: a body without Content-Length
    OVERSIZED = "oversized"  # 413
    EXPECTATION_FAILED = "expectation_failed"  # 417: an Expect other than 100-continue
    HEAD_TOO_LARGE = "head_too_large"  # 431
    INTERNAL = "internal"  # 500: a bug (the agent logs it); never for a malformed request
    OVERLOADED = "overloaded"  # 503: the agent's connection limit is reached
    NO_PRIMARY = "no_primary"  # 503
    SHARD_NOT_OPEN = "shard_not_open"  # 503
    STORE_FAILED = "store_failed"  # 503: the shard's store failed (a full disk, an I/O error)
    NOT_SERVING = "not_serving"  # 503: the agent's ZooKeeper session was lost
    NOT_WRITABLE = "not_writable"  # 503: the agent's ZooKeeper session is suspended
    NOT_READY = "not_ready"  # 503 from /readyz, with "reason"
    REPLICATION_FAILED = "replication_failed"  # 503, with "replicas"


class Malformed(ValueError):
    """A value that breaks the wire format; a server answers it with ``status``/``error``."""

    status = 400
    error = ErrorCode.MALFORMED


class Oversized(Malformed):
    """A key, value, body or batch over its limit."""

    status = 413
    error = ErrorCode.OVERSIZED


class MalformedPage(Malformed):
    """A rows page that does not parse or breaks the limits."""


# -- paths -------------------------------------------------------------------------------


def shard_path(shard: int, endpoint: str) -> str:
    """``/v1/shards/S/<endpoint>`` (batch, replicate, rows, snapshot, digest, repair)."""
    return f"{API}/{shard}/{endpoint}"


def key_path(shard: int, key: bytes) -> str:
    return f"{API}/{shard}/keys/{urllib.parse.quote_from_bytes(key, safe='')}"


def rows_path(shard: int, after: int, limit: int) -> str:
    return f"{API}/{shard}/rows?after={after}&limit={limit}"


# -- values ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One stored version of a key; ``value is None`` marks a tombstone (a delete)."""

    key: bytes
    value: bytes | None
    lsn: int

    @property
    def tombstone(self) -> bool:
        return self.value is None


# A row as stored and streamed: (key, value or None, lsn, tombstone 0/1).
Entry = tuple[bytes, bytes | None, int, int]


def entry_to_row(entry: Entry) -> Row:
    key, value, lsn, tombstone = entry
    return Row(bytes(key), None if tombstone else bytes(value or b""), lsn)


def check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or not key:
        raise Malformed("key must be non-empty bytes")
    if len(key) > MAX_KEY_BYTES:
        raise Oversized(f"key is {len(key)} bytes, the limit is {MAX_KEY_BYTES}")


def check_value(value: bytes | None) -> None:
    if value is None:
        return
    if not isinstance(value, bytes):
        raise Malformed("value must be bytes")
    if len(value) > MAX_VALUE_BYTES:
        raise Oversized(f"value is {len(value)} bytes, the limit is {MAX_VALUE_BYTES}")


def check_row(row: Row) -> None:
    check_key(row.key)
    check_value(row.value)
    if not 0 < row.lsn <= MAX_LSN:
        raise Malformed(f"row LSN must be in 1..{MAX_LSN}, got {row.lsn}")


# -- JSON --------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise Malformed(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise Malformed(f"{what} is not valid base64") from exc


def row_to_json(row: Row) -> dict[str, Any]:
    return {
        "key": b64(row.key),
        "value": None if row.value is None else b64(row.value),
        "lsn": row.lsn,
    }


def row_from_json(obj: Any) -> Row:
    """The row a JSON object describes; raises Malformed (or Oversized) if it breaks a rule."""
    if not isinstance(obj, dict):
        raise Malformed("a row must be an object")
    lsn = obj.get("lsn")
    if not isinstance(lsn, int) or isinstance(lsn, bool):
        raise Malformed("row lsn must be an integer")
    value = obj.get("value")
    row = Row(unb64(obj.get("key"), "key"), None if value is None else unb64(value, "value"), lsn)
    check_row(row)
    return row


def json_object(raw: bytes) -> dict[str, Any]:
    """An answer's JSON object; ``{}`` for an empty body or anything else (an error page)."""
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


# -- rows pages --------------------------------------------------------------------------
# A page is a header, then each row as a fixed head, the key and the value (absent for a
# tombstone). Integers are big-endian.
_ROWS_MAGIC = b"SKR1"
_PAGE_HEAD = struct.Struct(">4sQIB")  # magic, max_lsn (the source's synced LSN), rows, flags
_ROW_HEAD = struct.Struct(">QHI")  # lsn, key length, value length (or _TOMBSTONE)
_TOMBSTONE = 0xFFFFFFFF
_COMPLETE = 0x01  # flag: the page holds every synced row after the requested LSN


def encode_rows_page(entries: Sequence[Entry], max_lsn: int, complete: bool) -> bytes:
    parts = [_PAGE_HEAD.pack(_ROWS_MAGIC, max_lsn, len(entries), _COMPLETE if complete else 0)]
    pack = _ROW_HEAD.pack
    for key, value, lsn, tombstone in entries:
        if tombstone or value is None:
            parts.append(pack(lsn, len(key), _TOMBSTONE))
            parts.append(key)
        else:
            parts.append(pack(lsn, len(key), len(value)))
            parts.append(key)
            parts.append(value)
    return b"".join(parts)


def decode_rows_page(data: bytes) -> tuple[list[Entry], int, bool]:
    """``(entries, max_lsn, complete)``; raises MalformedPage on anything out of bounds."""
    view = memoryview(data)
    if len(view) < _PAGE_HEAD.size:
        raise MalformedPage("rows page shorter than its header")
    magic, max_lsn, count, flags = _PAGE_HEAD.unpack_from(view, 0)
    if magic != _ROWS_MAGIC:
        raise MalformedPage("not a rows page")
    entries: list[Entry] = []
    at, end, head = _PAGE_HEAD.size, len(view), _ROW_HEAD.size
    unpack = _ROW_HEAD.unpack_from
    for _ in range(count):
        if at + head > end:
            raise MalformedPage("rows page truncated")
        lsn, key_len, value_len = unpack(view, at)
        at += head
        tombstone = value_len == _TOMBSTONE
        size = key_len + (0 if tombstone else value_len)
        if not (0 < key_len <= MAX_KEY_BYTES and (tombstone or value_len <= MAX_VALUE_BYTES)):
            raise MalformedPage(f"row at LSN {lsn}: key or value size out of bounds")
        if not 0 < lsn <= MAX_LSN or at + size > end:
            raise MalformedPage(f"row at LSN {lsn}: bad LSN or truncated")
        key = bytes(view[at : at + key_len])
        value = None if tombstone else bytes(view[at + key_len : at + size])
        entries.append((key, value, lsn, 1 if tombstone else 0))
        at += size
    if at != end:
        raise MalformedPage("trailing bytes after the last row")
    return entries, max_lsn, bool(flags & _COMPLETE)
