"""A throw-away CA with a server and a client certificate, made with the openssl CLI."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

# EC P-256 keys: fast to make, and read by both Python's ssl and ZooKeeper's PEM loader.
KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate: trusted by the server (clients) and the clients (server)
    server_pem: Path  # the server's certificate and PKCS#8 key in one file (its key store)
    client_cert: Path
    client_key: Path


def openssl(*args: str | Path, cwd: Path) -> None:
    r = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def issue(d: Path, name: str, subject: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost signed by the CA in ``d``."""
    openssl("req", *KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
            cwd=d)
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "extendedKeyUsage=serverAuth,clientAuth\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", "ext.cnf",
            cwd=d)
    return d / f"{name}.crt", d / f"{name}.key"


def make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", *KEY, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=shardkeeper test CA", cwd=d)
    server_crt, server_key = issue(d, "server", "/CN=localhost")
    client_crt, client_key = issue(d, "client", "/CN=shardkeeper")
    server_pem = d / "server.pem"
    server_pem.write_text(server_crt.read_text() + server_key.read_text())
    return Pki(d / "ca.pem", server_pem, client_crt, client_key)
