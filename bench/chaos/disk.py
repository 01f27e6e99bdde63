"""A small filesystem of its own under one agent's data dir, to fill and free.

A ``tmpfs`` of a fixed size is mounted on the agent's data dir before the agent starts;
the nemesis fills it with one file (every byte left, so the next SQLite write, WAL growth
or copied image fails with "database or disk is full") and deletes that file when the
fault ends. The agent itself is never told.

Mount points live under the run's own temp dir, whose name carries the owning process id
(``shardkeeper-chaos-<pid>-...``), so that :func:`sweep` can unmount what a dead run left.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path

ROOT_PATTERN = re.compile(r"/shardkeeper-chaos-(\d+)-")
FILLER = "filler.bin"


class DiskError(Exception):
    pass


def mount_tmpfs(path: Path, size_mb: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)],
        capture_output=True, text=True, timeout=30,
    )
    if done.returncode != 0:
        raise DiskError(f"mount tmpfs on {path}: {done.stderr.strip()}")


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path) -> int:
    """Take every free byte of the filesystem at ``path``; returns how many were taken."""
    filler = path / FILLER
    taken = 0
    chunk = b"\0" * (1 << 20)
    with open(filler, "ab", buffering=0) as f:
        while True:
            try:
                taken += f.write(chunk)
            except OSError:
                break
        # The last partial chunk: byte by byte is too slow, halve until nothing fits.
        size = len(chunk) // 2
        while size:
            try:
                taken += f.write(chunk[:size])
            except OSError:
                size //= 2
    return taken


def release(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (path / FILLER).unlink()


def mounted_tmpfs() -> list[str]:
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "tmpfs":
                out.append(parts[1])
    return out


def sweep() -> list[str]:
    """Unmount the tmpfs left by runs whose process is gone; returns the mount points."""
    gone = []
    for point in mounted_tmpfs():
        m = ROOT_PATTERN.search(point)
        if not m or int(m.group(1)) == os.getpid():
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue  # a live run's
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        unmount(Path(point))
        gone.append(point)
    return gone
