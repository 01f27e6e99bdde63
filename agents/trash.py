"""The agent's trash: shard files a plan dropped are kept for a while, not deleted.

A plan can be wrong (a bug, a damaged znode, an operator's mistake); when it drops the
only copy of a shard, deleting the files would make that final. So a dropped replica's
store is moved (a rename, on the same filesystem: instant) into ``<data-dir>/trash`` and
kept for ``keep_seconds`` (24 h by default), then purged. `shardkeeper agent trash
list|restore|purge` works on it while the agent is stopped.

Each entry is a directory ``<unix-ms>-shard-<n>`` holding the store's files and
``entry.json`` (shard, time, reason, bytes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_KEEP_SECONDS = 24 * 3600
ENTRY_META = "entry.json"


class TrashError(Exception):
    """A trash operation cannot be done; the message says why."""


@dataclass(frozen=True)
class TrashEntry:
    name: str
    shard: int
    time: float
    reason: str
    bytes: int


class Trash:
    def __init__(self, root: str | os.PathLike[str], keep_seconds: float = DEFAULT_KEEP_SECONDS):
        self.root = Path(root)
        self.keep_seconds = keep_seconds

    def keep(self, shard: int, files: list[Path], reason: str, now: float | None = None
             ) -> TrashEntry | None:
        """Move ``files`` (those that exist) into a new entry; None if there were none."""
        present = [f for f in files if f.exists()]
        if not present:
            return None
        if self.keep_seconds <= 0:
            for f in present:
                f.unlink(missing_ok=True)
            return None
        now = time.time() if now is None else now
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"{int(now * 1000):013d}-shard-{shard:06d}"
        entry = self.root / name
        suffix = 0
        while entry.exists():  # two drops of one shard in the same millisecond
            suffix += 1
            entry = self.root / f"{name}.{suffix}"
        entry.mkdir()
        size = 0
        for f in present:
            size += f.stat().st_size
            os.replace(f, entry / f.name)
        meta = {"shard": shard, "time": now, "reason": reason, "bytes": size}
        (entry / ENTRY_META).write_text(json.dumps(meta))
        log.info("shard %d: kept in %s (%d bytes) for %gs: %s", shard, entry, size,
                 self.keep_seconds, reason)
        return TrashEntry(entry.name, shard, now, reason, size)

    def entries(self) -> list[TrashEntry]:
        """Every entry, oldest first; an unreadable entry.json is listed with shard -1."""
        if not self.root.is_dir():
            return []
        out = []
        for entry in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                meta = json.loads((entry / ENTRY_META).read_text())
                out.append(TrashEntry(entry.name, int(meta["shard"]), float(meta["time"]),
                                      str(meta.get("reason", "")), int(meta.get("bytes", 0))))
            except (OSError, ValueError, KeyError, TypeError):
                size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
                out.append(TrashEntry(entry.name, -1, entry.stat().st_mtime, "unreadable entry",
                                      size))
        return out

    def purge(self, older_than: float | None = None, now: float | None = None) -> list[str]:
        """Delete entries older than ``older_than`` seconds (default: the keep time)."""
        now = time.time() if now is None else now
        limit = self.keep_seconds if older_than is None else older_than
        gone = []
        for e in self.entries():
            if now - e.time >= limit:
                shutil.rmtree(self.root / e.name, ignore_errors=True)
                gone.append(e.name)
        return gone

    def restore(self, name: str, target: Path) -> TrashEntry:
        """Move the entry's store file back to ``target`` (the shard's store path)."""
        entry = next((e for e in self.entries() if e.name == name), None)
        if entry is None:
            raise TrashError(f"no trash entry {name!r}: see `shardkeeper agent trash list`")
        if target.exists():
            raise TrashError(f"{target} exists: the agent holds shard {entry.shard} again;"
                             " move that file away first if you mean to replace it")
        folder = self.root / name
        for f in folder.iterdir():
            if f.name != ENTRY_META and f.name.startswith(target.name):
                os.replace(f, target.parent / f.name)
        shutil.rmtree(folder, ignore_errors=True)
        return entry
