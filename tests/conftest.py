"""Fixtures: a real ZooKeeper 3.8 (standalone and a 3-server ensemble) on loopback ports."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardkeeper.dev.zkserver import ZkServer, connect_string, ensemble, standalone
from tests.harness import Cluster


@contextlib.contextmanager
def running(server: ZkServer) -> Iterator[ZkServer]:
    """``server`` started and serving; stopped on exit."""
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def zk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZkServer]:
    """One standalone server for the session; tickTime 250 ms allows 0.5 s sessions."""
    with running(standalone(tmp_path_factory.mktemp("zk"), tick_ms=250)) as server:
        yield server


@pytest.fixture()
def zk_ensemble(tmp_path: Path) -> Iterator[list[ZkServer]]:
    """A fresh 3-server ensemble, for tests that kill ZooKeeper servers."""
    servers = ensemble(tmp_path / "ensemble", size=3, tick_ms=250)
    for s in servers:
        s.start()
    try:
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


FAILED = pytest.StashKey[bool]()


def finish(c: Cluster, request: pytest.FixtureRequest) -> None:
    """Stop the test's processes; when it failed, show the tail of each one's log."""
    c.close()
    if request.node.stash.get(FAILED, False):
        for name, proc in c.procs.items():
            print(f"\n----- {name} (last lines) -----\n" + "\n".join(
                proc.output().splitlines()[-40:]))


@pytest.fixture()
def cluster(zk_server: ZkServer, tmp_path: Path, request: pytest.FixtureRequest
            ) -> Iterator[Cluster]:
    """A uniquely named cluster on the shared server; its processes die with the test."""
    c = Cluster(zk_server.address, tmp_path)
    try:
        yield c
    finally:
        finish(c, request)


@pytest.fixture()
def ensemble_cluster(zk_ensemble: list[ZkServer], tmp_path: Path,
                     request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(connect_string(zk_ensemble), tmp_path)
    try:
        yield c
    finally:
        finish(c, request)
