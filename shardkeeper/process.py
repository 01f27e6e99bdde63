"""Running a long-lived role (agent, coordinator) in the foreground, and spawning one."""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)


LOG_FORMATS = ("text", "json")
# LogRecord attributes that are not fields passed with ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601 with the zone), ``level``, ``role``
    and ``id`` of the process, ``logger``, ``event`` (the message) and ``fields`` (what
    the call passed with ``extra=``, and the exception's traceback, if any)."""

    def __init__(self, role: str, ident: str):
        super().__init__()
        self.role = role
        self.ident = ident

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created).astimezone()
        fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json.dumps({
            "time": stamp.isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "role": self.role,
            "id": self.ident,
            "logger": record.name,
            "event": record.getMessage(),
            "fields": fields,
        }, default=str)


def setup_logging(level: str, fmt: str = "text", role: str = "", ident: str = "") -> None:
    """Log to stderr at ``level``: as text lines, or (``fmt`` "json") one JSON object per
    line naming the process's ``role`` and ``ident`` (see JsonFormatter)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role, ident))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # kazoo logs every reconnection attempt at WARNING; the roles log what matters.
    logging.getLogger("kazoo.client").setLevel(logging.ERROR)


def run_until_signal(run: Callable[[], None], stop: Callable[[], None]) -> None:
    """Run ``run`` in a thread; SIGTERM or SIGINT calls ``stop`` and waits for it to end.

    The signal handler only sets an event: the main thread, not the handler, calls
    ``stop``, so that no lock held by the interrupted code is taken again.
    """
    stopping = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)
        finally:
            stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    worker = threading.Thread(target=target, name="main-loop", daemon=True)
    worker.start()
    while not stopping.wait(0.2):
        pass
    stop()
    worker.join(30)
    if errors:
        raise errors[0]


def cli_command(*args: str) -> list[str]:
    """The argv that runs `shardkeeper ARGS` with this interpreter (no PATH needed).

    ``-P``: the current directory is not put first on sys.path, so that a process started
    from another checkout of shardkeeper runs the code this interpreter has installed,
    not that checkout's (`dev up` from the wrong directory ran agents of other code)."""
    return [sys.executable, "-P", "-m", "shardkeeper", *args]


def spawn(argv: Sequence[str], log_path: Path, detach: bool = False,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a process whose output goes to ``log_path``; ``detach`` survives our exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=detach,
            env=dict(os.environ, **(env or {})),
        )
