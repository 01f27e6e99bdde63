"""Client threads doing puts, deletes and reads through the client library, recording
every operation as invoke / ok / fail / unknown (``checker.Op``).

Each thread has its own ZooKeeper session and ``DataClient``, a seeded random stream of
operations over a shared key space (so clients race on the same keys), and values that
are unique in the run (``c<thread>-<n>``), so that a value names its write. Threads are
paced to a target rate: the cluster under test shares two cores with them. One more
thread (``readers``) only reads: the others wait out a refused write (quorum loss refuses
them all) and read nothing meanwhile.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

from bench.chaos.checker import DELETE, FAIL, GET, OK, PUT, UNKNOWN, UNREADABLE, Op
from shardkeeper.client import DataClient, RequestError
from shardkeeper.layout import Paths
from shardkeeper.zk import ZkTarget, close, connect


@dataclass(frozen=True)
class WorkloadOptions:
    threads: int = 4  # mixed puts, deletes and reads
    readers: int = 1  # threads that only read: a write stalled by an outage (quorum loss
    # refuses every write for its whole length) does not hide whether reads go on
    keys: int = 240
    rate: float = 20.0  # operations per second per thread
    put: float = 0.5
    delete: float = 0.15  # the rest are reads
    deadline: float = 10.0  # the client library's retry budget per operation
    timeout: float = 2.0  # per request


def key_name(i: int) -> str:
    return f"chaos-{i:05d}"


class Worker(threading.Thread):
    def __init__(self, index: int, seed: int, target: ZkTarget, paths: Paths, token: str,
                 opts: WorkloadOptions, clock: float, reader: bool = False):
        super().__init__(name=f"{'reader' if reader else 'client'}-{index}", daemon=True)
        self.index = index
        self.reader = reader
        self.rng = random.Random(seed * 1_000_003 + index)
        self.target = target
        self.paths = paths
        self.token = token
        self.opts = opts
        self.clock = clock  # time.monotonic() at the run's start: ops are relative to it
        self.ops: list[Op] = []
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self._seq = 0

    def now(self) -> float:
        return time.monotonic() - self.clock

    def run(self) -> None:
        try:
            zk = connect(self.target, session_timeout=10.0)
        except BaseException as exc:  # noqa: BLE001 - reported by the run
            self.error = exc
            return
        try:
            kv = DataClient(zk, self.paths, self.token, timeout=self.opts.timeout,
                            deadline=self.opts.deadline)
            pause = 1.0 / self.opts.rate
            while not self.halt.is_set():
                began = time.monotonic()
                self.ops.append(self.one(kv))
                self.halt.wait(max(0.0, pause - (time.monotonic() - began)))  # pacing
        finally:
            close(zk)

    def one(self, kv: DataClient) -> Op:
        key = key_name(self.rng.randrange(self.opts.keys))
        roll = 1.0 if self.reader else self.rng.random()
        if roll < self.opts.put:
            self._seq += 1
            value = f"c{self.index}-{self._seq}"
            return self._write(PUT, key, value, lambda: kv.put(key.encode(), value.encode()))
        if roll < self.opts.put + self.opts.delete:
            return self._write(DELETE, key, None, lambda: kv.delete(key.encode()))
        invoke = self.now()
        try:
            found = kv.get(key.encode())
        except Exception as exc:  # noqa: BLE001 - a failed read changes nothing
            return Op(self.index, GET, key, None, invoke, self.now(), FAIL, _brief(exc))
        value = None if found is None else found.decode()
        return Op(self.index, GET, key, value, invoke, self.now(), OK)

    def _write(self, kind: str, key: str, value: str | None, call) -> Op:
        invoke = self.now()
        try:
            call()
        except RequestError as exc:  # 4xx: refused, nothing changed
            return Op(self.index, kind, key, value, invoke, self.now(), FAIL, _brief(exc))
        except Exception as exc:  # noqa: BLE001 - no answer: it may have been applied
            return Op(self.index, kind, key, value, invoke, self.now(), UNKNOWN, _brief(exc))
        return Op(self.index, kind, key, value, invoke, self.now(), OK)


def _brief(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:300] + "..."


class Workload:
    def __init__(self, seed: int, target: ZkTarget, paths: Paths, token: str,
                 opts: WorkloadOptions, clock: float):
        self.opts = opts
        self.workers = [Worker(i, seed, target, paths, token, opts, clock,
                               reader=i >= opts.threads)
                        for i in range(opts.threads + opts.readers)]

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def stop(self, timeout: float = 60.0) -> None:
        for w in self.workers:
            w.halt.set()
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.join(max(0.1, deadline - time.monotonic()))

    def ops(self) -> list[Op]:
        return sorted((op for w in self.workers for op in w.ops), key=lambda o: o.invoke)

    def errors(self) -> list[str]:
        return [f"{w.name}: {w.error!r}" for w in self.workers if w.error is not None]


def final_values(target: ZkTarget, paths: Paths, token: str, keys: int,
                 deadline: float = 30.0) -> dict[str, object]:
    """Every key's value after the run (None: absent; UNREADABLE if it could not be read)."""
    zk = connect(target, session_timeout=10.0)
    try:
        kv = DataClient(zk, paths, token, deadline=deadline)
        out: dict[str, object] = {}
        for i in range(keys):
            key = key_name(i)
            try:
                found = kv.get(key.encode())
            except Exception:  # noqa: BLE001 - reported as unreadable
                out[key] = UNREADABLE
                continue
            out[key] = None if found is None else found.decode()
        return out
    finally:
        close(zk)
