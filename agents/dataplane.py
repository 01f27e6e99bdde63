"""The data plane: the replicated key-value shard store served over HTTP.

This module owns the data-plane wire format. Every request carries the cluster token as
``Authorization: Bearer <token>`` (``/healthz`` too: the issue requires it on every request
and a probe can send a header); a wrong or missing token gets 401. Bodies are JSON, except
the two bulk answers (a rows page, a snapshot), which are binary; keys and values are bytes,
sent base64 (standard alphabet) in JSON, and percent-encoded in URL paths.

Endpoints (``S`` is the shard number, ``K`` the percent-encoded key)::

    GET    /healthz                        200 {"status","serving","writable","shards"} | 503
    GET    /v1/shards/S/keys/K             200 {"key","value","lsn"} | 404 {"error":"not_found"}
    PUT    /v1/shards/S/keys/K  {"value"}  200 {"lsn"}
    DELETE /v1/shards/S/keys/K             200 {"lsn"}
    POST   /v1/shards/S/batch   {"puts":[{"key","value"}]}   200 {"lsns":[...]}
    POST   /v1/shards/S/replicate {"generation","prev_lsn","sync","rows":[row]}
                                           200 {"sync_lsn"} | 409 {"error": "stale_generation"
                                           | "gap" | "diverged" | "not_replica", "sync_lsn"}
    GET    /v1/shards/S/rows?after=N&limit=M   200 rows page (binary, see encode_rows_page)
    GET    /v1/shards/S/snapshot           200 the store file, a consistent image | 409 busy
    GET    /v1/shards/S/digest             200 {"digest","max_lsn","sync_lsn","promotion_lsn",
                                                "rows","state","generation"}
    POST   /v1/shards/S/repair  {"keys":[key]}  200 {"rows":[{"key", "row": row | null}]}

A row is ``{"key": b64, "value": b64 | null, "lsn": int}``; ``null`` marks a tombstone.
The rows stream and the snapshot are binary (see ``encode_rows_page`` and ``copy_shard``).
Client reads and writes, and repair, are served by the shard's primary only; any other
holder answers ``307`` with ``Location`` and ``{"error":"not_primary","primary": address}``
(or 503 ``no_primary`` when it knows none). Errors: 400 malformed, 401 token, 404 unknown
shard or key, 405 method, 409 ordering/fencing, 413 oversized, 503 unavailable (fenced,
not serving, replication failed). A request that gets a 4xx changes nothing.

Write path (primary): under the shard's write lock, assign LSNs above the local maximum and
above every older generation's (``store.next_lsn``), apply locally, forward to every in-sync
replica (must ack) and every catching-up replica (best effort) in parallel with bounded
timeouts, and acknowledge only if every in-sync replica applied the rows and the agent is
still writable. Forwards carry ``prev_lsn`` (the primary's LSN before the batch); an in-sync
replica whose ``sync_lsn`` differs answers ``gap`` and the primary pushes it what it missed.
Holding the shard lock across the forward keeps each replica's stream in LSN order.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import fcntl
import functools
import hmac
import http.client
import json
import logging
import os
import select
import socket
import struct
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tenacity import (
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from agents.shardsm import ShardState
from agents.store import (
    MAX_KEY_BYTES,
    MAX_VALUE_BYTES,
    META_BOOTSTRAP_CURSOR,
    META_IMAGE_TRIED,
    META_SYNC_LSN,
    Entry,
    FileImage,
    OversizedError,
    Row,
    ShardStore,
    StoreBusy,
    StoreError,
    StoreSet,
    check_key,
    check_row,
    check_value,
    entry_to_row,
    lsn_generation,
    make_lsn,
    next_lsn,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20
MAX_BATCH_KEYS = 10_000
MAX_PAGE_ROWS = 10_000
DEFAULT_PAGE_ROWS = 10_000
MAX_PAGE_BYTES = 8 << 20  # keys + values per rows page (at least one row)
# A lagging in-sync replica is pushed at most this many rows inline with a write; beyond
# that it should leave the in-sync set and catch up on its own.
MAX_PUSH_ROWS = 50_000
PUSH_PAGE_ROWS = 2_000

API = "/v1/shards"


# -- wire format -------------------------------------------------------------------------


class HttpError(Exception):
    """An HTTP error answer: status plus a JSON body with at least ``error``."""

    def __init__(self, status: int, error: str, **details: Any):
        super().__init__(f"{status} {error}")
        self.status = status
        self.body = {"error": error, **details}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise HttpError(400, "malformed", detail=f"{what} must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise HttpError(400, "malformed", detail=f"{what} is not valid base64") from exc


def row_to_json(row: Row) -> dict[str, Any]:
    return {
        "key": b64(row.key),
        "value": None if row.value is None else b64(row.value),
        "lsn": row.lsn,
    }


def row_from_json(obj: Any) -> Row:
    if not isinstance(obj, dict):
        raise HttpError(400, "malformed", detail="a row must be an object")
    lsn = obj.get("lsn")
    if not isinstance(lsn, int) or isinstance(lsn, bool):
        raise HttpError(400, "malformed", detail="row lsn must be an integer")
    value = obj.get("value")
    row = Row(unb64(obj.get("key"), "key"), None if value is None else unb64(value, "value"), lsn)
    validate(check_row, row)
    return row


def validate(check: Callable[[Any], None], item: Any) -> None:
    """Run a store check, turning its complaint into 413 (too big) or 400 (malformed)."""
    try:
        check(item)
    except OversizedError as exc:
        raise HttpError(413, "oversized", detail=str(exc)) from exc
    except StoreError as exc:
        raise HttpError(400, "malformed", detail=str(exc)) from exc


def key_path(shard: int, key: bytes) -> str:
    return f"{API}/{shard}/keys/{urllib.parse.quote_from_bytes(key, safe='')}"


# The rows stream (bootstrap, catch-up) is binary: per-row JSON and base64 cost more than
# the SQLite work on both ends. A page is a header, then each row as a fixed head, the key
# and the value (absent for a tombstone). Integers are big-endian.
ROWS_CONTENT_TYPE = "application/vnd.shardkeeper.rows"
SNAPSHOT_CONTENT_TYPE = "application/vnd.shardkeeper.snapshot"
SNAPSHOT_CHUNK = 1 << 20
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


class MalformedPage(ValueError):
    """A rows page that does not parse or breaks the store's limits."""


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
        if lsn <= 0 or at + size > end:
            raise MalformedPage(f"row at LSN {lsn}: bad LSN or truncated")
        key = bytes(view[at : at + key_len])
        value = None if tombstone else bytes(view[at + key_len : at + size])
        entries.append((key, value, lsn, 1 if tombstone else 0))
        at += size
    if at != end:
        raise MalformedPage("trailing bytes after the last row")
    return entries, max_lsn, bool(flags & _COMPLETE)


