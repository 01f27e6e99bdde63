"""The terminal: Ctrl-C without a traceback, progress bars, and a view redrawn in place.

Everything here degrades to plain lines when the stream is not a terminal (a pipe, a
file, a CI log): a bar then prints a line when its figures change (at most one a
second, and the last one always), and a redrawn view is left to the caller, which prints
one line per change instead.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import IO

import click

from shardkeeper.cli.view import bar, percent

# The exit status of a command stopped by Ctrl-C, as shells report it (128 + SIGINT).
INTERRUPTED = 130


def is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def interruptible(*wake: threading.Event) -> Iterator[threading.Event]:
    """Within the block, SIGINT (Ctrl-C) sets the returned event (and ``wake``) instead of
    raising KeyboardInterrupt, so that a long wait stops where it is safe to: the caller
    checks the event, closes its ZooKeeper session and exits. Raising in the middle of
    kazoo's code left two tracebacks (ours, and its thread's at exit).

    An explicit handler also works where the shell started us with SIGINT ignored (a
    background job), where Python would not raise KeyboardInterrupt at all."""
    stop = threading.Event()

    def handler(_signum: int, _frame: object) -> None:
        stop.set()
        for event in wake:
            event.set()

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (an embedding program): leave SIGINT alone
        yield stop
        return
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def exit_interrupted(message: str = "") -> None:
    """End the command as stopped by Ctrl-C: an optional note on stderr, status 130."""
    if message:
        click.echo(message, err=True)
    raise click.exceptions.Exit(INTERRUPTED)


def width(stream: IO[str]) -> int:
    return shutil.get_terminal_size((100, 40)).columns if is_tty(stream) else 100


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, otherwise a plain line
    whenever the figures change (at most one a second; the final one always)."""

    def __init__(self, label: str, stream: IO[str] | None = None, every: float = 1.0):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = is_tty(self.stream)
        self.every = every
        self.last: tuple[int, int, str] | None = None
        self.printed = 0.0
        self.drawn = False

    def line(self, done: int, total: int, note: str) -> str:
        if self.tty:
            text = f"{self.label} {bar(done, total)} {done}/{total} {percent(done, total)}"
        else:
            text = f"{self.label}: {done}/{total} ({percent(done, total)})"
        return f"{text}  {note}" if note else text

    def update(self, done: int, total: int, note: str = "", final: bool = False) -> None:
        """Show these figures; ``final``: the last update (always shown, ends the line)."""
        figures = (done, total, note)
        if self.tty:
            if figures == self.last and not final:
                return
            text = self.line(done, total, note)[: width(self.stream) - 1]
            self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
            self.drawn = not final
        else:
            if figures == self.last:
                return
            now = time.monotonic()
            if not final and self.last is not None and now - self.printed < self.every:
                return  # too soon: a later line shows this change
            self.stream.write(self.line(done, total, note) + "\n")
            self.printed = now
        self.last = figures
        self.stream.flush()

    def close(self) -> None:
        """Leave the terminal's cursor on a fresh line (a bar may be half drawn)."""
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


class Screen:
    """A block of lines redrawn in place on a terminal: each frame moves the cursor back
    over the previous one and clears it, so the screen's history stays as it was above."""

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream or sys.stdout
        self.lines = 0

    def draw(self, lines: Sequence[str]) -> None:
        columns = width(self.stream)
        out = []
        if self.lines:
            out.append(f"\x1b[{self.lines}F")  # to the start of the frame's first line
        out.append("\x1b[J")  # clear from there to the end of the screen
        # Lines wider than the terminal would wrap and throw the count off.
        out += [line[: columns - 1] + "\n" for line in lines]
        self.stream.write("".join(out))
        self.stream.flush()
        self.lines = len(lines)
