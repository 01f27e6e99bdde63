"""Strict HTTP/1.1 for the data plane: the request head parser and the response encoder.

Pure functions on bytes (the sockets are ``agents.dataplane.conns``'s), so that they can be
fuzzed. The parser accepts what ``http.client``, curl and the agents' own snapshot download
send, and refuses anything else with a 4xx ``HttpError`` before a byte of body is read:

- request line ``METHOD SP origin-form SP HTTP/1.0|HTTP/1.1``; the method a token, the
  target visible ASCII starting with ``/`` (no fragment); leading empty lines are skipped
  by the caller (RFC 9112 section 2.2);
- header lines ``name ":" OWS value OWS``: the name a token, the value visible ASCII, space
  and tab; no obs-fold, no bare CR or LF, at most ``MAX_HEADERS`` of them and
  ``MAX_HEAD_BYTES`` in all (431);
- framing: ``Content-Length`` as ASCII digits only, once, at most ``MAX_BODY_BYTES`` (413);
  ``Transfer-Encoding`` is refused (411: every client here sends a length), and so are
  duplicates of the headers whose meaning a duplicate would make ambiguous;
- ``Expect: 100-continue`` is honoured (the body is asked for only once the request is
  admitted), any other expectation is 417.

Numbers elsewhere in a request (shard ids, ``after=``) go through ``ascii_int``: ASCII digits
only (``str.isdigit`` accepts ``"²"``), bounded (``10**30`` is a 400, not an overflow).
"""

from __future__ import annotations

import http
import json
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agents.store import FileImage
from shardkeeper.wire import MAX_BODY_BYTES, ErrorCode

MAX_HEAD_BYTES = 16 << 10  # a key path is at most ~3 KiB percent-encoded
MAX_HEADERS = 64
JSON_CONTENT_TYPE = "application/json"

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (/[!-~]*) HTTP/1\.([01])")
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([!-~ \t]*?)[ \t]*")
_DIGITS = re.compile(r"[0-9]+")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_QUERY_NAME = re.compile(r"[a-z_]{1,32}")
# Headers a second copy of would make the request ambiguous (framing, credentials).
_SINGLE = frozenset({"content-length", "transfer-encoding", "authorization", "host", "expect",
                     "content-type", "connection"})


class HttpError(Exception):
    """An HTTP error answer: status plus a JSON body with at least ``error``."""

    def __init__(self, status: int, error: ErrorCode, **details: Any):
        super().__init__(f"{status} {error}")
        self.status = status
        self.body = {"error": error, **details}

    def response(self) -> Response:
        # A 405 names the methods it would take, in the header RFC 9110 asks for too.
        allowed = self.body.get("allowed") if self.status == 405 else None
        return Response(self.status, self.body, {"Allow": allowed} if allowed else {})


def malformed(detail: str) -> HttpError:
    return HttpError(400, ErrorCode.MALFORMED, detail=detail)


@dataclass(frozen=True)
class RequestHead:
    """A parsed request line and headers (names lower-cased)."""

    method: str
    target: str
    headers: Mapping[str, str]
    content_length: int = 0
    keep_alive: bool = True
    expect_continue: bool = False

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    @property
    def segments(self) -> tuple[str, ...]:
        """The path's segments, still percent-encoded; empty ones (``//``) dropped."""
        return tuple(s for s in self.path.split("/") if s)


def find_head_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """The index just past the blank line that ends a head, or -1 if it is not all here."""
    end = buffer.find(b"\r\n\r\n", max(0, start - 3))
    return -1 if end < 0 else end + 4


