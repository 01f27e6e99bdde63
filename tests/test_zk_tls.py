"""ZooKeeper over TLS: a server with a secureClientPort and a certificate this test makes;
the roles and the CLI connect to it with --zk-tls-*; refused handshakes are clear errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from shardkeeper.cli import main
from shardkeeper.dev.zkserver import ServerTls, ZkServer, free_port
from shardkeeper.poll import poll_until
from shardkeeper.zk import Tls, ZkTarget, ZkUnavailable, close, connect
from tests.conftest import finish, running
from tests.harness import Cluster
from tests.pki import Pki, make_pki


@pytest.fixture(scope="module")
def tls_zk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ZkServer, Pki]]:
    base = tmp_path_factory.mktemp("tls")
    pki = make_pki(base / "pki")
    server = ZkServer(data_dir=base / "zk", client_port=free_port(),
                      tls=ServerTls(keystore=pki.server_pem, truststore=pki.ca))
    with running(server):
        yield server, pki


def tls_target(server: ZkServer, pki: Pki, **changes: Path | None) -> ZkTarget:
    files = {"ca": pki.ca, "cert": pki.client_cert, "key": pki.client_key, **changes}
    return ZkTarget.parse(server.secure_address, tls=Tls(**files))


def test_roles_and_cli_work_over_tls(tls_zk: tuple[ZkServer, Pki], tmp_path: Path,
                                     request: pytest.FixtureRequest) -> None:
    server, pki = tls_zk
    c = Cluster(tls_target(server, pki), tmp_path)
    try:
        c.init(4, 1)
        c.start_coordinator("coord-1")
        c.start_agent("agent-1")
        poll_until(lambda: c.settled({"agent-1"}), 30, "the agent to hold its plan over TLS")
        status = json.loads(c.cli("status", "--json").stdout)
        assert status["leader"] == "coord-1" and [m["id"] for m in status["members"]] == [
            "agent-1"]
        assert c.cli("put", "k", "over-tls").returncode == 0
        assert c.cli("get", "k").stdout == "over-tls\n"
    finally:
        finish(c, request)


@pytest.mark.parametrize(("case", "reason"), [
    ("no client certificate", "SSL"),
    ("a CA that did not sign the server", "CERTIFICATE_VERIFY_FAILED"),
    ("plain TCP to the secure port", "Connection"),
])
def test_refused_handshakes_say_why(tls_zk: tuple[ZkServer, Pki], tmp_path: Path, case: str,
                                    reason: str) -> None:
    server, pki = tls_zk
    if case == "no client certificate":
        target = tls_target(server, pki, cert=None, key=None)
    elif case == "a CA that did not sign the server":
        target = tls_target(server, pki, ca=make_pki(tmp_path / "rogue").ca)
    else:
        target = ZkTarget.parse(server.secure_address)
    with pytest.raises(ZkUnavailable) as e:
        close(connect(target, connect_timeout=1.0))
    message = str(e.value)
    assert message.startswith(f"cannot reach ZooKeeper at {server.secure_address}")
    assert "last error" in message and reason in message, message


def test_bad_tls_files_are_refused_before_connecting(tls_zk: tuple[ZkServer, Pki],
                                                     tmp_path: Path) -> None:
    server, pki = tls_zk
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    zk = ["--zk", server.secure_address]
    for args, expected in [
        (["--zk-tls-cert", str(pki.client_cert)], "--zk-tls-cert and --zk-tls-key together"),
        (["--zk-tls-cert", str(pki.client_cert), "--zk-tls-key", str(pki.ca)],
         "cannot load the TLS client certificate"),
        (["--zk-tls-ca", str(garbage)], "cannot load CA certificates"),
    ]:
        r = CliRunner().invoke(main, ["status", *zk, *args])
        assert r.exit_code == 2, r.output
        assert r.output.count("\n") == 1 and expected in r.output, r.output
        assert r.exception is None or isinstance(r.exception, SystemExit)
