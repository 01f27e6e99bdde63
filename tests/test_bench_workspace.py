"""bench.common's workspace: a second Ctrl-C during its cleanup does not cut the cleanup
short (it used to leave the bench's temp dir, and in bench.chaos namespaces and a mount)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.common import shielded

REPO = Path(__file__).resolve().parents[1]

# The first KeyboardInterrupt comes from the body; the second SIGINT arrives while the
# cleanup stops ZooKeeper, as a Ctrl-C to the process group or `timeout -s INT` sends it.
SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from bench.common import workspace
    try:
        with workspace("ctrl-c-test") as ws:
            print(ws.root, flush=True)
            stop = ws.zk.stop

            def stop_with_a_second_ctrl_c(*args, **kwargs):
                os.kill(os.getpid(), signal.SIGINT)
                return stop(*args, **kwargs)

            ws.zk.stop = stop_with_a_second_ctrl_c
            os.kill(os.getpid(), signal.SIGINT)
            signal.pause()
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc}", flush=True)
        sys.exit(3)
""")


def test_a_second_ctrl_c_during_the_cleanup_still_removes_the_workspace() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert done.returncode == 3, done.stdout + done.stderr
    root = Path(lines[0])
    assert root.name.startswith("shardkeeper-bench-ctrl-c-test-")
    assert not root.exists(), f"{root} left behind"
    assert lines[1] == "interrupted: SIGINT during the cleanup"


def test_a_signal_held_by_the_shield_is_raised_after_the_block() -> None:
    ran = []
    with pytest.raises(KeyboardInterrupt, match="SIGTERM during the cleanup"), shielded():
        os.kill(os.getpid(), signal.SIGTERM)
        ran.append("after the signal")
    assert ran == ["after the signal"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