# -- the shard table ---------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRoute:
    """What the data plane needs to know about one local shard replica.

    - ``state``: the local state from the shard state machine; only PRIMARY takes writes,
      only REPLICA and BOOTSTRAPPING take forwards, only REPLICA and PRIMARY are sources.
    - ``generation``: plan generation at which this agent took its role; as primary, the
      high bits of every LSN it issues (``Promote.generation``).
    - ``primary``: the current primary's address, for redirects and repair.
    - ``primary_generation``: replicas refuse forwards from primaries older than this.
    - ``in_sync``: replica addresses that must apply a write before it is acknowledged.
    - ``catching_up``: replica addresses that get forwards best effort (bootstrapping ones).
    """

    state: ShardState
    generation: int = 0
    primary: str | None = None
    primary_generation: int = 0
    in_sync: tuple[str, ...] = ()
    catching_up: tuple[str, ...] = ()


class ShardTable:
    """The agent runtime's view of its shards, read by the data plane. Thread-safe.

    The runtime drives it from ZooKeeper and the shard state machine:
    ``set_route`` / ``update`` / ``remove`` per shard, ``set_writable(False)`` on SUSPENDED
    (primaries refuse writes with 503), ``set_serving(False)`` on LOST (every request 503).
    The data plane itself only raises ``primary_generation`` (``fence``) when a newer
    primary forwards to this replica.
    """

    def __init__(self, *, writable: bool = True, serving: bool = True):
        self._lock = threading.Lock()
        self._routes: dict[int, ShardRoute] = {}
        self._writable = writable
        self._serving = serving

    def set_route(self, shard: int, route: ShardRoute) -> None:
        with self._lock:
            self._routes[shard] = route

    def update(self, shard: int, **changes: Any) -> ShardRoute:
        """Change some fields of a shard's route (which must exist); returns the new route."""
        with self._lock:
            route = replace(self._routes[shard], **changes)
            self._routes[shard] = route
            return route

    def remove(self, shard: int) -> None:
        with self._lock:
            self._routes.pop(shard, None)

    def route(self, shard: int) -> ShardRoute | None:
        with self._lock:
            return self._routes.get(shard)

    def routes(self) -> dict[int, ShardRoute]:
        with self._lock:
            return dict(self._routes)

    def fence(self, shard: int, generation: int) -> bool:
        """Accept a forward from a primary of ``generation``? Raises the fence if newer."""
        with self._lock:
            route = self._routes.get(shard)
            if route is None or generation < route.primary_generation:
                return False
            if generation > route.primary_generation:
                self._routes[shard] = replace(route, primary_generation=generation)
            return True

    @property
    def writable(self) -> bool:
        with self._lock:
            return self._writable

    def set_writable(self, writable: bool) -> None:
        with self._lock:
            self._writable = writable

    @property
    def serving(self) -> bool:
        with self._lock:
            return self._serving

    def set_serving(self, serving: bool) -> None:
        with self._lock:
            self._serving = serving


# -- peer / client helper ----------------------------------------------------------------


class PeerError(Exception):
    """A peer call failed; ``status`` is None when no HTTP answer came back."""

    def __init__(self, address: str, message: str, status: int | None = None, body: Any = None):
        super().__init__(f"{address}: {message}")
        self.address = address
        self.status = status
        self.body = body if isinstance(body, dict) else {}


class PeerUnavailable(PeerError):
    """No answer, or 503: worth retrying."""


class NotPrimary(PeerError):
    """The peer is not the shard's primary; ``primary`` names the one it knows, if any."""

    @property
    def primary(self) -> str | None:
        return self.body.get("primary")


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    data: bytes = b""  # the raw payload of a non-JSON answer (a rows page)


@dataclass(frozen=True)
class Page:
    """One page of the rows stream: ``entries`` in LSN order, ``max_lsn`` the source's synced
    LSN, ``complete`` when no synced row after the request's LSN was left out."""

    entries: list[Entry]
    max_lsn: int
    complete: bool = True

    @property
    def rows(self) -> list[Row]:
        return [entry_to_row(e) for e in self.entries]

    @property
    def last_lsn(self) -> int | None:
        return self.entries[-1][2] if self.entries else None


@dataclass(frozen=True)
class ShardInfo:
    digest: str
    max_lsn: int
    sync_lsn: int
    promotion_lsn: int
    rows: int
    state: str
    generation: int


