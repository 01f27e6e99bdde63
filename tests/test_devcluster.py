"""`shardkeeper dev`: a local cluster in the background, driven as a user would."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

from shardkeeper.dev.cluster import DevState, alive
from shardkeeper.dev.zkserver import free_port
from shardkeeper.process import cli_command


def sk(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout)


def test_dev_up_status_kill_down(tmp_path: Path) -> None:
    root = tmp_path / "dev"
    port = free_port()
    r = sk("dev", "up", "--dir", str(root), "--zk-port", str(port), "--agents", "3",
           "--shards", "16", "--replicas", "2", "--session-timeout", "1")
    try:
        assert r.returncode == 0, r.stderr
        assert f"ZooKeeper 127.0.0.1:{port}, 2 coordinators, 3 agents" in r.stdout
        state = DevState.load(root)
        assert all(alive(p.pid) for p in state.processes)

        again = sk("dev", "up", "--dir", str(root), "--zk-port", str(free_port()))
        assert again.returncode == 1 and "already running" in again.stderr

        listing = sk("dev", "status", "--dir", str(root)).stdout
        assert listing.count("running") == 6  # ZooKeeper, 2 coordinators, 3 agents
        # Every coordinator serves the status page; dev up and dev status say where.
        urls = [p["url"] for p in json.loads(
            sk("dev", "status", "--json", "--dir", str(root)).stdout)["processes"]
            if p["role"] == "coordinator"]
        assert len(urls) == 2 and all(u.startswith("http://127.0.0.1:") for u in urls)
        assert f"status page: {urls[0]} or {urls[1]}" in r.stdout
        assert all(f"status page {u}" in listing for u in urls)
        for url in urls:
            with urllib.request.urlopen(url + "api/status", timeout=10) as answer:
                assert len(json.load(answer)["members"]) == 3

        status = json.loads(sk("status", "--json", "--zk", state.zk).stdout)
        assert status["under_replicated"] == 0 and len(status["members"]) == 3

        killed = sk("dev", "kill", "agent-3", "--dir", str(root))
        assert killed.returncode == 0, killed.stderr
        assert "member znode gone" in killed.stdout and "fully replicated again" in killed.stdout
        status = json.loads(sk("status", "--json", "--zk", state.zk).stdout)
        states = {m["id"]: m["state"] for m in status["members"]}
        assert states == {"agent-1": "active", "agent-2": "active", "agent-3": "down"}
        assert status["under_replicated"] == 0
        assert [m["replicas"] for m in status["members"]] == [16, 16, 0]
        assert "agent-3" in sk("dev", "status", "--dir", str(root)).stdout

        # Back with its data, plus one more agent in a zone of its own.
        started = sk("dev", "start", "agent-3", "--dir", str(root))
        assert started.returncode == 0 and "started agent-3" in started.stdout, started.stderr
        assert sk("dev", "start", "agent-3", "--dir", str(root)).returncode == 1, "running"
        added = sk("dev", "add-agent", "--zone", "z9", "--weight", "2", "--dir", str(root))
        assert added.returncode == 0 and "agent-4 joined" in added.stdout, added.stderr
        listing = json.loads(sk("dev", "status", "--json", "--dir", str(root)).stdout)
        procs = {p["name"]: p for p in listing["processes"]}
        assert procs["agent-4"]["zone"] == "z9" and procs["agent-4"]["weight"] == 2
        assert all(p["running"] for p in procs.values())
        stable = sk("watch", "--until-stable", "--timeout", "60", "--zk", state.zk)
        assert stable.returncode == 0, stable.stderr
        status = json.loads(sk("status", "--json", "--zk", state.zk).stdout)
        assert [m["state"] for m in status["members"]] == ["active"] * 4
        assert status["under_replicated"] == 0
    finally:
        down = sk("dev", "down", "--dir", str(root))
    assert down.returncode == 0, down.stderr
    assert not any(alive(p.pid) for p in state.processes)
    assert not (root / "state.json").exists()
    gone = sk("dev", "status", "--dir", str(root))
    assert gone.returncode == 1 and "no dev cluster" in gone.stderr


def test_dev_up_refuses_a_busy_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = sk("dev", "up", "--dir", str(tmp_path / "dev"), "--zk-port", str(port))
    assert r.returncode == 1 and f"port {port} is in use" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "dev" / "state.json").exists()


def test_dev_up_with_credentials_keeps_them_out_of_ps(tmp_path: Path) -> None:
    root = tmp_path / "dev"
    secret = tmp_path / "zk-auth"
    secret.write_text("dev:hunter2-dev\n")
    r = sk("dev", "up", "--dir", str(root), "--zk-port", str(free_port()), "--agents", "1",
           "--coordinators", "1", "--shards", "4", "--replicas", "1", "--session-timeout", "1",
           "--zk-auth-file", str(secret))
    try:
        assert r.returncode == 0, r.stderr
        assert "grant access to ZooKeeper user dev only" in r.stdout
        state = DevState.load(root)
        for p in state.processes:
            with open(f"/proc/{p.pid}/cmdline", "rb") as f:
                assert b"hunter2" not in f.read(), p.name
        assert (root / "zk-auth").stat().st_mode & 0o077 == 0
        denied = sk("status", "--zk", state.zk)
        assert denied.returncode == 2 and "not authorised" in denied.stderr
        allowed = sk("status", "--json", "--zk", state.zk, "--zk-auth-file", str(secret))
        assert json.loads(allowed.stdout)["under_replicated"] == 0
        killed = sk("dev", "kill", "agent-1", "--dir", str(root), "--signal", "TERM",
                    "--no-wait")
        assert killed.returncode == 0, killed.stderr
    finally:
        down = sk("dev", "down", "--dir", str(root))
    assert down.returncode == 0, down.stderr
    assert not (root / "zk-auth").exists()


def test_dev_up_refuses_bad_options_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    for args, expected in [
        (["--dir", str(tmp_path / "file" / "dev")], "cannot create or write"),
        (["--cluster", "../x"], "invalid cluster name"),
        (["--zk-port", "99999"], "99999 is not in the range"),
        (["--zk", "127.0.0.1:notaport"], "'notaport' is not a number"),
    ]:
        r = sk("dev", "up", *args)
        assert r.returncode == 2 and expected in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
