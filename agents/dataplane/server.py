"""The data plane's HTTP server: one agent's endpoints (``shardkeeper.wire`` documents them).

``DataPlane`` parses and checks each request, looks the shard up in the ``ShardTable`` the
runtime keeps, and answers from the shard's store. The primary's write path runs here
under the shard's write lock: assign LSNs above the local maximum and above every older
term's (``store.next_lsn``), apply locally, forward (``replication.Replicator``), and
acknowledge only if every in-sync replica applied the rows and the agent is still
writable. A replica takes forwards through ``replication.accept_forward`` under the
shard's replica lock. Snapshots go out with ``transfer.send_file``.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import socket
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agents.dataplane.replication import (
    TERM_AHEAD_SECONDS,
    Refused,
    Replicator,
    accept_forward,
)
from agents.dataplane.table import ShardRoute, ShardTable
from agents.dataplane.transfer import send_file
from agents.shardsm import ShardState
from agents.store import FileImage, ShardStore, StoreBusy, StoreSet, next_lsn
from shardkeeper.peer import PeerClient
from shardkeeper.token import Tokens
from shardkeeper.wire import (
    DEFAULT_PAGE_ROWS,
    MAX_BATCH_KEYS,
    MAX_BODY_BYTES,
    MAX_PAGE_BYTES,
    MAX_PAGE_ROWS,
    ROWS_CONTENT_TYPE,
    SNAPSHOT_CONTENT_TYPE,
    ErrorCode,
    Malformed,
    Row,
    b64,
    check_key,
    check_value,
    encode_rows_page,
    row_from_json,
    row_to_json,
    unb64,
)

log = logging.getLogger(__name__)

SOURCES = (ShardState.REPLICA, ShardState.PRIMARY)  # may serve rows and snapshots
# Endpoints only agents call (issue 10): a client token holder could otherwise forge a
# forward (and silently stop a replica applying real ones) or read whole shards.
PEER_ONLY = frozenset({"replicate", "rows", "snapshot", "repair"})


class HttpError(Exception):
    """An HTTP error answer: status plus a JSON body with at least ``error``."""

    def __init__(self, status: int, error: ErrorCode, **details: Any):
        super().__init__(f"{status} {error}")
        self.status = status
        self.body = {"error": error, **details}


class Credential(StrEnum):
    CLIENT = "client"  # the cluster token: the client endpoints
    PEER = "peer"  # the peer token: every endpoint


@dataclass(frozen=True)
class Request:
    method: str
    segments: tuple[str, ...]
    query: Mapping[str, str]
    body: Any = None
    credential: Credential = Credential.CLIENT


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
    keeps it current), ``token`` is the cluster token (the client endpoints), ``peer_token``
    the peer token (every endpoint; its forwards send it); ``forward_timeout`` bounds each
    forward, ``term_ahead_wait`` how long a replica that answers ``term_ahead`` is asked
    again, ``client`` (tests) replaces the forwarding client. ``start()`` binds ``host:port``
    (port 0 picks a free one; see ``address``), ``stop()`` closes the listener and every open
    connection, so peers see this agent go away at once.
    """

    def __init__(
        self,
        stores: StoreSet,
        table: ShardTable,
        token: str,
        *,
        peer_token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        forward_timeout: float = 2.0,
        term_ahead_wait: float = TERM_AHEAD_SECONDS,
        client: PeerClient | None = None,
    ):
        self.stores = stores
        self.table = table
        self.tokens = Tokens(token, peer_token)
        self.forward_timeout = forward_timeout
        self.replicator = Replicator(
            client or PeerClient(peer_token, timeout=forward_timeout, attempts=1),
            forward_timeout,
            term_ahead_wait=term_ahead_wait,
        )
        self._write_locks: dict[int, threading.Lock] = {}
        self._replica_locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._server = _Server((host, port), _Handler, self)
        self._thread: threading.Thread | None = None

    def set_tokens(self, tokens: Tokens) -> None:
        """Switch to the cluster's tokens (the agent learns them after binding its port)."""
        self.replicator.client = PeerClient(tokens.peer, timeout=self.forward_timeout,
                                            attempts=1)
        self.tokens = tokens

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
        self.replicator.close()

    # dispatch

    def credential(self, header: str | None) -> Credential | None:
        """Which token the ``Authorization`` header carries, if any (constant time)."""
        if header is None:
            return None
        given = header.encode("latin-1", "replace")
        tokens = self.tokens  # one read: set_tokens may swap it meanwhile
        found = None
        for credential, token in ((Credential.PEER, tokens.peer),
                                  (Credential.CLIENT, tokens.client)):
            if hmac.compare_digest(given, f"Bearer {token}".encode()):
                found = credential
        return found

    def handle(self, request: Request) -> Response:
        """Answer one authenticated request (the HTTP layer checked the token)."""
        try:
            return self._route(request)
        except HttpError as exc:
            return Response(exc.status, exc.body)
        except Malformed as exc:  # a key, value or row that breaks the wire's rules
            return Response(exc.status, {"error": exc.error, "detail": str(exc)})

    def _route(self, request: Request) -> Response:
        seg = request.segments
        if seg == ("healthz",):
            return self._only(request, "GET", self.healthz)
        if not self.table.serving:
            raise HttpError(503, ErrorCode.NOT_SERVING,
                            detail="ZooKeeper session lost; reconnecting")
        if len(seg) < 4 or seg[:2] != ("v1", "shards"):
            raise HttpError(404, ErrorCode.NO_SUCH_ENDPOINT)
        shard = parse_shard(seg[2])
        kind, rest = seg[3], seg[4:]
        if kind == "keys" and len(rest) == 1:
            key = urllib.parse.unquote_to_bytes(rest[0])
            check_key(key)
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
            raise HttpError(404, ErrorCode.NO_SUCH_ENDPOINT)
        if kind in PEER_ONLY and request.credential != Credential.PEER:
            raise HttpError(403, ErrorCode.FORBIDDEN, detail=f"{kind} needs the peer token")
        method, handler = handlers[kind]
        return self._only(request, method, lambda: handler(request, shard))

    @staticmethod
    def _only(request: Request, method: str, fn: Callable[[], Response]) -> Response:
        if request.method != method:
            raise HttpError(405, ErrorCode.METHOD_NOT_ALLOWED, allowed=method)
        return fn()

    def _key_op(self, request: Request, shard: int, key: bytes) -> Response:
        if request.method == "GET":
            return self.get(request, shard, key)
        if request.method == "PUT":
            value = unb64(body_field(request, "value"), "value")
            check_value(value)
            return Response(200, {"lsn": self.write(request, shard, [(key, value)])[0]})
        if request.method == "DELETE":
            return Response(200, {"lsn": self.write(request, shard, [(key, None)])[0]})
        raise HttpError(405, ErrorCode.METHOD_NOT_ALLOWED, allowed="GET, PUT, DELETE")

    # lookups

    def _route_of(self, shard: int) -> ShardRoute:
        route = self.table.route(shard)
        if route is None:
            raise HttpError(404, ErrorCode.UNKNOWN_SHARD, shard=shard)
        return route

    def _store_of(self, shard: int) -> ShardStore:
        store = self.stores.get(shard)
        if store is None:
            raise HttpError(503, ErrorCode.SHARD_NOT_OPEN, shard=shard)
        return store

    def _primary_route(self, shard: int) -> ShardRoute:
        """This shard's route if we are its primary; else a redirect to the one we know."""
        route = self._route_of(shard)
        if route.state == ShardState.PRIMARY:
            return route
        if not route.primary:
            raise HttpError(503, ErrorCode.NO_PRIMARY, shard=shard)
        raise HttpError(307, ErrorCode.NOT_PRIMARY, primary=route.primary)

    def _lock_for(self, locks: dict[int, threading.Lock], shard: int) -> threading.Lock:
        with self._locks_guard:
            return locks.setdefault(shard, threading.Lock())

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
            raise HttpError(404, ErrorCode.NOT_FOUND)
        return Response(200, row_to_json(row))

    def batch_put(self, request: Request, shard: int) -> Response:
        puts = body_field(request, "puts")
        if not isinstance(puts, list) or not puts:
            raise HttpError(400, ErrorCode.MALFORMED, detail="puts must be a non-empty list")
        if len(puts) > MAX_BATCH_KEYS:
            raise HttpError(413, ErrorCode.OVERSIZED,
                            detail=f"at most {MAX_BATCH_KEYS} puts per batch")
        changes = [parse_put(item) for item in puts]
        return Response(200, {"lsns": self.write(request, shard, changes)})

    def write(
        self, request: Request, shard: int, changes: list[tuple[bytes, bytes | None]]
    ) -> list[int]:
        """The primary's write path; returns the LSNs once every in-sync replica applied."""
        self._primary_route(shard)
        store = self._store_of(shard)
        with self._lock_for(self._write_locks, shard):
            # Re-read under the lock: a demotion or a new term may have landed meanwhile.
            route = self._primary_route(shard)
            self._require_writable()
            prev = store.max_lsn()
            first = next_lsn(route.term, prev)
            rows = [Row(key, value, first + i) for i, (key, value) in enumerate(changes)]
            store.apply_forward(rows, sync_lsn=rows[-1].lsn)
            failed = self.replicator.forward(shard, route, store, prev, rows)
            if failed:
                raise HttpError(503, ErrorCode.REPLICATION_FAILED, replicas=failed)
            self._require_writable()  # fenced while forwarding: do not acknowledge
        return [row.lsn for row in rows]

    def _require_writable(self) -> None:
        if not self.table.writable:
            raise HttpError(503, ErrorCode.NOT_WRITABLE, detail="ZooKeeper session suspended")

    def replicate(self, request: Request, shard: int) -> Response:
        """A replica applies a primary's forward (``replication.accept_forward``)."""
        term = int_field(request, "term")
        prev = int_field(request, "prev_lsn")
        sync = body_field(request, "sync")
        raw_rows = body_field(request, "rows")
        if not isinstance(sync, bool) or not isinstance(raw_rows, list) or not raw_rows:
            raise HttpError(400, ErrorCode.MALFORMED,
                            detail="sync must be a bool, rows a non-empty list")
        rows = [row_from_json(r) for r in raw_rows]
        self._route_of(shard)
        store = self._store_of(shard)
        with self._lock_for(self._replica_locks, shard):
            # The route as the runtime set it last, read under the lock that orders forwards.
            route = self._route_of(shard)
            try:
                sync_lsn = accept_forward(route, store, term, prev, rows, sync)
            except Refused as exc:
                raise HttpError(409, exc.error, **exc.details) from exc
        return Response(200, {"sync_lsn": sync_lsn})

    def rows(self, request: Request, shard: int) -> Response:
        after = query_int(request, "after", 0)
        limit = query_int(request, "limit", DEFAULT_PAGE_ROWS)
        if after < 0 or not 0 < limit <= MAX_PAGE_ROWS:
            raise HttpError(400, ErrorCode.MALFORMED,
                            detail=f"need after >= 0, 0 < limit <= {MAX_PAGE_ROWS}")
        route = self._route_of(shard)
        if route.state not in SOURCES:
            raise HttpError(409, ErrorCode.NOT_A_SOURCE, state=str(route.state))
        entries, upto, complete = self._store_of(shard).synced_entries(
            after, limit, MAX_PAGE_BYTES
        )
        return Response(200, {}, data=encode_rows_page(entries, upto, complete))

    def snapshot(self, request: Request, shard: int) -> Response:
        """The shard's store file as a consistent image (a fresh replica's fast bootstrap)."""
        route = self._route_of(shard)
        if route.state not in SOURCES:
            raise HttpError(409, ErrorCode.NOT_A_SOURCE, state=str(route.state))
        try:
            image = self._store_of(shard).open_image()
        except StoreBusy as exc:
            raise HttpError(409, ErrorCode.BUSY, detail=str(exc)) from exc
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
            "term": route.term,
        }
        return Response(200, body)

    def repair(self, request: Request, shard: int) -> Response:
        self._primary_route(shard)
        keys = body_field(request, "keys")
        if not isinstance(keys, list) or len(keys) > MAX_BATCH_KEYS:
            raise HttpError(400, ErrorCode.MALFORMED,
                            detail=f"keys must be a list of <= {MAX_BATCH_KEYS}")
        decoded = [unb64(k, "key") for k in keys]
        found = self._store_of(shard).get_many(decoded)
        answer = [
            {"key": b64(k), "row": row_to_json(found[k]) if k in found else None} for k in decoded
        ]
        return Response(200, {"rows": answer})