class PeerClient:
    """HTTP calls to agents: forwarding, streaming, repair, and client reads and writes.

    Connections are kept alive per thread and address. Every call has a bounded timeout.
    Idempotent calls (reads, streaming, repair lookups) retry on no-answer and 503 with a
    bounded tenacity policy; writes follow up to ``max_redirects`` redirects to the primary.
    """

    def __init__(
        self,
        token: str,
        *,
        timeout: float = 2.0,
        attempts: int = 4,
        max_redirects: int = 3,
    ):
        self.token = token
        self.timeout = timeout
        self.attempts = attempts
        self.max_redirects = max_redirects
        self._local = threading.local()

    # transport

    def _connections(self) -> dict[str, http.client.HTTPConnection]:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def close(self) -> None:
        """Close this thread's connections."""
        for conn in self._connections().values():
            conn.close()
        self._connections().clear()

    def call(
        self,
        address: str,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: float | None = None,
    ) -> Reply:
        """One request; raises PeerUnavailable if no HTTP answer arrives in time."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        conns = self._connections()
        # A kept-alive connection may have been closed by the peer meanwhile: one fresh try.
        for reused in (address in conns, False):
            conn = conns.get(address)
            if conn is None:
                host, _, port = address.rpartition(":")
                conn = http.client.HTTPConnection(host, int(port), timeout=timeout or self.timeout)
                conns[address] = conn
            else:
                conn.timeout = timeout or self.timeout
                if conn.sock is not None:
                    conn.sock.settimeout(conn.timeout)
            try:
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conns.pop(address, None)
                if reused and not isinstance(exc, TimeoutError):
                    continue
                raise PeerUnavailable(address, f"{method} {path}: {exc!r}") from exc
            if response.will_close:
                conn.close()
                conns.pop(address, None)
            if response.getheader("Content-Type") == ROWS_CONTENT_TYPE:
                return Reply(response.status, {}, raw)
            return Reply(response.status, _json_or_empty(raw))
        raise AssertionError("unreachable")

    def _checked(self, address: str, method: str, path: str, body: Any = None) -> dict:
        """A call whose non-2xx answers become exceptions."""
        return self._checked_reply(address, method, path, body).body

    def _checked_reply(self, address: str, method: str, path: str, body: Any = None) -> Reply:
        reply = self.call(address, method, path, body)
        if 200 <= reply.status < 300:
            return reply
        error = reply.body.get("error", "")
        if reply.status == 307:
            raise NotPrimary(address, "not the primary", reply.status, reply.body)
        if reply.status == 503:
            raise PeerUnavailable(address, f"503 {error}", reply.status, reply.body)
        raise PeerError(address, f"{reply.status} {error}", reply.status, reply.body)

    def _retrying(self, fn: Callable[[], Any]) -> Any:
        policy = retry(
            retry=retry_if_exception_type(PeerUnavailable),
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            reraise=True,
        )
        return policy(fn)()

    def _to_primary(self, address: str, fn: Callable[[str], Any]) -> Any:
        """Call ``fn(address)``, following redirects to the primary a bounded number of times."""
        for _ in range(self.max_redirects + 1):
            try:
                return fn(address)
            except NotPrimary as exc:
                if not exc.primary:
                    raise
                address = exc.primary
        raise PeerError(address, "too many redirects")

    # replication

    def replicate(
        self,
        address: str,
        shard: int,
        *,
        generation: int,
        prev_lsn: int,
        rows: Sequence[Row],
        sync: bool,
        timeout: float | None = None,
    ) -> Reply:
        body = {
            "generation": generation,
            "prev_lsn": prev_lsn,
            "sync": sync,
            "rows": [row_to_json(r) for r in rows],
        }
        return self.call(address, "POST", f"{API}/{shard}/replicate", body, timeout=timeout)

    def rows_after(self, address: str, shard: int, after: int, limit: int) -> Page:
        path = f"{API}/{shard}/rows?after={after}&limit={limit}"
        reply = self._retrying(lambda: self._checked_reply(address, "GET", path))
        try:
            entries, max_lsn, complete = decode_rows_page(reply.data)
        except MalformedPage as exc:
            raise PeerError(address, f"rows page: {exc}", reply.status) from exc
        if entries and entries[0][2] <= after:
            raise PeerError(address, f"rows page starts at or before LSN {after}", reply.status)
        return Page(entries, max_lsn, complete)

    def fetch_snapshot(
        self, address: str, shard: int, dest: Path, stop: threading.Event | None = None
    ) -> int:
        """Download the shard's store file image into ``dest``; returns its size.

        One attempt on a connection of its own (the caller falls back to the rows stream).
        The body goes from the socket to ``dest`` in the kernel where it can (see
        ``_receive_body``). Raises PeerError (409 busy, 404 unknown shard, 401 token),
        PeerUnavailable (503, no answer, timeout, truncated body), CopyCancelled.
        """
        host, _, port = address.rpartition(":")
        path = f"{API}/{shard}/snapshot"
        try:
            with socket.create_connection((host, int(port)), timeout=self.timeout) as sock:
                sock.sendall(_get_request(address, path, self.token))
                status, headers = _read_head(sock)
                length = _content_length(headers)
                if status != 200 or headers.get("content-type") != SNAPSHOT_CONTENT_TYPE:
                    body = _json_or_empty(_recv_exact(sock, min(length, MAX_ERROR_BODY)))
                    kind = PeerUnavailable if status == 503 else PeerError
                    raise kind(address, f"snapshot: {status} {body.get('error', '')}",
                               status, body)
                with dest.open("wb", buffering=0) as out:
                    received = _receive_body(sock, out.fileno(), length, self.timeout,
                                             stop, f"shard {shard} snapshot")
        except (OSError, http.client.HTTPException) as exc:
            raise PeerUnavailable(address, f"GET {path}: {exc!r}") from exc
        if received != length:
            raise PeerUnavailable(address, f"snapshot truncated at {received} of {length} bytes")
        return received

    def shard_info(self, address: str, shard: int) -> ShardInfo:
        body = self._retrying(lambda: self._checked(address, "GET", f"{API}/{shard}/digest"))
        return ShardInfo(**{k: body[k] for k in ShardInfo.__dataclass_fields__})

    def repair_rows(self, address: str, shard: int, keys: Sequence[bytes]) -> dict[bytes, Row]:
        """The primary's current rows for ``keys``; keys it never had are absent."""
        payload = {"keys": [b64(k) for k in keys]}
        path = f"{API}/{shard}/repair"
        body = self._retrying(lambda: self._checked(address, "POST", path, payload))
        found = {}
        for entry in body["rows"]:
            if entry["row"] is not None:
                row = row_from_json(entry["row"])
                found[row.key] = row
        return found

    def healthz(self, address: str) -> Reply:
        return self.call(address, "GET", "/healthz")

    # client operations (follow redirects to the primary)

    def get(self, address: str, shard: int, key: bytes) -> Row | None:
        """The live row for ``key``, or None if absent or deleted."""

        def once(addr: str) -> Row | None:
            try:
                return row_from_json(self._checked(addr, "GET", key_path(shard, key)))
            except PeerError as exc:
                if exc.status == 404 and exc.body.get("error") == "not_found":
                    return None
                raise

        return self._retrying(lambda: self._to_primary(address, once))

    def put(self, address: str, shard: int, key: bytes, value: bytes) -> int:
        body = {"value": b64(value)}
        reply = self._to_primary(
            address, lambda a: self._checked(a, "PUT", key_path(shard, key), body)
        )
        return int(reply["lsn"])

    def delete(self, address: str, shard: int, key: bytes) -> int:
        reply = self._to_primary(
            address, lambda a: self._checked(a, "DELETE", key_path(shard, key))
        )
        return int(reply["lsn"])

    def batch_put(
        self, address: str, shard: int, items: Sequence[tuple[bytes, bytes]]
    ) -> list[int]:
        body = {"puts": [{"key": b64(k), "value": b64(v)} for k, v in items]}
        path = f"{API}/{shard}/batch"
        reply = self._to_primary(address, lambda a: self._checked(a, "POST", path, body))
        return [int(x) for x in reply["lsns"]]


