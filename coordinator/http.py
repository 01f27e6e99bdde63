"""The coordinator's HTTP side (`coordinator run --http HOST:PORT`, issue 12).

Every coordinator, leader or standby, serves without the token:

* ``GET /``: the status page (``coordinator/static/status.html``: one HTML file with
  inline script and SVG, no external resource) refreshing itself from the API below;
* ``GET /api/status``: the `shardkeeper status --json` document (``summary.read_summary``,
  the function the CLI uses); ``GET /api/shards``: the `shards --json` document plus each
  shard's copies in flight; ``GET /api/events?limit=N``: the last N audit events;
* ``GET /metrics`` (Prometheus text, ``coordinator.metrics``), ``GET /healthz`` (the
  process answers) and ``GET /readyz`` (``CoordinatorMetrics.readiness``).

None of them reveals a key, a value or a secret: the documents hold cluster metadata
(members, addresses, counts, the audit log), never the data-plane token.

The API reads ZooKeeper on a session of its own, never the campaign session, so that
browsers cannot slow the leader's watches; each document is cached for ``ttl`` (0.5 s)
and read once however many requests wait for it, so that many open tabs cost ZooKeeper
one read per document and period. The server binds in its constructor (a bad address
fails at start-up), answers on at most ``workers`` threads, and closes each connection
after its answer.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoAuthError, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError

from coordinator.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from coordinator.metrics import CoordinatorMetrics
from shardkeeper import admin, cluster, summary
from shardkeeper.layout import Paths
from shardkeeper.vocab import ConfigError, CorruptZnode, ShardkeeperError
from shardkeeper.zk import ZkTarget, close, connect, format_host_port

log = logging.getLogger(__name__)

TTL = 0.5  # how long a document read from ZooKeeper is served again
WORKERS = 8  # requests answered at once; more wait in the listen backlog
QUEUE_WAIT = 5.0  # a connection no worker takes within this is closed unanswered
IDLE = 10.0  # a client that sends nothing for this long loses its connection
EVENTS_DEFAULT, EVENTS_MAX = 20, 1000  # /api/events?limit=N; the log keeps 1,000 passes
JSON = "application/json"
HTML = "text/html; charset=utf-8"
# The page needs nothing but itself and this origin's API: the policy enforces that it
# works offline (no CDN, no font, no image from elsewhere).
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline';"
               " connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none';"
               " frame-ancestors 'none'")


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str = JSON


def json_answer(status: int, obj: Any) -> Answer:
    return Answer(status, json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def shards_document(client: KazooClient, paths: Paths) -> dict[str, Any]:
    """`shards --json` (generation; per shard its in-sync replicas, primary first) with
    each shard's copies in flight (the agent copying and its source), and the members the
    leader records down in plan/meta (agent -> since when, in seconds since the epoch)."""
    cluster.read_config(client, paths)  # no config: the same refusal as the CLI's
    plan = cluster.read_plan(client, paths, complete=True)
    down = plan.meta.summary.get("down") if plan.meta else None
    return {
        "generation": plan.generation,
        # The summary is free-form JSON: keep only well-formed entries.
        "down": {a: t for a, t in down.items() if isinstance(a, str)
                 and isinstance(t, int | float) and not isinstance(t, bool)}
        if isinstance(down, dict) else {},
        "shards": [
            {"shard": s, "replicas": list(p.replicas),
             "copying": [{"agent": a, "source": src} for a, src in p.bootstrapping]}
            for s, p in enumerate(plan.shards)
        ],
    }


def events_document(client: KazooClient, paths: Paths, limit: int) -> dict[str, Any]:
    """The last ``limit`` audit events, oldest first (as `events --json --limit N`),
    reading only the newest znodes: each holds one pass's events, at least one."""
    try:
        names = sorted(client.get_children(paths.events))
    except NoNodeError:
        names = []
    after = names[-limit - 1] if len(names) > limit else ""
    entries = admin.events(client, paths, after=after)[-limit:]
    return {"events": [e.to_json() for _, e in entries]}


