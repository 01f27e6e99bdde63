"""The data plane's endpoints: one agent's shards over HTTP (``shardkeeper.wire`` documents
the protocol, ``agents.dataplane.conns`` the connections and threads).

``DataPlane`` is the application the connection layer calls, in two steps:

- ``admit(head)``, on the I/O thread, before any body is read: the endpoint, the method,
  the token (the peer token opens every endpoint, the cluster token only the client ones;
  during a rotation each lists two tokens, both accepted), the shard number, key and query.
  ``GET /v1/auth`` is answered there too: which kind of token the request carries, so a
  tool can check that this agent accepts a token (`shardkeeper token rotate`). Anything
  wrong is answered there (404, 405, 401, 403, 400, 413, 503) and the body is never read.
  An admitted request goes to a worker lane: peers' forwards and repairs, clients' reads
  and writes, bulk transfers (rows, snapshots).
- ``handle(head, call, body)``, on a worker: parse the JSON body, look the shard up in
  the ``ShardTable`` the runtime keeps, and answer from the shard's store.

The primary's write path runs here, one batch at a time per shard: assign LSNs above the
local maximum and above every older term's (``store.next_lsn``), apply locally, forward
(``replication.Replicator``), and acknowledge only if every in-sync replica applied the
rows and the agent is still writable. Writes to a shard that arrive while another is being
written queue, and go out together as the next batch (``group.GroupCommit``). A replica
takes forwards through
``replication.accept_forward`` under the shard's replica lock. Snapshots go out with
``transfer.send_file``.
"""

from __future__ import annotations

