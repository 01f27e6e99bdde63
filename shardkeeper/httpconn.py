"""A kept-alive HTTP/1.1 connection to one agent: what ``shardkeeper.peer.PeerClient`` speaks.

Every answer an agent's data plane gives carries a ``Content-Length`` (``agents.dataplane.
http.encode_response``), so the client side needs little of HTTP: a request goes out in
one ``sendall`` (head and body together), an answer is read as a status line, headers and
exactly ``Content-Length`` bytes of body (or up to the close when an answer has neither a
length nor a transfer coding, as HTTP/1.0 allows). ``http.client`` did the same work
through an email-header parser and two sends per request: ~85 us of CPU per call against
~30 here, on every forward of every replicated write and every client call; and the
request's head and body left in two TCP segments, so the server woke for the head alone.

The request and the answer are separate steps (``send_request``, ``read_response``), so
that one thread can send a forward to every replica before it reads any answer.

Failures: ``OSError`` (``TimeoutError`` included) from the socket, ``ProtocolError`` for an
answer that breaks HTTP/1.1 framing or these bounds. Either way the connection is unusable
and the caller closes it.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

MAX_HEAD_BYTES = 64 << 10
MAX_BODY_BYTES = 256 << 20  # far above any answer an agent gives (a rows page is <= ~8 MiB)
_CHUNK = 64 << 10


class ProtocolError(Exception):
    """The peer's answer is not HTTP/1.1 as this client reads it."""


class Answer:
    """A status, the headers (names lower-cased) and the body of one answer."""

    __slots__ = ("status", "headers", "body", "will_close")

    def __init__(self, status: int, headers: dict[str, str], body: bytes, will_close: bool):
        self.status = status
        self.headers = headers
        self.body = body
        self.will_close = will_close


class Connection:
    """One TCP connection to ``host:port``, opened on the first request; not thread-safe."""

    def __init__(self, host: str, port: int, timeout: float):
        self.host = host
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._buf = bytearray()

    @property
    def opened(self) -> bool:
        return self.sock is not None

    def close(self) -> None:
        sock, self.sock = self.sock, None
        self._buf.clear()
        if sock is not None:
            sock.close()

    def settimeout(self, timeout: float) -> None:
        self.timeout = timeout
        if self.sock is not None:
            self.sock.settimeout(timeout)

    def send_request(self, method: str, path: str, headers: Mapping[str, str],
                     body: bytes | None) -> None:
        """Send one request, head and body in one write; connects first if need be."""
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            # One write per request, and the answer is awaited: nothing for Nagle to merge.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body or b'')}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.sock.sendall(head + body if body else head)

    def read_response(self, head_only: bool = False) -> Answer:
        """Read the answer to the request sent last (``head_only``: to a HEAD, no body)."""
        while True:
            status, headers, close = self._read_head()
            if status >= 200:
                break
            # An interim answer (100 Continue, 103): the real one follows.
        body = b"" if head_only or status in (204, 304) else self._read_body(headers)
        if "content-length" not in headers and not head_only and status not in (204, 304):
            close = True  # the body ran to the close
        return Answer(status, headers, body, close)

    # -- reading ------------------------------------------------------------------------

    def _fill(self) -> None:
        """Read what the socket has (at least one byte) into the buffer."""
        assert self.sock is not None
        chunk = self.sock.recv(_CHUNK)
        if not chunk:
            raise ProtocolError("connection closed before the answer was complete")
        self._buf += chunk

    def _read_head(self) -> tuple[int, dict[str, str], bool]:
        if self.sock is None:
            raise ProtocolError("no request sent")
        start = 0
        while (end := self._buf.find(b"\r\n\r\n", start)) < 0:
            if len(self._buf) > MAX_HEAD_BYTES:
                raise ProtocolError(f"answer head over {MAX_HEAD_BYTES} bytes")
            start = max(0, len(self._buf) - 3)
            self._fill()
        head = bytes(self._buf[:end]).decode("latin-1")
        del self._buf[: end + 4]
        status_line, *lines = head.split("\r\n")
        version, _, rest = status_line.partition(" ")
        code = rest[:3]
        if version not in ("HTTP/1.1", "HTTP/1.0") or not (len(code) == 3 and code.isascii()
                                                          and code.isdigit()):
            raise ProtocolError(f"bad status line {status_line[:100]!r}")
        headers: dict[str, str] = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise ProtocolError(f"bad header line {line[:100]!r}")
            name = name.lower()
            value = value.strip()
            if name in headers:
                if name == "content-length" and headers[name] != value:
                    raise ProtocolError("conflicting Content-Length headers")
                value = f"{headers[name]}, {value}"
            headers[name] = value
        options = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        close = "close" in options or (version == "HTTP/1.0" and "keep-alive" not in options)
        return int(code), headers, close

    def _read_body(self, headers: Mapping[str, str]) -> bytes:
        if "transfer-encoding" in headers:
            raise ProtocolError("transfer codings are not read here")
        text = headers.get("content-length")
        if text is None:
            return self._read_to_close()
        text = text.partition(",")[0].strip()  # equal copies were merged above
        if not text.isascii() or not text.isdigit() or len(text) > 12:
            raise ProtocolError(f"bad Content-Length {text[:20]!r}")
        length = int(text)
        if length > MAX_BODY_BYTES:
            raise ProtocolError(f"answer body of {length} bytes")
        if len(self._buf) >= length:
            body = bytes(self._buf[:length])
            del self._buf[:length]
            return body
        # The rest goes straight into a buffer of the right size: a rows page of megabytes
        # is not copied once per chunk.
        body_buf = bytearray(length)
        have = len(self._buf)
        body_buf[:have] = self._buf
        self._buf.clear()
        view = memoryview(body_buf)
        assert self.sock is not None
        while have < length:
            n = self.sock.recv_into(view[have:])
            if not n:
                raise ProtocolError(f"connection closed after {have} of {length} body bytes")
            have += n
        return bytes(body_buf)

    def _read_to_close(self) -> bytes:
        assert self.sock is not None
        while chunk := self.sock.recv(_CHUNK):
            self._buf += chunk
            if len(self._buf) > MAX_BODY_BYTES:
                raise ProtocolError(f"answer body over {MAX_BODY_BYTES} bytes")
        body = bytes(self._buf)
        self._buf.clear()
        return body