class ClusterReader:
    """The API's documents, read on a ZooKeeper session of our own and cached briefly."""

    def __init__(self, target: ZkTarget, paths: Paths, ttl: float = TTL,
                 session_timeout: float = 10.0):
        self.target = target
        self.paths = paths
        self.ttl = ttl
        self.session_timeout = session_timeout
        self._client: KazooClient | None = None
        self._connecting = threading.Lock()
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._cache: dict[str, tuple[float, Answer]] = {}
        self.reads = 0  # documents read from ZooKeeper (the tests count them)

    def status(self) -> Answer:
        return self._cached("status", lambda c: summary.read_summary(c, self.paths))

    def shards(self) -> Answer:
        return self._cached("shards", lambda c: shards_document(c, self.paths))

    def events(self, limit: int) -> Answer:
        return self._cached(f"events:{limit}", lambda c: events_document(c, self.paths, limit))

    def close(self) -> None:
        with self._connecting:
            if self._client is not None:
                close(self._client)
                self._client = None

    def _cached(self, key: str, read: Callable[[KazooClient], dict[str, Any]]) -> Answer:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        # One reader per document: the others wait for it and take its answer.
        with lock:
            hit = self._cache.get(key)
            if hit is not None and time.monotonic() < hit[0]:
                return hit[1]
            answer = self._read(read)
            with self._guard:
                if len(self._cache) > 16:  # /api/events?limit=N for many N
                    self._cache.clear()
                self._cache[key] = (time.monotonic() + self.ttl, answer)
            return answer

    def _read(self, read: Callable[[KazooClient], dict[str, Any]]) -> Answer:
        try:
            client = self._session()
            self.reads += 1
            return json_answer(200, read(client))
        except (ShardkeeperError, CorruptZnode, ConfigError) as e:
            # No config, a damaged znode, ZooKeeper unreachable or refusing us: say so.
            return json_answer(503, {"error": str(e)})
        except NoAuthError:
            return json_answer(503, {"error": "not authorised: the cluster's ACL refused a"
                                     " read; give the coordinator the cluster's credentials"})
        except (KazooException, KazooTimeoutError) as e:
            return json_answer(503, {"error": f"ZooKeeper request failed"
                                     f" ({type(e).__name__}): retrying"})
        except Exception:
            log.exception("reading the status document failed")
            return json_answer(500, {"error": "internal error: see the coordinator's log"})

    def _session(self) -> KazooClient:
        # Made on first use and kept: kazoo reconnects it (with a new session if needed).
        with self._connecting:
            if self._client is None:
                self._client = connect(self.target, self.session_timeout, connect_timeout=2.0,
                                       root=self.paths.root)
            return self._client


class StatusApp:
    """Routes a request to its answer (no sockets here: the tests call it directly)."""

    ROUTES = ("/", "/api/status", "/api/shards", "/api/events", "/metrics", "/healthz",
              "/readyz")

    def __init__(self, metrics: CoordinatorMetrics, reader: ClusterReader):
        self.metrics = metrics
        self.reader = reader
        self.page = resources.files("coordinator").joinpath("static/status.html").read_bytes()

    def answer(self, target: str) -> tuple[str, Answer]:
        """(route, answer) for a GET of ``target`` (path and query)."""
        parts = urllib.parse.urlsplit(target)
        route = parts.path if parts.path in self.ROUTES else "other"
        if route == "/":
            return route, Answer(200, self.page, HTML)
        if route == "/api/status":
            return route, self.reader.status()
        if route == "/api/shards":
            return route, self.reader.shards()
        if route == "/api/events":
            limit = events_limit(urllib.parse.parse_qs(parts.query).get("limit", []))
            if limit is None:
                return route, json_answer(400, {"error": f"limit must be an integer from 1 to"
                                                f" {EVENTS_MAX}"})
            return route, self.reader.events(limit)
        if route == "/metrics":
            return route, Answer(200, self.metrics.render(), METRICS_CONTENT_TYPE)
        if route == "/healthz":
            return route, json_answer(200, {"status": "ok"})
        if route == "/readyz":
            r = self.metrics.readiness()
            if r.ready:
                return route, json_answer(200, {"status": "ready", "reason": r.reason})
            return route, json_answer(503, {"status": "not_ready", "error": "not_ready",
                                            "reason": r.reason})
        return route, json_answer(404, {"error": "not found", "routes": list(self.ROUTES)})


def events_limit(values: list[str]) -> int | None:
    if not values:
        return EVENTS_DEFAULT
    text = values[-1].strip()
    if not text.isdigit() or not 1 <= int(text) <= EVENTS_MAX:
        return None
    return int(text)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = IDLE
    server_version = "shardkeeper-coordinator"

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def do_GET(self) -> None:
        self._respond(body=True)

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def _refuse(self) -> None:
        self._send(405, json_answer(405, {"error": "only GET and HEAD"}), True,
                   {"Allow": "GET, HEAD"})
        self.server.app.metrics.answered("other", 405)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    def _respond(self, body: bool) -> None:
        route, answer = self.server.app.answer(self.path)
        extra = {"Content-Security-Policy": PAGE_POLICY} if answer.content_type == HTML else {}
        self._send(answer.status, answer, body, extra)
        self.server.app.metrics.answered(route, answer.status)

    def _send(self, status: int, answer: Answer, body: bool, extra: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(answer.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.client_address[0], *args)


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most ``workers`` threads at once."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], app: StatusApp, workers: int):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        self._slots = threading.BoundedSemaphore(workers)
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for our own name (getfqdn): it is never used
        # here, and on a host without DNS it stalls start-up.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away mid-answer is routine: no traceback on stderr.
        log.debug("http: a request from %s failed", client_address[0], exc_info=True)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(timeout=QUEUE_WAIT):
            log.warning("http: every worker busy for %.0fs: closing a connection", QUEUE_WAIT)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class StatusServer:
    """The --http listener: binds in the constructor (OSError if it cannot), serves from
    ``start()`` on a thread of its own until ``stop()``."""

    def __init__(self, host: str, port: int, metrics: CoordinatorMetrics, reader: ClusterReader,
                 workers: int = WORKERS):
        self.reader = reader
        self._server = _Server((host, port), StatusApp(metrics, reader), workers)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return format_host_port(host, port)

    def start(self) -> StatusServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="http",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        # Tests and operators of port 0 read the bound address here.
        log.info("serving HTTP on http://%s/ (status page, /api/status, /metrics, /healthz,"
                 " /readyz)", self.address)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()
        self.reader.close()
