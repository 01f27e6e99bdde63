"""Run throw-away ZooKeeper servers on loopback: for `shardkeeper dev` and the test suite.

Debian's `zkServer.sh` wrapper is awkward to drive, so the server's main class is started
directly with a generated zoo.cfg. A short tickTime allows sub-second sessions
(ZooKeeper's minSessionTimeout is 2 x tickTime).

TLS (``ServerTls``): a secureClientPort next to the plain clientPort (which the readiness
probe keeps using), served by Netty with PEM key and trust stores (ZooKeeper >= 3.8).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from shardkeeper.vocab import ShardkeeperError

ZK_JAR = Path(os.environ.get("SHARDKEEPER_ZK_JAR", "/usr/share/java/zookeeper.jar"))
ZK_CONF_DIR = Path("/etc/zookeeper/conf")
MAIN_CLASS = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
# Debian's zookeeper.jar lists netty-handler in its Class-Path but not netty-codec, which
# Netty's TLS handler needs (every handshake fails with NoClassDefFoundError without it),
# nor netty-resolver: added for a TLS server when found next to the jar.
TLS_EXTRA_JARS = ("netty-codec.jar", "netty-resolver.jar")


class ZooKeeperNotInstalled(ShardkeeperError):
    pass


def find_zookeeper() -> tuple[str, Path]:
    """Return (java, jar), or explain how to install them."""
    java = shutil.which("java")
    if not ZK_JAR.exists():
        raise ZooKeeperNotInstalled(
            f"ZooKeeper is not installed ({ZK_JAR} is missing):"
            " run `apt-get install -y zookeeper` as root, or set SHARDKEEPER_ZK_JAR"
        )
    if java is None:
        raise ZooKeeperNotInstalled("java is not on PATH: ZooKeeper needs a Java runtime (17+)")
    return java, ZK_JAR


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def four_letter(host: str, port: int, word: str = "ruok", timeout: float = 1.0) -> str:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(word.encode())
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


@dataclass(frozen=True)
class ServerTls:
    """PEM files for a server's secureClientPort.

    ``keystore``: the server's certificate (chain) and its unencrypted PKCS#8 private key in
    one file; ``truststore``: the CA certificates that client certificates must chain to;
    ``client_auth``: need (ZooKeeper's default: a client certificate is required), want or
    none."""

    keystore: Path
    truststore: Path
    client_auth: str = "need"

    def config_lines(self, host: str, port: int) -> list[str]:
        return [
            f"secureClientPort={port}",
            f"secureClientPortAddress={host}",
            "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory",
            f"ssl.keyStore.location={self.keystore}",
            "ssl.keyStore.type=PEM",
            f"ssl.trustStore.location={self.truststore}",
            "ssl.trustStore.type=PEM",
            f"ssl.clientAuth={self.client_auth}",
        ]


@dataclass
class ZkServer:
    """One ZooKeeper server process (standalone, or one member of an ensemble)."""

    data_dir: Path
    client_port: int
    tick_ms: int = 250
    server_id: int = 0
    peers: list[tuple[int, int, int]] = field(default_factory=list)  # (id, peer, election)
    host: str = "127.0.0.1"
    process: subprocess.Popen | None = None
    tls: ServerTls | None = None
    secure_port: int = 0  # with tls: 0 picks a free port at start

    @property
    def address(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def secure_address(self) -> str:
        return f"{self.host}:{self.secure_port}"

    def write_config(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"tickTime={self.tick_ms}",
            f"dataDir={self.data_dir}",
            f"clientPort={self.client_port}",
            f"clientPortAddress={self.host}",
            "initLimit=20",
            "syncLimit=10",
            "maxClientCnxns=0",
            f"minSessionTimeout={2 * self.tick_ms}",
            "maxSessionTimeout=60000",
            "admin.enableServer=false",
            "4lw.commands.whitelist=*",
            "autopurge.purgeInterval=0",
        ]
        if self.tls is not None:
            self.secure_port = self.secure_port or free_port(self.host)
            lines += self.tls.config_lines(self.host, self.secure_port)
        if self.peers:
            (self.data_dir / "myid").write_text(f"{self.server_id}\n")
            lines += [f"server.{i}={self.host}:{p}:{e}" for i, p, e in self.peers]
        cfg = self.data_dir / "zoo.cfg"
        cfg.write_text("\n".join(lines) + "\n")
        return cfg

    def start(self, detach: bool = False) -> None:
        java, jar = find_zookeeper()
        cfg = self.write_config()
        log = open(self.data_dir / "zookeeper.log", "ab")  # noqa: SIM115 - owned by the child
        env = dict(os.environ, JVMFLAGS="-Xmx256m")
        classpath = [str(ZK_CONF_DIR), str(jar)]
        if self.tls is not None:
            classpath += [str(p) for p in (jar.parent / j for j in TLS_EXTRA_JARS) if p.exists()]
        self.process = subprocess.Popen(
            [java, "-Xmx256m", "-Dzookeeper.log.dir=" + str(self.data_dir),
             "-cp", ":".join(classpath), MAIN_CLASS, str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=detach,
        )
        log.close()

    def ok(self) -> bool:
        try:
            return four_letter(self.host, self.client_port, "ruok") == "imok" and (
                "Mode:" in four_letter(self.host, self.client_port, "srvr")
                and "not currently serving" not in four_letter(self.host, self.client_port, "srvr")
            )
        except OSError:
            return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ok():
                return
            if self.process is not None and self.process.poll() is not None:
                tail = (self.data_dir / "zookeeper.log").read_text(errors="replace")[-2000:]
                raise ShardkeeperError(f"ZooKeeper exited with {self.process.returncode}:\n{tail}")
            time.sleep(0.1)
        raise ShardkeeperError(f"ZooKeeper at {self.address} not serving after {timeout:g}s")

    def send(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def standalone(data_dir: Path, tick_ms: int = 250, port: int | None = None) -> ZkServer:
    return ZkServer(data_dir=data_dir, client_port=port or free_port(), tick_ms=tick_ms)


def ensemble(base_dir: Path, size: int = 3, tick_ms: int = 250) -> list[ZkServer]:
    peers = [(i, free_port(), free_port()) for i in range(1, size + 1)]
    return [
        ZkServer(
            data_dir=base_dir / f"zk{i}",
            client_port=free_port(),
            tick_ms=tick_ms,
            server_id=i,
            peers=peers,
        )
        for i, _, _ in peers
    ]


def connect_string(servers: list[ZkServer]) -> str:
    return ",".join(s.address for s in servers)
