"""What an agent process holds on its host: the lock on its data dir, and its data plane
on ``--listen`` (kept under the name HealthServer for `shardkeeper agent run`)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import TYPE_CHECKING

from shardkeeper.vocab import ShardkeeperError

if TYPE_CHECKING:
    from agents.runtime import Agent


class DataDirInUse(ShardkeeperError):
    pass


class DataDirLock:
    """An exclusive lock on a data dir, held for the agent's life: two agents on one data
    dir would overwrite each other's shards, and the trash is only edited offline."""

    def __init__(self, data_dir: Path):
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "agent.lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise DataDirInUse(f"data dir {data_dir} is in use by another agent (pid"
                               f" {holder}): stop it first") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class HealthServer:
    """The agent's data plane (client and replication API, and GET /healthz) on --listen,
    and the lock on its data dir.

    Kept under this name for `shardkeeper agent run`: it binds at construction (so a bad
    --listen fails before the agent registers) and serves once the agent knows the token.
    """

    def __init__(self, agent: Agent, host: str, port: int):
        self.agent = agent
        self.lock = DataDirLock(agent.stores.data_dir.parent)
        try:
            self.plane = agent.attach_plane(host, port)
        except OSError:
            self.lock.release()
            raise

    def start(self) -> None:
        self.plane.start()

    def stop(self) -> None:
        self.plane.stop()
        self.agent.stores.close_all()
        self.lock.release()
