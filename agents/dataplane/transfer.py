"""Snapshot transfer, both ends: the source sends its store file, a new replica receives it.

A snapshot is the whole store file (tens of MB); everything else on the wire is small. Its
bytes stay in the kernel: the server sends them with one blocking sendfile (``send_file``),
the client splices them socket -> pipe -> file (recv_into + write where there is no splice;
``fetch_snapshot``), so neither end copies through user space or takes the GIL per socket
buffer. Each chunk's writeback starts as it lands, so the fsync that makes the installed
image durable finds the file mostly on disk; writing it all inside that fsync took ~13 ms of
a ~33 ms bootstrap of 23 MB on a quiet machine, and 35-85 ms behind other processes' I/O.

Only agents copy shards, so this lives here and not in ``shardkeeper.peer``; the download
speaks raw HTTP/1.1 on a socket of its own because ``http.client`` would read the body
through Python.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import http.client
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from shardkeeper.peer import PeerError, PeerUnavailable
from shardkeeper.wire import SNAPSHOT_CONTENT_TYPE, json_object, shard_path

SPLICE_SNAPSHOTS = hasattr(os, "splice")  # Linux, Python >= 3.10
SNAPSHOT_CHUNK = 1 << 20
MAX_HEAD_BYTES = 64 << 10
MAX_ERROR_BODY = 1 << 20


class CopyCancelled(Exception):
    """The copy was stopped; its cursor is persisted and the next copy resumes from it."""


# -- the receiving end -------------------------------------------------------------------


def fetch_snapshot(
    address: str,
    shard: int,
    dest: Path,
    *,
    token: str,
    timeout: float,
    stop: threading.Event | None = None,
) -> int:
    """Download the shard's store file image from ``address`` into ``dest``; its size.

    One attempt on a connection of its own (the caller falls back to the rows stream).
    ``timeout`` bounds the connect and each wait for more bytes. Raises PeerError (409 busy,
    404 unknown shard, 401 token), PeerUnavailable (503, no answer, timeout, truncated
    body), CopyCancelled (``stop`` set between chunks).
    """
    host, _, port = address.rpartition(":")
    path = shard_path(shard, "snapshot")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.sendall(_get_request(address, path, token))
            status, headers = _read_head(sock)
            length = _content_length(headers)
            if status != 200 or headers.get("content-type") != SNAPSHOT_CONTENT_TYPE:
                body = json_object(_recv_exact(sock, min(length, MAX_ERROR_BODY)))
                kind = PeerUnavailable if status == 503 else PeerError
                raise kind(address, f"snapshot: {status} {body.get('error', '')}", status, body)
            with dest.open("wb", buffering=0) as out:
                received = _receive_body(sock, out.fileno(), length, timeout, stop,
                                         f"shard {shard} snapshot")
    except (OSError, http.client.HTTPException) as exc:
        raise PeerUnavailable(address, f"GET {path}: {exc!r}") from exc
    if received != length:
        raise PeerUnavailable(address, f"snapshot truncated at {received} of {length} bytes")
    return received


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


# -- the sending end ---------------------------------------------------------------------


def send_file(sock: socket.socket, fd: int, size: int, timeout: float) -> None:
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
