"""`shardkeeper watch`: the cluster live, redrawn in place on a terminal, one line per
change otherwise (or one JSON object per change with --json)."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from typing import Any

import click

from shardkeeper import cluster as clusterstate
from shardkeeper.cli.follow import Follower, Snapshot
from shardkeeper.cli.options import FiniteFloatRange, operator_errors, zk_options, zk_session
from shardkeeper.cli.steer import DEFAULT_WAIT, brief
from shardkeeper.cli.term import Screen, exit_interrupted, interruptible, is_tty
from shardkeeper.cli.view import change_line, event_line, frame, state_key
from shardkeeper.layout import AuditEvent, Paths
from shardkeeper.summary import pending
from shardkeeper.vocab import ShardkeeperError
from shardkeeper.zk import ZkTarget

EVENTS_SHOWN = 5


class Printer:
    """Shows each snapshot: a redrawn frame on a terminal, lines or JSON otherwise."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.screen = Screen() if is_tty(sys.stdout) and not as_json else None
        self.events: list[AuditEvent] = []
        self.key: tuple[Any, ...] | None = None
        self.error = ""

    def show(self, snap: Snapshot, now: float) -> None:
        self.events = (self.events + snap.events)[-EVENTS_SHOWN:]
        s = snap.summary
        if self.screen is not None:
            if s is None:
                lines = [f"(cannot read the cluster: {snap.error})"]
            else:
                height = shutil.get_terminal_size((100, 40)).lines
                lines = frame(s, self.events, now, height=max(10, height - 2))
            self.screen.draw(lines + ["(Ctrl-C to quit)"])
            return
        if s is None:
            if snap.error != self.error:
                click.echo(f"{time.strftime('%H:%M:%S')} {snap.error}", err=True)
            self.error = snap.error
            return
        self.error = ""
        if self.as_json:
            if snap.events or state_key(s) != self.key:
                click.echo(json.dumps({
                    "time": snap.at, "stable": not pending(s), "pending": pending(s),
                    "status": s, "events": [e.to_json() for e in snap.events],
                }, sort_keys=True))
        else:
            for e in snap.events:
                click.echo(event_line(e))
            if state_key(s) != self.key:
                click.echo(change_line(s, snap.at))
        self.key = state_key(s)


@click.command()
@zk_options
@click.option("--until-stable", is_flag=True,
              help="Exit 0 once the cluster is fully replicated with nothing in flight;"
              " exit 1 at --timeout.")
@click.option("--timeout", type=FiniteFloatRange(min=0), default=None,
              help=f"Stop after this many seconds (with --until-stable: exit 1, default"
              f" {DEFAULT_WAIT:g}; without: exit 0, default: until Ctrl-C).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per change: time, stable, pending, status, events.")
@operator_errors
def watch(target: ZkTarget, paths: Paths, until_stable: bool, timeout: float | None,
          as_json: bool) -> None:
    """The cluster live: members (down ones too), replicas and primaries per member,
    copies in flight and a progress bar toward fully replicated, what is pending and
    why, and the latest events. Redrawn in place on a terminal; one line per change
    otherwise. Ctrl-C quits."""
    if until_stable and timeout is None:
        timeout = DEFAULT_WAIT
    t0 = time.monotonic()
    deadline = t0 + timeout if timeout else None
    wake = threading.Event()
    printer = Printer(as_json)
    last: dict[str, Any] | None = None
    with interruptible(wake) as stop, zk_session(target, paths) as client:
        clusterstate.read_config(client, paths)
        follower = Follower(client, paths, wake, first_events=EVENTS_SHOWN)
        try:
            for snap, fresh in follower.updates(stop, deadline):
                if not fresh and printer.screen is None:
                    continue  # lines and JSON change only with the cluster
                printer.show(snap, time.time())
                last = snap.summary or last
                if until_stable and snap.summary is not None and not pending(snap.summary):
                    break
        finally:
            follower.close()
    if stop.is_set():
        exit_interrupted()
    took = time.monotonic() - t0
    if until_stable and (last is None or pending(last)):
        reasons = pending(last) if last else ["the cluster could not be read"]
        raise ShardkeeperError(f"not stable after {timeout:g}s: {brief(reasons)}")
    if until_stable and not as_json:
        click.echo(f"stable: fully replicated, nothing in flight ({took:.1f}s)")


COMMANDS = (watch,)