import hmac
import logging
import sqlite3
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from agents.dataplane.compaction import Compactor, grace_from_env
from agents.dataplane.conns import Admission, HttpServer, ServerLimits
from agents.dataplane.group import Change, GroupCommit
from agents.dataplane.http import (
    HttpError,
    RequestHead,
    Response,
    ascii_int,
    malformed,
    parse_json,
    parse_query,
    percent_decode,
)
from agents.dataplane.lanes import Lane
from agents.dataplane.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from agents.dataplane.metrics import PlaneMetrics
from agents.dataplane.replication import (
    TERM_AHEAD_SECONDS,
    Refused,
    Replicator,
    accept_forward,
)
from agents.dataplane.table import ShardRoute, ShardTable
from agents.shardsm import ShardState
from agents.store import (
    BehindHorizon,
    ShardStore,
    StoreBusy,
    StoreClosed,
    StoreError,
    next_lsn,
)
from agents.storeset import StoreSet
from shardkeeper.peer import PeerClient
from shardkeeper.token import Tokens, accepted
from shardkeeper.wire import (
    DEFAULT_PAGE_ROWS,
    MAX_BATCH_KEYS,
    MAX_LSN,
    MAX_PAGE_BYTES,
    MAX_PAGE_ROWS,
    MAX_SHARD,
    MAX_TERM,
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
# Writers queued on one shard go out as one batch up to this many bytes of keys and values
# (and MAX_BATCH_KEYS rows, what a replica takes in one forward); one write alone may be
# larger. A forward's body stays far below MAX_BODY_BYTES.
GROUP_MAX_BYTES = 4 << 20


class Credential(StrEnum):
    CLIENT = "client"  # the cluster token: the client endpoints
    PEER = "peer"  # the peer token: every endpoint


@dataclass(frozen=True)
class Endpoint:
    """One ``/v1/shards/S/<name>`` endpoint: the metrics route is its name."""

    methods: tuple[str, ...]
    # The replication endpoints are the peer token's alone (issue 10): a client token
    # holder could otherwise forge a forward (and stop a replica applying real ones
    # silently) or read whole shards.
    needs: Credential
    lane: Lane
    query: frozenset[str] = frozenset()


ENDPOINTS: dict[str, Endpoint] = {
    "keys": Endpoint(("GET", "PUT", "DELETE"), Credential.CLIENT, Lane.CLIENT),
    "batch": Endpoint(("POST",), Credential.CLIENT, Lane.CLIENT),
    "digest": Endpoint(("GET",), Credential.CLIENT, Lane.CLIENT, frozenset({"digest"})),
    "replicate": Endpoint(("POST",), Credential.PEER, Lane.PEER),
    "repair": Endpoint(("POST",), Credential.PEER, Lane.PEER),
    "rows": Endpoint(("GET",), Credential.PEER, Lane.BULK, frozenset({"after", "limit"})),
    "snapshot": Endpoint(("GET",), Credential.PEER, Lane.BULK),
}
BODY_METHODS = ("PUT", "POST")
# Answered on the I/O thread without a token (issue 12): probes and scrapers hold none, and
# these reveal no key, value or secret.
OPEN = ("healthz", "readyz", "metrics")
AUTH = ("v1", "auth")  # GET: {"credential": "client"|"peer", "current": the one sent?}


@dataclass(frozen=True)
class Call:
    """What admission found in a head, for the worker that answers it."""

    endpoint: str
    method: str
    shard: int
    credential: Credential
    key: bytes = b""
    query: Mapping[str, str] = field(default_factory=dict)


class DataPlane:
    """The data-plane HTTP server of one agent.

    ``stores`` holds the shard files, ``table`` says what each local shard is (the runtime
    keeps it current), ``token`` is the cluster token (the client endpoints), ``peer_token``
    the peer token (every endpoint; its forwards send it); ``forward_timeout`` bounds each
    forward, ``term_ahead_wait`` how long a replica that answers ``term_ahead`` is asked
    again, ``client`` (tests) replaces the forwarding client, ``limits`` the thread model
    and time-outs (``conns.ServerLimits``); ``metrics`` (``metrics.PlaneMetrics``) is what
    /metrics and /readyz serve, fed by the runtime. The constructor binds ``host:port`` (port 0
    picks a free one; see ``address``), ``start()`` serves, ``stop()`` closes the listener
    and every open connection, so peers see this agent go away at once.
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
        limits: ServerLimits | None = None,
        metrics: PlaneMetrics | None = None,
    ):
        self.stores = stores
        self.table = table
        self.tokens = Tokens(token, peer_token)
        self.forward_timeout = forward_timeout
        self._writes: dict[int, GroupCommit] = {}
        self._replica_locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.metrics = metrics or PlaneMetrics()
        self._server = HttpServer((host, port), self, limits, name="dataplane")
        self.metrics.watch_server(self._server.stats)
        self.replicator = Replicator(
            client or PeerClient(peer_token, timeout=forward_timeout, attempts=1),
            forward_timeout,
            term_ahead_wait=term_ahead_wait,
            workers=self._server.limits.forward_workers,
            name=f"{self._server.name}-forward",
        )
        # Purges the tombstones every in-sync replica has had for a while (SHARDKEEPER_
        # TOMBSTONE_GRACE; see agents.dataplane.compaction); asks peers with the peer token.
        self.compactor = Compactor(stores, table, lambda: self.tokens.peer, grace_from_env())

    def set_tokens(self, tokens: Tokens) -> None:
        """Switch to the cluster's tokens (the agent learns them after binding its port, and
        again at each step of a rotation): forwards send the new peer token from now on."""
        self.replicator.client.token = tokens.peer
        self.tokens = tokens

    @property
    def address(self) -> str:
        host, port = self._server.address
        return f"{host}:{port}"

    @property
    def limits(self) -> ServerLimits:
        return self._server.limits

    def stats(self) -> dict[str, int]:
        """Open connections and busy workers per lane."""
        return self._server.stats()

    def start(self) -> DataPlane:
        self._server.start()
        self.compactor.start()
        return self

    def stop(self) -> None:
        self.compactor.stop()
        self._server.stop()
        self.replicator.close()

    # admission: on the I/O thread, from the head alone

    def credential(self, header: str | None) -> Credential | None:
        """Which token the ``Authorization`` header carries, if any (constant time)."""
        if header is None:
            return None
        given = header.encode("latin-1", "replace")
        tokens = self.tokens  # one read: set_tokens may swap it meanwhile
        found = None
        for credential, listed in ((Credential.PEER, tokens.peer_accepted),
                                   (Credential.CLIENT, tokens.client_accepted)):
            if accepted(given, listed, b"Bearer "):
                found = credential
        return found

    def admit(self, head: RequestHead) -> Admission:
        seg = head.segments
        route = route_of(seg)
        try:
            return self._admit(head, seg, route)
        except HttpError as exc:
            return Admission(route, response=exc.response())
        except Malformed as exc:  # a key that breaks the wire's rules
            return Admission(route, response=_malformed_response(exc))

    def _admit(self, head: RequestHead, seg: tuple[str, ...], route: str) -> Admission:
        if route in OPEN:
            self._allow(head, ("GET",))
            if head.content_length:
                raise malformed(f"{head.method} takes no body")
            answer = {"healthz": self.healthz, "readyz": self.readyz,
                      "metrics": self.metrics_text}[route]
            return Admission(route, response=answer())
        if seg == AUTH:
            return Admission(route, response=self._auth(head))
        endpoint = ENDPOINTS.get(route)
        if endpoint is None or seg[:2] != ("v1", "shards") or len(seg) != (
            5 if route == "keys" else 4
        ):
            raise HttpError(404, ErrorCode.NO_SUCH_ENDPOINT)
        self._allow(head, endpoint.methods)
        credential = self._authorize(head, endpoint.needs)
        if not self.table.serving:
            raise HttpError(503, ErrorCode.NOT_SERVING, detail="ZooKeeper session lost")
        shard = ascii_int(seg[2], "shard number", MAX_SHARD)
        key = b""
        if route == "keys":
            key = percent_decode(seg[4])
            check_key(key)
        query = parse_query(head.query, endpoint.query)
        if head.content_length and head.method not in BODY_METHODS:
            raise malformed(f"{head.method} takes no body")
        lane = Lane.PEER if credential is Credential.PEER and route == "digest" else endpoint.lane
        return Admission(route, lane, call=Call(route, head.method, shard, credential, key,
                                                query))

    @staticmethod
    def _allow(head: RequestHead, methods: tuple[str, ...]) -> None:
        if head.method not in methods:
            raise HttpError(405, ErrorCode.METHOD_NOT_ALLOWED, allowed=", ".join(methods))

    def _authorize(self, head: RequestHead, needs: Credential) -> Credential:
        credential = self.credential(head.headers.get("authorization"))
        if credential is None:
            raise HttpError(401, ErrorCode.UNAUTHORIZED, detail="bad or missing token")
        if needs is Credential.PEER and credential is not Credential.PEER:
            raise HttpError(403, ErrorCode.FORBIDDEN, detail="this endpoint needs the peer token")
        return credential

    def _auth(self, head: RequestHead) -> Response:
        """``GET /v1/auth``: the credential the token gives (401 as anywhere if none), and
        whether it is the one this agent sends (the first of its list)."""
        self._allow(head, ("GET",))
        if head.content_length:
            raise malformed(f"{head.method} takes no body")
        credential = self._authorize(head, Credential.CLIENT)
        tokens = self.tokens
        sent = tokens.peer if credential is Credential.PEER else tokens.client
        current = hmac.compare_digest(head.headers.get("authorization", "").encode(
            "latin-1", "replace"), f"Bearer {sent}".encode())
        return Response(200, {"credential": str(credential), "current": current})

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Called once per answer."""
        self.metrics.observe(route, status, seconds)

    # answers: on a worker

    def handle(self, head: RequestHead, call: Call, body: bytes) -> Response:
        """Answer one admitted request."""
        try:
            if not self.table.serving:  # lost while the request waited for a worker
                raise HttpError(503, ErrorCode.NOT_SERVING, detail="ZooKeeper session lost")
            data = parse_json(body) if body else None
            response = self._handlers[call.endpoint](self, call, data)
        except HttpError as exc:
            response = exc.response()
        except Malformed as exc:  # a key, value or row that breaks the wire's rules
            response = _malformed_response(exc)
        except BehindHorizon as exc:  # the asker must copy the whole store instead
            response = Response(409, {"error": ErrorCode.BEHIND_HORIZON,
                                      "horizon": exc.horizon})
        except StoreClosed as exc:  # dropped (or swapped and not reopened) under the request
            response = Response(503, {"error": ErrorCode.SHARD_NOT_OPEN, "detail": str(exc)})
        except (StoreError, sqlite3.Error) as exc:
            # A full disk or an I/O error: nothing was acknowledged, the caller retries
            # elsewhere or later. One line: a traceback per request would bury the log.
            log.warning("%s %s: shard store failed: %s", head.method, head.target, exc)
            response = Response(503, {"error": ErrorCode.STORE_FAILED, "detail": str(exc)})
        if response.status == 307:
            location = f"http://{response.body['primary']}{head.target}"
            response = Response(307, response.body, headers={"Location": location})
        return response

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

    def writes_of(self, shard: int) -> GroupCommit:
        """The shard's queue of writes (one batch written at a time)."""
        with self._locks_guard:
            writes = self._writes.get(shard)
            if writes is None:
                writes = self._writes[shard] = GroupCommit(MAX_BATCH_KEYS, GROUP_MAX_BYTES)
            return writes

    # handlers

    def healthz(self) -> Response:
        """200 while the process runs (its I/O thread answers); no ZooKeeper needed."""
        body = {
            "status": "ok",
            "serving": self.table.serving,
            "writable": self.table.writable,
            "shards": len(self.table.routes()),
        }
        return Response(200, body)

    def readyz(self) -> Response:
        """200 once the runtime said the agent read its plan in this session and serves it."""
        ready, reason = self.metrics.readiness()
        if ready and not self.table.serving:  # lost since the runtime's last turn
            ready, reason = False, "ZooKeeper session lost: not serving"
        if ready:
            return Response(200, {"status": "ready"})
        return Response(503, {"status": "not_ready", "error": ErrorCode.NOT_READY,
                              "reason": reason})

    def metrics_text(self) -> Response:
        return Response(200, data=self.metrics.render(), content_type=METRICS_CONTENT_TYPE)

    def keys(self, call: Call, data: Any) -> Response:
        if call.method == "GET":
            self._primary_route(call.shard)
            row = self._store_of(call.shard).get(call.key)
            if row is None or row.tombstone:
                raise HttpError(404, ErrorCode.NOT_FOUND)
            return Response(200, row_to_json(row))
        value = None
        if call.method == "PUT":
            value = unb64(body_field(data, "value"), "value")
            check_value(value)
        return Response(200, {"lsn": self.write(call.shard, [(call.key, value)])[0]})

    def batch(self, call: Call, data: Any) -> Response:
        puts = body_field(data, "puts")
        if not isinstance(puts, list) or not puts:
            raise malformed("puts must be a non-empty list")
        if len(puts) > MAX_BATCH_KEYS:
            raise HttpError(413, ErrorCode.OVERSIZED,
                            detail=f"at most {MAX_BATCH_KEYS} puts per batch")
        changes = [parse_put(item) for item in puts]
        return Response(200, {"lsns": self.write(call.shard, changes)})

    def write(self, shard: int, changes: list[Change]) -> list[int]:
        """The primary's write path; returns the LSNs once every in-sync replica applied."""
        self._primary_route(shard)
        self._store_of(shard)
        return self.writes_of(shard).write(changes, lambda batch: self._write_batch(shard, batch))

    def _write_batch(self, shard: int, changes: list[Change]) -> list[int]:
        """Write one batch (one writer's changes, or several queued writers'); called for
        one batch at a time per shard, which keeps each replica's stream in LSN order."""
        # Read now, not when the writers arrived: a demotion or a new term may have landed.
        route = self._primary_route(shard)
        store = self._store_of(shard)
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

    def replicate(self, call: Call, data: Any) -> Response:
        """A replica applies a primary's forward (``replication.accept_forward``)."""
        term = int_field(data, "term", MAX_TERM)
        prev = int_field(data, "prev_lsn", MAX_LSN)
        sync = body_field(data, "sync")
        raw_rows = body_field(data, "rows")
        if not isinstance(sync, bool) or not isinstance(raw_rows, list) or not raw_rows:
            raise malformed("sync must be a bool, rows a non-empty list")
        if len(raw_rows) > MAX_BATCH_KEYS:
            raise HttpError(413, ErrorCode.OVERSIZED, detail=f"at most {MAX_BATCH_KEYS} rows")
        rows = [row_from_json(r) for r in raw_rows]
        self._route_of(call.shard)
        store = self._store_of(call.shard)
        with self._lock_for(self._replica_locks, call.shard):
            # The route as the runtime set it last, read under the lock that orders forwards.
            route = self._route_of(call.shard)
            try:
                sync_lsn = accept_forward(route, store, term, prev, rows, sync)
            except Refused as exc:
                raise HttpError(409, exc.error, **exc.details) from exc
        return Response(200, {"sync_lsn": sync_lsn})

    def rows(self, call: Call, data: Any) -> Response:
        after = query_int(call, "after", 0, MAX_LSN)
        limit = query_int(call, "limit", DEFAULT_PAGE_ROWS, MAX_PAGE_ROWS)
        if limit == 0:
            raise malformed(f"need 0 < limit <= {MAX_PAGE_ROWS}")
        route = self._route_of(call.shard)
        if route.state not in SOURCES:
            raise HttpError(409, ErrorCode.NOT_A_SOURCE, state=str(route.state))
        entries, upto, complete = self._store_of(call.shard).synced_entries(
            after, limit, MAX_PAGE_BYTES
        )
        return Response(200, data=encode_rows_page(entries, upto, complete),
                        content_type=ROWS_CONTENT_TYPE)

    def snapshot(self, call: Call, data: Any) -> Response:
        """The shard's store file as a consistent image (a fresh replica's fast bootstrap)."""
        route = self._route_of(call.shard)
        if route.state not in SOURCES:
            raise HttpError(409, ErrorCode.NOT_A_SOURCE, state=str(route.state))
        try:
            image = self._store_of(call.shard).open_image()
        except StoreBusy as exc:
            raise HttpError(409, ErrorCode.BUSY, detail=str(exc)) from exc
        return Response(200, image=image, content_type=SNAPSHOT_CONTENT_TYPE)

    def digest(self, call: Call, data: Any) -> Response:
        """The shard's markers, and its digest unless ``?digest=0`` (the compactor asks
        only for the markers, often)."""
        route = self._route_of(call.shard)
        store = self._store_of(call.shard)
        body = {
            "digest": store.digest() if call.query.get("digest") != "0" else "",
            "horizon": store.horizon(),
            "max_lsn": store.max_lsn(),
            "sync_lsn": store.sync_lsn(),
            "promotion_lsn": store.promotion_lsn(),
            "rows": store.count(),
            "state": str(route.state),
            "term": route.term,
        }
        return Response(200, body)

    def repair(self, call: Call, data: Any) -> Response:
        self._primary_route(call.shard)
        keys = body_field(data, "keys")
        if not isinstance(keys, list) or len(keys) > MAX_BATCH_KEYS:
            raise malformed(f"keys must be a list of <= {MAX_BATCH_KEYS}")
        decoded = [unb64(k, "key") for k in keys]
        for key in decoded:
            check_key(key)
        found = self._store_of(call.shard).get_many(decoded)
        answer = [
            {"key": b64(k), "row": row_to_json(found[k]) if k in found else None} for k in decoded
        ]
        return Response(200, {"rows": answer})

    _handlers: dict[str, Callable[[DataPlane, Call, Any], Response]] = {
        "keys": keys, "batch": batch, "replicate": replicate, "rows": rows,
        "snapshot": snapshot, "digest": digest, "repair": repair,
    }