def _json_or_empty(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


# -- snapshot transfer -------------------------------------------------------------------
# A snapshot is the whole store file (tens of MB); everything else on the wire is small.
# Its bytes stay in the kernel: the server sends them with one blocking sendfile, the client
# splices them socket -> pipe -> file (recv_into + write where there is no splice), so no
# end copies through user space or takes the GIL per socket buffer. Each chunk's writeback
# starts as it lands, so the fsync that makes the installed image durable finds the file
# mostly on disk; writing it all inside that fsync took ~13 ms of a ~33 ms bootstrap of 23 MB
# on a quiet machine, and 35-85 ms behind other processes' I/O.

SPLICE_SNAPSHOTS = hasattr(os, "splice")  # Linux, Python >= 3.10
MAX_HEAD_BYTES = 64 << 10
MAX_ERROR_BODY = 1 << 20


def _get_request(address: str, path: str, token: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")


def _read_head(sock: socket.socket) -> tuple[int, dict[str, str]]:
    """Consume exactly the status line and headers, leaving every body byte in the socket;
    returns the status and the headers (names lower-cased)."""
    head = bytearray()
    while True:
        peeked = sock.recv(MAX_HEAD_BYTES - len(head), socket.MSG_PEEK)
        if not peeked:
            raise http.client.IncompleteRead(bytes(head))
        end = (head + peeked).find(b"\r\n\r\n", max(0, len(head) - 3))
        if end >= 0:
            head += _recv_exact(sock, end + 4 - len(head))
            break
        head += _recv_exact(sock, len(peeked))
        if len(head) >= MAX_HEAD_BYTES:
            raise http.client.LineTooLong("snapshot answer headers")
    status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    status = rest[:3]
    if not version.startswith("HTTP/1.") or not status.isdigit():
        raise http.client.BadStatusLine(status_line)
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise http.client.BadStatusLine(line)
        headers[name.strip().lower()] = value.strip()
    return int(status), headers


def _content_length(headers: Mapping[str, str]) -> int:
    text = headers.get("content-length", "")
    if not text.isdigit():
        raise http.client.HTTPException(f"bad or missing Content-Length {text!r}")
    return int(text)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise http.client.IncompleteRead(bytes(data), size - len(data))
        data += chunk
    return bytes(data)


def _receive_body(
    sock: socket.socket,
    fd: int,
    length: int,
    timeout: float,
    stop: threading.Event | None,
    what: str,
) -> int:
    """Move up to ``length`` bytes from ``sock`` to the file ``fd``; returns how many came
    (fewer if the peer closed early). Waits at most ``timeout`` s for the next bytes and
    checks ``stop`` between chunks (CopyCancelled)."""
    sock.setblocking(False)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    received = 0
    with contextlib.ExitStack() as cleanup:
        if SPLICE_SNAPSHOTS:
            pipe = os.pipe()
            for end in pipe:
                cleanup.callback(os.close, end)
            with contextlib.suppress(OSError):  # a smaller pipe only means smaller chunks
                fcntl.fcntl(pipe[1], fcntl.F_SETPIPE_SZ, SNAPSHOT_CHUNK)
            move = functools.partial(_splice_chunk, sock, pipe, fd)
        else:
            move = functools.partial(_copy_chunk, sock, memoryview(bytearray(SNAPSHOT_CHUNK)), fd)
        while received < length:
            if not poller.poll(timeout * 1000):
                raise TimeoutError(f"{what}: no bytes for {timeout} s after {received}")
            while received < length:  # what is queued, a chunk at a time
                if stop is not None and stop.is_set():
                    raise CopyCancelled(f"{what} stopped after {received} bytes")
                moved = move(min(length - received, SNAPSHOT_CHUNK))
                if moved is None:
                    break
                if moved == 0:
                    return received  # the peer closed early
                _start_writeback(fd, received, moved)
                received += moved
    return received


def _splice_chunk(sock: socket.socket, pipe: tuple[int, int], fd: int, want: int) -> int | None:
    """Splice up to ``want`` queued bytes into ``fd``: their count, 0 at the end of the
    stream, None if nothing is queued."""
    try:
        n = os.splice(sock.fileno(), pipe[1], want, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
    except BlockingIOError:
        return None
    left = n
    while left:
        left -= os.splice(pipe[0], fd, left, flags=os.SPLICE_F_MOVE)
    return n


def _copy_chunk(sock: socket.socket, buffer: memoryview, fd: int, want: int) -> int | None:
    """``_splice_chunk`` through user space."""
    try:
        n = sock.recv_into(buffer, min(len(buffer), want))
    except BlockingIOError:
        return None
    done = 0
    while done < n:
        done += os.write(fd, buffer[done:n])
    return n


def _load_sync_file_range() -> Callable[..., int] | None:
    """libc's ``sync_file_range`` (Linux), which the os module lacks; None elsewhere."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, size: int) -> None:
    """Start writing these bytes to disk now, without waiting for it, so the fsync that
    makes the installed image durable finds them written instead of the whole file dirty
    (on this machine's disk 12 ms of a 23 MB bootstrap). A hint only: durability is still
    that fsync's."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, size, _SYNC_FILE_RANGE_WRITE)


def _send_file(sock: socket.socket, fd: int, size: int, timeout: float) -> None:
    """Send ``size`` bytes of the file ``fd``. On a blocking socket one sendfile call sends
    them all (``socket.sendfile`` on a socket with a timeout loops in Python per socket
    buffer); SO_SNDTIMEO bounds each call as the socket timeout did."""
    previous = sock.gettimeout()
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))
    try:
        offset = 0
        while offset < size:
            try:
                sent = os.sendfile(sock.fileno(), fd, offset, size - offset)
            except BlockingIOError as exc:
                raise TimeoutError(f"snapshot: no progress for {timeout} s") from exc
            if sent == 0:
                raise EOFError(f"snapshot file ended at {offset} of {size} bytes")
            offset += sent
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0))
        sock.settimeout(previous)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


