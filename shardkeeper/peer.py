"""The data plane's HTTP client: what clients and agents call on an agent (``shardkeeper.wire``
documents the endpoints).

Connections are kept alive per thread and address; every call has a bounded timeout.
Idempotent calls (reads, the rows stream, repair lookups, digests) retry on no answer and
503 with a bounded tenacity policy; writes follow up to ``max_redirects`` redirects to the
primary and are not retried here (the client library decides, with a fresh routing table).
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from shardkeeper.wire import (
    ROWS_CONTENT_TYPE,
    Entry,
    Malformed,
    Row,
    b64,
    decode_rows_page,
    entry_to_row,
    json_object,
    key_path,
    row_from_json,
    row_to_json,
    rows_path,
    shard_path,
)

T = TypeVar("T")


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
    size: int = 0  # bytes on the wire

    @property
    def rows(self) -> list[Row]:
        return [entry_to_row(e) for e in self.entries]

    @property
    def last_lsn(self) -> int | None:
        return self.entries[-1][2] if self.entries else None


@dataclass(frozen=True)
class ShardInfo:
    """A holder's view of one shard (``GET .../digest``); ``term`` is its route's term."""

    digest: str
    max_lsn: int
    sync_lsn: int
    promotion_lsn: int
    rows: int
    state: str
    term: int


class PeerClient:
    """HTTP calls to agents: forwarding, streaming, repair, and client reads and writes."""

    def __init__(
        self,
        token: str,
        *,
        timeout: float = 2.0,
        attempts: int = 4,
        max_redirects: int = 3,
        on_download: Callable[[str, int], None] | None = None,
    ):
        self.token = token
        self.timeout = timeout
        self.attempts = attempts
        self.max_redirects = max_redirects
        # An agent's copies report the bytes they fetch here (its bootstrap bytes metric).
        self.on_download = on_download
        self._local = threading.local()

    # transport

    def _connections(self) -> dict[str, http.client.HTTPConnection]:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def downloaded(self, kind: str, size: int) -> None:
        """``size`` bytes of shard data fetched to copy a replica (``kind``: snapshot, rows)."""
        if self.on_download is not None:
            self.on_download(kind, size)

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
            return Reply(response.status, json_object(raw))
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

    def _retrying(self, fn: Callable[[], T]) -> T:
        policy = retry(
            retry=retry_if_exception_type(PeerUnavailable),
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            reraise=True,
        )
        return policy(fn)()

    def _to_primary(self, address: str, fn: Callable[[str], T]) -> T:
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
        term: int,
        prev_lsn: int,
        rows: Sequence[Row],
        sync: bool,
        timeout: float | None = None,
    ) -> Reply:
        """One forward, answered as is (the primary decides what a refusal means)."""
        body = {
            "term": term,
            "prev_lsn": prev_lsn,
            "sync": sync,
            "rows": [row_to_json(r) for r in rows],
        }
        return self.call(address, "POST", shard_path(shard, "replicate"), body, timeout=timeout)

    def rows_after(self, address: str, shard: int, after: int, limit: int) -> Page:
        path = rows_path(shard, after, limit)
        reply = self._retrying(lambda: self._checked_reply(address, "GET", path))
        try:
            entries, max_lsn, complete = decode_rows_page(reply.data)
        except Malformed as exc:
            raise PeerError(address, f"rows page: {exc}", reply.status) from exc
        if entries and entries[0][2] <= after:
            raise PeerError(address, f"rows page starts at or before LSN {after}", reply.status)
        return Page(entries, max_lsn, complete, len(reply.data))

    def shard_info(self, address: str, shard: int) -> ShardInfo:
        path = shard_path(shard, "digest")
        body = self._retrying(lambda: self._checked(address, "GET", path))
        try:
            return ShardInfo(**{k: body[k] for k in ShardInfo.__dataclass_fields__})
        except KeyError as exc:
            raise PeerError(address, f"digest answer lacks {exc}") from exc

    def repair_rows(self, address: str, shard: int, keys: Sequence[bytes]) -> dict[bytes, Row]:
        """The primary's current rows for ``keys``; keys it never had are absent."""
        payload = {"keys": [b64(k) for k in keys]}
        path = shard_path(shard, "repair")
        body = self._retrying(lambda: self._checked(address, "POST", path, payload))
        found = {}
        for entry in body["rows"]:
            if entry["row"] is not None:
                row = _parsed(address, row_from_json, entry["row"])
                found[row.key] = row
        return found

    def healthz(self, address: str) -> Reply:
        return self.call(address, "GET", "/healthz")

    # client operations (follow redirects to the primary)

    def get(self, address: str, shard: int, key: bytes) -> Row | None:
        """The live row for ``key``, or None if absent or deleted."""

        def once(addr: str) -> Row | None:
            try:
                body = self._checked(addr, "GET", key_path(shard, key))
            except PeerError as exc:
                if exc.status == 404 and exc.body.get("error") == "not_found":
                    return None
                raise
            return _parsed(addr, row_from_json, body)

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
        path = shard_path(shard, "batch")
        reply = self._to_primary(address, lambda a: self._checked(a, "POST", path, body))
        return [int(x) for x in reply["lsns"]]


def _parsed(address: str, parse: Callable[[Any], T], value: Any) -> T:
    """A peer's answer that breaks the wire format is a failed call, like no answer."""
    try:
        return parse(value)
    except Malformed as exc:
        raise PeerError(address, f"malformed answer: {exc}") from exc


__all__ = [
    "NotPrimary",
    "Page",
    "PeerClient",
    "PeerError",
    "PeerUnavailable",
    "Reply",
    "ShardInfo",
]
