"""The data plane's HTTP client: what clients and agents call on an agent (``shardkeeper.wire``
documents the endpoints).

Connections (``shardkeeper.httpconn``) are kept alive per thread and address; every call
has a bounded timeout. Idempotent calls (reads, the rows stream, repair lookups, digests)
retry on no answer and 503 with a bounded tenacity policy; writes follow up to
``max_redirects`` redirects to the primary and are not retried here (the client library
decides, with a fresh routing table).

``post_many`` sends several requests to different agents before it reads any answer: a
primary's forward goes to all its replicas at once from the thread that holds the write,
without a hand-off to other threads and back.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from shardkeeper.httpconn import Answer, Connection, ProtocolError
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

    def _connections(self) -> dict[str, Connection]:
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

    def _headers(self, payload: bytes | None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        return headers

    def _send(self, address: str, method: str, path: str, payload: bytes | None,
              timeout: float) -> bool:
        """Send one request on this thread's connection to ``address``; whether that
        connection was kept alive from an earlier call (the peer may have closed it since:
        a failure on it is worth one more try on a fresh one). Raises OSError."""
        conns = self._connections()
        conn = conns.get(address)
        reused = conn is not None and conn.opened
        if conn is None:
            host, _, port = address.rpartition(":")
            conn = conns[address] = Connection(host, int(port), timeout)
        conn.settimeout(timeout)
        try:
            conn.send_request(method, path, self._headers(payload), payload)
        except OSError:
            self._drop(address)
            raise
        return reused

    def _receive(self, address: str, method: str, timeout: float | None = None) -> Reply:
        """The answer to the request sent last to ``address``; raises OSError or
        ProtocolError (the connection is dropped then)."""
        conn = self._connections()[address]
        if timeout is not None:
            conn.settimeout(timeout)
        try:
            answer = conn.read_response(head_only=method == "HEAD")
        except (OSError, ProtocolError):
            self._drop(address)
            raise
        if answer.will_close:
            self._drop(address)
        return _reply(answer)

    def _drop(self, address: str) -> None:
        conn = self._connections().pop(address, None)
        if conn is not None:
            conn.close()

    def _exchange(self, address: str, method: str, path: str, payload: bytes | None,
                  timeout: float) -> Reply:
        """One request and its answer; a kept-alive connection that fails (not by a
        time-out) gets one fresh try. Raises PeerUnavailable if no answer arrives in time."""
        for attempt in range(2):
            reused = False
            try:
                reused = self._send(address, method, path, payload, timeout)
                return self._receive(address, method)
            except (OSError, ProtocolError) as exc:
                if attempt == 0 and reused and not isinstance(exc, TimeoutError):
                    continue
                raise PeerUnavailable(address, f"{method} {path}: {exc!r}") from exc
        raise AssertionError("unreachable")

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
        return self._exchange(address, method, path, payload, timeout or self.timeout)

    def post_many(
        self, calls: Sequence[tuple[str, str, bytes]], *, timeout: float | None = None
    ) -> list[Reply | PeerError]:
        """POST each ``(address, path, JSON payload)``, every request sent before any
        answer is read, so that the peers work on them at the same time; the addresses
        must differ. Returns the answers in order, a PeerUnavailable in the place of one
        that did not come within ``timeout`` of the sending (or failed)."""
        if len({address for address, _, _ in calls}) != len(calls):
            raise ValueError("post_many takes one call per address")
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        sent: list[bool | PeerError] = []
        for address, path, payload in calls:
            for attempt in range(2):
                conn = self._connections().get(address)
                kept = conn is not None and conn.opened
                try:
                    sent.append(self._send(address, "POST", path, payload, timeout))
                except OSError as exc:
                    if attempt == 0 and kept and not isinstance(exc, TimeoutError):
                        # closed by the peer meanwhile: one more try on a fresh one
                        continue
                    sent.append(PeerUnavailable(address, f"POST {path}: {exc!r}"))
                break
        replies: list[Reply | PeerError] = []
        try:
            for (address, path, payload), reused in zip(calls, sent, strict=True):
                if isinstance(reused, PeerError):
                    replies.append(reused)
                    continue
                # An answer already here counts even past the deadline: it came in time,
                # while this thread read the others.
                left = max(deadline - time.monotonic(), 0.001)
                try:
                    replies.append(self._receive(address, "POST", left))
                except (OSError, ProtocolError) as exc:
                    if reused and not isinstance(exc, TimeoutError):
                        try:  # the kept-alive connection had been closed: one fresh try
                            replies.append(self._exchange(address, "POST", path, payload, left))
                        except PeerError as again:
                            replies.append(again)
                        continue
                    replies.append(PeerUnavailable(address, f"POST {path}: {exc!r}"))
        finally:
            # Whatever escaped: no connection is left with an answer unread, which the next
            # call on it would take for its own.
            for address, _, _ in calls[len(replies):]:
                self._drop(address)
        return replies

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
        """One forward, answered as is (the primary decides what a refusal means); raises
        PeerUnavailable if no answer comes."""
        payload = forward_payload(term=term, prev_lsn=prev_lsn, rows=rows, sync=sync)
        reply = self.post_many([(address, shard_path(shard, "replicate"), payload)],
                               timeout=timeout)[0]
        if isinstance(reply, PeerError):
            raise reply
        return reply

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


def forward_payload(*, term: int, prev_lsn: int, rows: Sequence[Row], sync: bool) -> bytes:
    """A replicate call's body, encoded once for every replica it goes to."""
    body = {"term": term, "prev_lsn": prev_lsn, "sync": sync,
            "rows": [row_to_json(r) for r in rows]}
    return json.dumps(body).encode()


def _reply(answer: Answer) -> Reply:
    if answer.headers.get("content-type") == ROWS_CONTENT_TYPE:
        return Reply(answer.status, {}, answer.body)
    return Reply(answer.status, json_object(answer.body))


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
    "forward_payload",
]