def parse_head(data: bytes) -> RequestHead:
    """Parse a head (request line and headers, without the final blank line)."""
    if len(data) > MAX_HEAD_BYTES:
        raise HttpError(431, ErrorCode.HEAD_TOO_LARGE, detail=f"over {MAX_HEAD_BYTES} bytes")
    request_line, *lines = data.split(b"\r\n")
    if len(lines) > MAX_HEADERS:
        raise HttpError(431, ErrorCode.HEAD_TOO_LARGE, detail=f"over {MAX_HEADERS} headers")
    matched = _REQUEST_LINE.fullmatch(request_line)
    if matched is None:
        raise malformed("bad request line")
    method, target, minor = matched.groups()
    if b"#" in target:
        raise malformed("a request target has no fragment")
    headers: dict[str, str] = {}
    for line in lines:
        header = _HEADER_LINE.fullmatch(line)
        if header is None:
            raise malformed("bad header line")
        name = header.group(1).decode("ascii").lower()
        value = header.group(2).decode("ascii")
        if name in headers:
            if name in _SINGLE:
                raise malformed(f"more than one {name} header")
            value = f"{headers[name]}, {value}"
        headers[name] = value
    if "transfer-encoding" in headers:
        raise HttpError(411, ErrorCode.LENGTH_REQUIRED,
                        detail="no transfer codings here: send Content-Length")
    length = 0
    if "content-length" in headers:
        length = ascii_int(headers["content-length"], "Content-Length", 1 << 62)
        if length > MAX_BODY_BYTES:
            raise HttpError(413, ErrorCode.OVERSIZED, detail=f"body over {MAX_BODY_BYTES} bytes")
    options = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in options and (minor == b"1" or "keep-alive" in options)
    expect = headers.get("expect", "").lower()
    if expect and expect != "100-continue":
        raise HttpError(417, ErrorCode.EXPECTATION_FAILED, detail="only 100-continue")
    return RequestHead(method.decode("ascii"), target.decode("ascii"), headers, length,
                       keep_alive, expect == "100-continue")


def ascii_int(text: str, name: str, maximum: int) -> int:
    """``text`` as a non-negative integer of ASCII digits up to ``maximum``; else a 400."""
    if len(text) > 20 or not _DIGITS.fullmatch(text):
        raise malformed(f"{name} must be ASCII digits")
    value = int(text)
    if value > maximum:
        raise malformed(f"{name} must be at most {maximum}")
    return value


def percent_decode(segment: str) -> bytes:
    """A path segment's bytes; a ``%`` not followed by two hex digits is a 400."""
    if _BAD_ESCAPE.search(segment):
        raise malformed("bad percent-escape")
    return urllib.parse.unquote_to_bytes(segment)


def parse_query(query: str, allowed: frozenset[str]) -> dict[str, str]:
    """``name=value&...`` with names from ``allowed``, each at most once, values ASCII."""
    if not query:
        return {}
    found: dict[str, str] = {}
    for pair in query.split("&"):
        name, sep, value = pair.partition("=")
        if not sep or not _QUERY_NAME.fullmatch(name) or name not in allowed:
            raise malformed(f"bad query parameter {name!r}; allowed: {sorted(allowed)}")
        if name in found:
            raise malformed(f"query parameter {name!r} given twice")
        try:
            found[name] = percent_decode(value).decode("ascii")
        except UnicodeDecodeError:
            raise malformed(f"query parameter {name!r} is not ASCII") from None
    return found


def parse_json(body: bytes) -> Any:
    """A request body as JSON: strict UTF-8, no NaN or Infinity; deep nesting is a 400."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:  # the decoder's guard against nesting deeper than the stack
        raise malformed("body nests too deep") from None
    except ValueError:  # bad UTF-8, bad JSON, an integer of more than 4300 digits
        raise malformed("body is not JSON") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True)
class Response:
    """An answer: ``body`` as JSON, or ``data`` as is with ``content_type``, or ``image`` (a
    store file, sent with sendfile, then closed)."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    data: bytes | None = None
    content_type: str = JSON_CONTENT_TYPE
    image: FileImage | None = None


def encode_head(status: int, headers: Mapping[str, str], close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_reason(status)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def encode_response(response: Response, *, close: bool, head_only: bool = False) -> bytes:
    """The bytes of an answer without an image (``head_only``: a HEAD's, without the body)."""
    payload = response.data if response.data is not None else json.dumps(response.body).encode()
    headers = {"Content-Type": response.content_type, "Content-Length": str(len(payload)),
               **response.headers}
    head = encode_head(response.status, headers, close)
    return head if head_only else head + payload


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