# -- request parsing ---------------------------------------------------------------------


def parse_shard(text: str) -> int:
    if not text.isdigit() or len(text) > 9:
        raise HttpError(400, ErrorCode.MALFORMED, detail=f"bad shard number {text!r}")
    return int(text)


def body_field(request: Request, name: str) -> Any:
    if not isinstance(request.body, dict) or name not in request.body:
        raise HttpError(400, ErrorCode.MALFORMED,
                        detail=f"body must be a JSON object with {name!r}")
    return request.body[name]


def int_field(request: Request, name: str) -> int:
    value = body_field(request, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise HttpError(400, ErrorCode.MALFORMED, detail=f"{name} must be a non-negative integer")
    return value


def query_int(request: Request, name: str, default: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isdigit():
        raise HttpError(400, ErrorCode.MALFORMED, detail=f"{name} must be a non-negative integer")
    return int(text)


def parse_put(item: Any) -> tuple[bytes, bytes]:
    if not isinstance(item, dict):
        raise HttpError(400, ErrorCode.MALFORMED, detail="each put must be an object")
    key = unb64(item.get("key"), "key")
    value = unb64(item.get("value"), "value")
    check_key(key)
    check_value(value)
    return key, value


# -- HTTP --------------------------------------------------------------------------------


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
        credential = plane.credential(self.headers.get("Authorization"))
        if credential is None:
            self._send(Response(401, {"error": ErrorCode.UNAUTHORIZED,
                                      "detail": "bad or missing token"}))
            return
        parsed = urllib.parse.urlsplit(self.path)
        segments = tuple(s for s in parsed.path.split("/") if s)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        try:
            decoded = json.loads(body) if body else None
        except ValueError:
            self._send(Response(400, {"error": ErrorCode.MALFORMED, "detail": "body is not JSON"}))
            return
        try:
            response = plane.handle(Request(self.command, segments, query, decoded, credential))
        except Exception:  # a bug or a disk error must not kill the connection silently
            log.exception("data plane failed on %s %s", self.command, self.path)
            response = Response(500, {"error": ErrorCode.INTERNAL})
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
                send_file(self.connection, f.fileno(), image.size, self.timeout)
        except OSError as exc:  # the copier left (cancelled, timed out) or stalled for good
            self.close_connection = True
            log.info("snapshot %s not sent to %s: %r", image.path.name, self.client_address, exc)
        finally:
            image.close()

    def _read_body(self) -> bytes:
        length_text = self.headers.get("Content-Length", "0")
        if not length_text.isdigit():
            raise HttpError(400, ErrorCode.MALFORMED, detail="bad Content-Length")
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            raise HttpError(413, ErrorCode.OVERSIZED, detail=f"body over {MAX_BODY_BYTES} bytes")
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