# -- the server --------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    segments: tuple[str, ...]
    query: Mapping[str, str]
    body: Any = None


@dataclass(frozen=True)
class Response:
    status: int
    body: dict[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)
    data: bytes | None = None  # sent as is (a rows page) instead of ``body`` as JSON
    image: FileImage | None = None  # a store file sent with sendfile, then closed


class DataPlane:
    """The data-plane HTTP server of one agent.

    ``stores`` holds the shard files, ``table`` says what each local shard is (the runtime
    keeps it current), ``token`` is the cluster token. ``start()`` binds ``host:port``
    (port 0 picks a free one; see ``address``), ``stop()`` closes the listener and every open
    connection, so peers see this agent go away at once.
    """

    def __init__(
        self,
        stores: StoreSet,
        table: ShardTable,
        token: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        forward_timeout: float = 2.0,
        client: PeerClient | None = None,
    ):
        if not token:
            raise ValueError("the data plane needs a cluster token")
        self.stores = stores
        self.table = table
        self.token = token
        self.forward_timeout = forward_timeout
        self.client = client or PeerClient(token, timeout=forward_timeout, attempts=1)
        self._write_locks: dict[int, threading.Lock] = {}
        self._replica_locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="forward")
        self._server = _Server((host, port), _Handler, self)
        self._thread: threading.Thread | None = None

    def set_token(self, token: str) -> None:
        """Switch to the cluster token (the agent learns it after binding its port)."""
        if not token:
            raise ValueError("the data plane needs a cluster token")
        self.client = PeerClient(token, timeout=self.forward_timeout, attempts=1)
        self.token = token

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> DataPlane:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # stop() returns within one interval
            name=f"dataplane-{self.address}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # dispatch

    def authorized(self, header: str | None) -> bool:
        expected = f"Bearer {self.token}".encode()
        return header is not None and hmac.compare_digest(header.encode(), expected)

    def handle(self, request: Request) -> Response:
        """Answer one authenticated request (the HTTP layer checked the token)."""
        try:
            return self._route(request)
        except HttpError as exc:
            return Response(exc.status, exc.body)

    def _route(self, request: Request) -> Response:
        seg = request.segments
        if seg == ("healthz",):
            return self._only(request, "GET", self.healthz)
        if not self.table.serving:
            raise HttpError(503, "not_serving", detail="ZooKeeper session lost; reconnecting")
        if len(seg) < 4 or seg[:2] != ("v1", "shards"):
            raise HttpError(404, "no_such_endpoint")
        shard = parse_shard(seg[2])
        kind, rest = seg[3], seg[4:]
        if kind == "keys" and len(rest) == 1:
            key = urllib.parse.unquote_to_bytes(rest[0])
            validate(check_key, key)
            return self._key_op(request, shard, key)
        handlers: dict[str, tuple[str, Callable[[Request, int], Response]]] = {
            "batch": ("POST", self.batch_put),
            "replicate": ("POST", self.replicate),
            "rows": ("GET", self.rows),
            "snapshot": ("GET", self.snapshot),
            "digest": ("GET", self.digest),
            "repair": ("POST", self.repair),
        }
        if kind not in handlers or rest:
            raise HttpError(404, "no_such_endpoint")
        method, handler = handlers[kind]
        return self._only(request, method, lambda: handler(request, shard))

    @staticmethod
    def _only(request: Request, method: str, fn: Callable[[], Response]) -> Response:
        if request.method != method:
            raise HttpError(405, "method_not_allowed", allowed=method)
        return fn()

    def _key_op(self, request: Request, shard: int, key: bytes) -> Response:
        if request.method == "GET":
            return self.get(request, shard, key)
        if request.method == "PUT":
            value = unb64(body_field(request, "value"), "value")
            validate(check_value, value)
            return Response(200, {"lsn": self.write(request, shard, [(key, value)])[0]})
        if request.method == "DELETE":
            return Response(200, {"lsn": self.write(request, shard, [(key, None)])[0]})
        raise HttpError(405, "method_not_allowed", allowed="GET, PUT, DELETE")

    # lookups

    def _route_of(self, shard: int) -> ShardRoute:
        route = self.table.route(shard)
        if route is None:
            raise HttpError(404, "unknown_shard", shard=shard)
        return route

    def _store_of(self, shard: int) -> ShardStore:
        store = self.stores.get(shard)
        if store is None:
            raise HttpError(503, "shard_not_open", shard=shard)
        return store

    def _primary_route(self, shard: int) -> ShardRoute:
        """This shard's route if we are its primary; else a redirect to the one we know."""
        route = self._route_of(shard)
        if route.state == ShardState.PRIMARY:
            return route
        if not route.primary:
            raise HttpError(503, "no_primary", shard=shard)
        raise HttpError(307, "not_primary", primary=route.primary)

    # handlers

    def healthz(self) -> Response:
        body = {
            "status": "ok" if self.table.serving else "not_serving",
            "serving": self.table.serving,
            "writable": self.table.writable,
            "shards": len(self.table.routes()),
        }
        return Response(200 if self.table.serving else 503, body)

    def get(self, request: Request, shard: int, key: bytes) -> Response:
        self._primary_route(shard)
        row = self._store_of(shard).get(key)
        if row is None or row.tombstone:
            raise HttpError(404, "not_found")
        return Response(200, row_to_json(row))

    def batch_put(self, request: Request, shard: int) -> Response:
        puts = body_field(request, "puts")
        if not isinstance(puts, list) or not puts:
            raise HttpError(400, "malformed", detail="puts must be a non-empty list")
        if len(puts) > MAX_BATCH_KEYS:
            raise HttpError(413, "oversized", detail=f"at most {MAX_BATCH_KEYS} puts per batch")
        changes = [parse_put(item) for item in puts]
        return Response(200, {"lsns": self.write(request, shard, changes)})

    def write(
        self, request: Request, shard: int, changes: list[tuple[bytes, bytes | None]]
    ) -> list[int]:
        """The primary's write path; returns the LSNs once every in-sync replica applied."""
        self._primary_route(shard)
        store = self._store_of(shard)
        with self._lock_for(self._write_locks, shard):
            # Re-read under the lock: a demotion or fence may have landed while we waited.
            route = self._primary_route(shard)
            self._require_writable()
            prev = store.max_lsn()
            first = next_lsn(route.generation, prev)
            rows = [Row(key, value, first + i) for i, (key, value) in enumerate(changes)]
            store.apply_forward(rows, sync_lsn=rows[-1].lsn)
            failed = self._replicate(shard, route, store, prev, rows)
            if failed:
                raise HttpError(503, "replication_failed", replicas=failed)
            self._require_writable()  # fenced while forwarding: do not acknowledge
        return [row.lsn for row in rows]

    def _require_writable(self) -> None:
        if not self.table.writable:
            raise HttpError(503, "not_writable", detail="ZooKeeper session suspended")

    def _replicate(
        self, shard: int, route: ShardRoute, store: ShardStore, prev: int, rows: list[Row]
    ) -> list[str]:
        """Forward to all replicas in parallel; the in-sync ones that did not apply."""
        must: dict[Future, str] = {}
        for address in route.in_sync:
            future = self._pool.submit(
                self._forward_in_sync, address, shard, route.generation, store, prev, rows
            )
            must[future] = address
        best_effort = [
            self._pool.submit(self._forward_best_effort, address, shard, route.generation, rows)
            for address in route.catching_up
        ]
        done, _ = wait([*must, *best_effort], timeout=self.forward_timeout * 3)
        failed = []
        for future, address in sorted(must.items(), key=lambda item: item[1]):
            error = future.exception() if future in done else TimeoutError("no answer in time")
            if error is not None:
                log.warning("shard %s: forward to in-sync replica %s failed: %s",
                            shard, address, error)
                failed.append(address)
        return failed

    def _forward_in_sync(
        self,
        address: str,
        shard: int,
        generation: int,
        store: ShardStore,
        prev: int,
        rows: list[Row],
    ) -> None:
        reply = self.client.replicate(
            address, shard, generation=generation, prev_lsn=prev, rows=rows, sync=True
        )
        if reply.status == 409 and reply.body.get("error") == "gap":
            self._push_missing(address, shard, generation, store, int(reply.body["sync_lsn"]))
        elif reply.status != 200:
            raise PeerError(address, f"replicate: {reply.status} {reply.body}", reply.status)

    def _push_missing(
        self, address: str, shard: int, generation: int, store: ShardStore, cursor: int
    ) -> None:
        """Send a lagging in-sync replica every row after its ``sync_lsn``, in LSN order."""
        pushed = 0
        while page := store.rows_after(cursor, PUSH_PAGE_ROWS):
            pushed += len(page)
            if pushed > MAX_PUSH_ROWS:
                raise PeerError(address, f"more than {MAX_PUSH_ROWS} rows behind")
            reply = self.client.replicate(
                address, shard, generation=generation, prev_lsn=cursor, rows=page, sync=True
            )
            if reply.status != 200:
                raise PeerError(address, f"push: {reply.status} {reply.body}", reply.status)
            cursor = page[-1].lsn

    def _forward_best_effort(
        self, address: str, shard: int, generation: int, rows: list[Row]
    ) -> None:
        try:
            self.client.replicate(
                address, shard, generation=generation, prev_lsn=0, rows=rows, sync=False
            )
        except PeerError as exc:
            log.debug("best-effort forward of shard %s to %s failed: %s", shard, address, exc)

    def replicate(self, request: Request, shard: int) -> Response:
        """A replica applies a primary's forward; see the module docstring for the checks."""
        generation = int_field(request, "generation")
        prev = int_field(request, "prev_lsn")
        sync = body_field(request, "sync")
        raw_rows = body_field(request, "rows")
        if not isinstance(sync, bool) or not isinstance(raw_rows, list) or not raw_rows:
            raise HttpError(400, "malformed", detail="sync must be a bool, rows a non-empty list")
        rows = [row_from_json(r) for r in raw_rows]
        route = self._route_of(shard)
        if route.state not in (ShardState.REPLICA, ShardState.BOOTSTRAPPING):
            raise HttpError(409, "not_replica", state=str(route.state))
        store = self._store_of(shard)
        if not self.table.fence(shard, generation):
            raise HttpError(409, "stale_generation", generation=route.primary_generation)
        with self._lock_for(self._replica_locks, shard):
            if not sync:
                store.apply(rows)
                return Response(200, {"sync_lsn": store.sync_lsn()})
            have, top = store.sync_lsn(), max(r.lsn for r in rows)
            if have == prev:
                store.apply_forward(rows, sync_lsn=top)
                return Response(200, {"sync_lsn": top})
            if have >= top:
                return Response(200, {"sync_lsn": have})  # a retried forward we already hold
            raise HttpError(409, "gap" if have < prev else "diverged", sync_lsn=have)

    def rows(self, request: Request, shard: int) -> Response:
        after = query_int(request, "after", 0)
        limit = query_int(request, "limit", DEFAULT_PAGE_ROWS)
        if after < 0 or not 0 < limit <= MAX_PAGE_ROWS:
            raise HttpError(
                400, "malformed", detail=f"need after >= 0, 0 < limit <= {MAX_PAGE_ROWS}"
            )
        route = self._route_of(shard)
        if route.state not in (ShardState.REPLICA, ShardState.PRIMARY):
            raise HttpError(409, "not_a_source", state=str(route.state))
        entries, upto, complete = self._store_of(shard).synced_entries(
            after, limit, MAX_PAGE_BYTES
        )
        return Response(200, {}, data=encode_rows_page(entries, upto, complete))

    def snapshot(self, request: Request, shard: int) -> Response:
        """The shard's store file as a consistent image (a fresh replica's fast bootstrap)."""
        route = self._route_of(shard)
        if route.state not in (ShardState.REPLICA, ShardState.PRIMARY):
            raise HttpError(409, "not_a_source", state=str(route.state))
        try:
            image = self._store_of(shard).open_image()
        except StoreBusy as exc:
            raise HttpError(409, "busy", detail=str(exc)) from exc
        return Response(200, {}, image=image)

    def digest(self, request: Request, shard: int) -> Response:
        route = self._route_of(shard)
        store = self._store_of(shard)
        body = {
            "digest": store.digest(),
            "max_lsn": store.max_lsn(),
            "sync_lsn": store.sync_lsn(),
            "promotion_lsn": store.promotion_lsn(),
            "rows": store.count(),
            "state": str(route.state),
            "generation": route.generation,
        }
        return Response(200, body)

    def repair(self, request: Request, shard: int) -> Response:
        self._primary_route(shard)
        keys = body_field(request, "keys")
        if not isinstance(keys, list) or len(keys) > MAX_BATCH_KEYS:
            raise HttpError(400, "malformed", detail=f"keys must be a list of <= {MAX_BATCH_KEYS}")
        decoded = [unb64(k, "key") for k in keys]
        found = self._store_of(shard).get_many(decoded)
        answer = [
            {"key": b64(k), "row": row_to_json(found[k]) if k in found else None} for k in decoded
        ]
        return Response(200, {"rows": answer})

    def _lock_for(self, locks: dict[int, threading.Lock], shard: int) -> threading.Lock:
        with self._locks_guard:
            return locks.setdefault(shard, threading.Lock())


