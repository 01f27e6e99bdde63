"""Running a long-lived role (agent, coordinator) in the foreground, and spawning one."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
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
    """The argv that runs `shardkeeper ARGS` with this interpreter (no PATH needed)."""
    return [sys.executable, "-m", "shardkeeper", *args]


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