# -- request parsing ---------------------------------------------------------------------


def route_of(segments: tuple[str, ...]) -> str:
    """The route a path counts under in the metrics: a bounded set, never the raw path."""
    if len(segments) == 1 and segments[0] in OPEN:
        return segments[0]
    if segments == AUTH:
        return "auth"
    if len(segments) >= 4 and segments[:2] == ("v1", "shards") and segments[3] in ENDPOINTS:
        return segments[3]
    return "other"


def _malformed_response(exc: Malformed) -> Response:
    return Response(exc.status, {"error": exc.error, "detail": str(exc)})


def body_field(data: Any, name: str) -> Any:
    if not isinstance(data, dict) or name not in data:
        raise malformed(f"body must be a JSON object with {name!r}")
    return data[name]


def int_field(data: Any, name: str, maximum: int) -> int:
    value = body_field(data, name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise malformed(f"{name} must be an integer in 0..{maximum}")
    return value


def query_int(call: Call, name: str, default: int, maximum: int) -> int:
    text = call.query.get(name)
    return default if text is None else ascii_int(text, name, maximum)


def parse_put(item: Any) -> tuple[bytes, bytes]:
    if not isinstance(item, dict):
        raise malformed("each put must be an object")
    key = unb64(item.get("key"), "key")
    value = unb64(item.get("value"), "value")
    check_key(key)
    check_value(value)
    return key, value