def parse_shard(text: str) -> int:
    if not text.isdigit() or len(text) > 9:
        raise HttpError(400, "malformed", detail=f"bad shard number {text!r}")
    return int(text)


def body_field(request: Request, name: str) -> Any:
    if not isinstance(request.body, dict) or name not in request.body:
        raise HttpError(400, "malformed", detail=f"body must be a JSON object with {name!r}")
    return request.body[name]


def int_field(request: Request, name: str) -> int:
    value = body_field(request, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise HttpError(400, "malformed", detail=f"{name} must be a non-negative integer")
    return value


def query_int(request: Request, name: str, default: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isdigit():
        raise HttpError(400, "malformed", detail=f"{name} must be a non-negative integer")
    return int(text)


def parse_put(item: Any) -> tuple[bytes, bytes]:
    if not isinstance(item, dict):
        raise HttpError(400, "malformed", detail="each put must be an object")
    key = unb64(item.get("key"), "key")
    value = unb64(item.get("value"), "value")
    validate(check_key, key)
    validate(check_value, value)
    return key, value


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, plane: DataPlane):
        self.plane = plane
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Cut kept-alive connections too: a stopped agent must look dead to its peers."""
        with self._conns_lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 60  # idle kept-alive connections end after this
    # Headers and body go out in two writes; with Nagle on, a delayed ACK adds ~40 ms each.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve()

    def do_PUT(self) -> None:  # noqa: N802
        self._serve()

    def do_POST(self) -> None:  # noqa: N802
        self._serve()

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve()

    # Other methods get a JSON 405 from the router rather than http.server's HTML 501.
    do_PATCH = do_OPTIONS = do_DELETE

    def _serve(self) -> None:
        plane = self.server.plane
        try:
            body = self._read_body()
        except HttpError as exc:
            self.close_connection = True  # the unread body would poison the next request
            self._send(Response(exc.status, exc.body))
            return
        if not plane.authorized(self.headers.get("Authorization")):
            self._send(Response(401, {"error": "unauthorized", "detail": "bad or missing token"}))
            return
        parsed = urllib.parse.urlsplit(self.path)
        segments = tuple(s for s in parsed.path.split("/") if s)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        try:
            decoded = json.loads(body) if body else None
        except ValueError:
            self._send(Response(400, {"error": "malformed", "detail": "body is not JSON"}))
            return
        try:
            response = plane.handle(Request(self.command, segments, query, decoded))
        except Exception:  # a bug or a disk error must not kill the connection silently
            log.exception("data plane failed on %s %s", self.command, self.path)
            response = Response(500, {"error": "internal"})
        if response.status == 307:
            location = f"http://{response.body['primary']}{self.path}"
            response = replace(response, headers={"Location": location})
        if response.image is not None:
            self._send_image(response.image)
        else:
            self._send(response)

    def _send_image(self, image: FileImage) -> None:
        try:
            self.send_response(200)
            self.send_header("Content-Type", SNAPSHOT_CONTENT_TYPE)
            self.send_header("Content-Length", str(image.size))
            self.end_headers()
            with image.path.open("rb") as f:
                _send_file(self.connection, f.fileno(), image.size, self.timeout)
        except OSError as exc:  # the copier left (cancelled, timed out) or stalled for good
            self.close_connection = True
            log.info("snapshot %s not sent to %s: %r", image.path.name, self.client_address, exc)
        finally:
            image.close()

    def _read_body(self) -> bytes:
        length_text = self.headers.get("Content-Length", "0")
        if not length_text.isdigit():
            raise HttpError(400, "malformed", detail="bad Content-Length")
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            raise HttpError(413, "oversized", detail=f"body over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length) if length else b""

    def _send(self, response: Response) -> None:
        if response.data is not None:
            payload, content_type = response.data, ROWS_CONTENT_TYPE
        else:
            payload, content_type = json.dumps(response.body).encode(), "application/json"
        self.send_response(response.status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        log.debug("%s %s", self.address_string(), format % args)


# -- bootstrap and repair ----------------------------------------------------------------


class CopyCancelled(Exception):
    """The copy was stopped; its cursor is persisted and the next copy resumes from it."""


@dataclass(frozen=True)
class CopyResult:
    shard: int
    lsn: int  # caught up to the source's synced LSN at the end of the copy
    rows_fetched: int
    pages: int
    image_bytes: int = 0  # the size of the file image installed first, if any


def copy_shard(
    store: ShardStore,
    shard: int,
    source: str,
    client: PeerClient,
    *,
    page_size: int = DEFAULT_PAGE_ROWS,
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
    image_path: Path | None = None,
) -> CopyResult:
    """Copy a shard's rows from ``source`` into ``store``, resuming from the stored cursor.

    With ``image_path`` (where a download may land), a copy that has not started yet
    (cursor 0) first fetches the source's store file as a consistent image and installs it
    (``ShardStore.install_image``): the bytes of the file, not rows one by one. The cursor
    is then the source's ``sync_lsn`` at the image, and the rows stream below carries on
    from there. If the image cannot be had (the source is busy or older, the download
    fails) the copy streams rows instead; a failed download is not tried again, so a
    retried copy resumes from its cursor rather than starting over.

    Pages of rows after the cursor are applied last-writer-wins (so writes forwarded to this
    replica meanwhile interleave safely) together with the new cursor, in one transaction.
    The copy ends with the first page the source marks complete (it held every synced row
    after the cursor); the replica's ``sync_lsn`` then becomes the source's synced LSN.
    ``progress(cursor, rows_fetched)`` is called after each page. Raises PeerError when the
    source stays unreachable (bounded retries) and CopyCancelled when ``stop`` is set.
    """
    cursor = store.bootstrap_cursor()
    fetched = pages = image_bytes = 0
    if image_path is not None and cursor == 0 and not store.get_meta(META_IMAGE_TRIED):
        cursor, image_bytes = _copy_image(store, shard, source, client, image_path, stop)
    while True:
        if stop is not None and stop.is_set():
            raise CopyCancelled(f"shard {shard} copy stopped at LSN {cursor}")
        page = client.rows_after(source, shard, cursor, page_size)
        if page.complete:
            # Every synced row up to max_lsn is here (LSNs of overwritten rows are gone).
            top = max(cursor, page.max_lsn)
            store.apply_entries_page(page.entries, top)
            cursor = top
        elif page.entries:
            cursor = page.last_lsn
            store.apply_entries_page(page.entries, cursor)
        else:
            raise PeerError(source, f"shard {shard}: an empty page that is not complete")
        fetched += len(page.entries)
        pages += 1
        if progress is not None:
            progress(cursor, fetched)
        if page.complete:
            break
    store.set_meta(META_SYNC_LSN, cursor)
    return CopyResult(shard, cursor, fetched, pages, image_bytes)


def _copy_image(
    store: ShardStore,
    shard: int,
    source: str,
    client: PeerClient,
    dest: Path,
    stop: threading.Event | None,
) -> tuple[int, int]:
    """Fetch and install the source's file image: (new cursor, image size); the cursor is
    unchanged and the size 0 if it fell back to the rows stream."""
    store.set_meta(META_IMAGE_TRIED, 1)  # install_image clears it with the source's markers
    try:
        size = client.fetch_snapshot(source, shard, dest, stop)
        return store.install_image(dest), size
    except (PeerError, StoreError) as exc:
        log.info("shard %s: no file image from %s (%s); streaming rows", shard, source, exc)
        return store.bootstrap_cursor(), 0
    finally:
        dest.unlink(missing_ok=True)


@dataclass(frozen=True)
class RepairResult:
    shard: int
    promotion_lsn: int
    start_lsn: int  # rows after this were checked against the primary
    suspects: int
    replaced: int
    caught_up: CopyResult


def repair_shard(
    store: ShardStore,
    shard: int,
    primary: str,
    client: PeerClient,
    *,
    batch: int = 500,
) -> RepairResult:
    """Bring a replica into line with a newly promoted primary, then catch up.

    Rows after ``min(promotion point, own sync_lsn)`` may be writes the old primary never
    acknowledged. For each, the new primary's current row wins (or the row is removed if
    the primary never had the key), unless a newer forward replaced it meanwhile. Then the
    replica streams everything after that point from the primary.
    """
    info = client.shard_info(primary, shard)
    start = repair_start(info.promotion_lsn, store.sync_lsn())
    suspects = list(_all_rows_after(store, start))
    replaced = 0
    for chunk in _chunks(suspects, batch):
        theirs = client.repair_rows(primary, shard, [row.key for row in chunk])
        for row in chunk:
            wanted = theirs.get(row.key)
            if wanted != row and store.replace_if_unchanged(row.lsn, row.key, wanted):
                replaced += 1
    store.set_meta(META_BOOTSTRAP_CURSOR, start)
    caught_up = copy_shard(store, shard, primary, client)
    return RepairResult(shard, info.promotion_lsn, start, len(suspects), replaced, caught_up)


def repair_start(promotion_lsn: int, sync_lsn: int) -> int:
    """The LSN after which a replica's rows may disagree with a newly promoted primary.

    The new primary holds every LSN up to its promotion point, and the replica every LSN up
    to its ``sync_lsn``, of the stream they both followed. If the promotion point is from a
    later generation than the replica's last one, the replica missed a whole primary and
    anything it got from its last one may be that primary's unacknowledged tail.
    """
    start = min(promotion_lsn, sync_lsn)
    if lsn_generation(sync_lsn) < lsn_generation(promotion_lsn):
        start = min(start, make_lsn(lsn_generation(sync_lsn), 0))
    return start


def catch_up_from_peers(
    store: ShardStore,
    shard: int,
    peers: Sequence[str],
    client: PeerClient,
    *,
    page_size: int = DEFAULT_PAGE_ROWS,
) -> int:
    """Pull, last-writer-wins, every synced row after this replica's ``sync_lsn`` from each
    reachable peer; returns the rows fetched. Used by a replica about to become primary.

    A replica that joined the in-sync set got the writes acknowledged during its last
    moments of catching up only as best-effort forwards; every such write is on every
    in-sync peer, so pulling from the peers closes that gap. A peer that fails is skipped:
    the plan names the live ones, and any one of them holds every acknowledged write.
    """
    start = store.sync_lsn()
    fetched = 0
    for peer in peers:
        cursor = start
        try:
            while True:
                page = client.rows_after(peer, shard, cursor, page_size)
                if page.entries:
                    store.apply(page.rows)
                    cursor = page.last_lsn
                    fetched += len(page.entries)
                if page.complete or not page.entries:
                    break
        except PeerError as exc:
            log.info("shard %s: catch-up from %s skipped: %s", shard, peer, exc)
    return fetched


def _all_rows_after(store: ShardStore, lsn: int) -> Iterator[Row]:
    while page := store.rows_after(lsn, PUSH_PAGE_ROWS):
        yield from page
        lsn = page[-1].lsn


def _chunks(items: list[Row], size: int) -> Iterator[list[Row]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


__all__ = [
    "API",
    "CopyCancelled",
    "CopyResult",
    "DataPlane",
    "HttpError",
    "NotPrimary",
    "Page",
    "PeerClient",
    "PeerError",
    "PeerUnavailable",
    "RepairResult",
    "ShardInfo",
    "ShardRoute",
    "ShardTable",
    "catch_up_from_peers",
    "copy_shard",
    "decode_rows_page",
    "encode_rows_page",
    "key_path",
    "repair_shard",
    "repair_start",
    "row_from_json",
    "row_to_json",
]
