"""Issue 10's rotation without downtime, end to end: real ZooKeeper, a coordinator and agent
processes at R=3 (every write is forwarded with the peer token), a client writing all the
time; `shardkeeper token rotate begin/switch/finish` for the token, then the peer token.
No write fails, every acknowledged one is readable, the old tokens are refused after."""

from __future__ import annotations

import re
import secrets

from shardkeeper.client import DataClient
from shardkeeper.cluster import read_members
from shardkeeper.peer import PeerClient
from shardkeeper.poll import poll_until
from shardkeeper.token import fingerprint, read_peer_token, read_token
from shardkeeper.wire import key_path
from tests.test_data_e2e import SESSION, Writer, assert_all_readable, cli_ok, start

AGENTS = ("agent-1", "agent-2", "agent-3")


def refused(cluster, *args: str) -> str:
    """A step out of order: exit 2, one line, no traceback."""
    r = cluster.cli(*args)
    assert r.returncode == 2, f"{args}: {r.stdout}\n{r.stderr}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def test_both_tokens_rotate_under_a_write_load_with_no_failed_write(cluster) -> None:
    kv = start(cluster, agents=AGENTS, shards=8, replicas=3)
    old_client = read_token(cluster.client, cluster.paths)
    old_peer = read_peer_token(cluster.client, cluster.paths)
    addresses = list(kv.routing().addresses.values())
    assert len(addresses) == 3
    # Out of order before any rotation.
    for step in ("switch", "finish"):
        assert "no rotation of the token is under way" in refused(
            cluster, "token", "rotate", step)
    writer = Writer(kv, "rot-")
    writer.start()
    try:
        writer.wait_acks(50)
        for peer in ((), ("--peer",)):
            name = "peer token" if peer else "token"
            out = cli_ok(cluster, "token", "rotate", "begin", *peer)
            assert "every live agent accepts" in out
            assert "a rotation of the " + name + " is under way (begun)" in refused(
                cluster, "token", "rotate", "begin", *peer)
            assert "its next step is `shardkeeper token rotate switch" in refused(
                cluster, "token", "rotate", "finish", *peer)
            writer.wait_acks(len(writer.acked) + 30)
            assert "every live agent sends" in cli_ok(cluster, "token", "rotate", "switch", *peer)
            assert "(switched)" in refused(cluster, "token", "rotate", "switch", *peer)
            writer.wait_acks(len(writer.acked) + 30)
            assert "rotated" in cli_ok(cluster, "token", "rotate", "finish", *peer)
            writer.wait_acks(len(writer.acked) + 30)
    finally:
        writer.stop()
    assert writer.failed == 0, f"{writer.failed} writes failed during the rotation"
    assert len(writer.acked) >= 200
    assert_all_readable(kv, writer.acked)
    new_client = read_token(cluster.client, cluster.paths)
    new_peer = read_peer_token(cluster.client, cluster.paths)
    assert new_client not in (old_client, old_peer) and new_peer not in (old_client, old_peer)
    assert kv.token == new_client, "the client followed the token znode"
    # The old tokens are refused by every agent; the new ones work.
    some_key = key_path(0, b"k")  # refused at admission, whichever shard holds it
    for address in addresses:
        for old in (old_client, old_peer):
            client = PeerClient(old, attempts=1)
            assert client.call(address, "GET", "/v1/auth").status == 401
            assert client.call(address, "GET", some_key).status == 401
        for token, kind in ((new_client, "client"), (new_peer, "peer")):
            reply = PeerClient(token, attempts=1).call(address, "GET", "/v1/auth")
            assert (reply.status, reply.body) == (200, {"credential": kind, "current": True})
    # `token status`: counts and fingerprints, never a token.
    status = cli_ok(cluster, "token", "status")
    assert f"token:       1 accepted: {fingerprint(new_client)} (sent)" in status
    assert f"peer token:  1 accepted: {fingerprint(new_peer)} (sent)" in status
    for secret in (old_client, old_peer, new_client, new_peer):
        assert secret not in status
    # Each agent logged each switch with counts, never a token.
    for name in AGENTS:
        log = cluster.procs[name].output()
        assert re.search(r"tokens changed: accepting 2 client token\(s\) and 1 peer", log)
        assert "accepting 1 client token(s) and 1 peer token(s)" in log
        for secret in (new_client, new_peer):
            assert secret not in log
    # The leader's liveness check followed the peer token (agents' links send the new one).
    coordinator = cluster.procs["coord-1"].output()
    assert "liveness: accepting 2 peer token(s)" in coordinator
    assert "liveness: accepting 1 peer token(s)" in coordinator
    # The cluster is still whole: a write and a read after it all.
    kv.put(b"after", b"1")
    assert kv.get(b"after") == b"1"


def test_a_step_waits_for_an_agent_that_does_not_follow_names_it_and_can_be_aborted(
    cluster,
) -> None:
    """An agent whose token comes from SHARDKEEPER_TOKEN does not follow the znode: `begin`
    times out naming it, and `switch` refuses to write while it lags; `abort` drops the new
    token (every agent still sends the old one) and ends the rotation."""
    cluster.init(2, 2)
    token = read_token(cluster.client, cluster.paths)
    cluster.start_coordinator("coord-1")
    cluster.start_agent("agent-1")
    cluster.start_agent("agent-2", env={"SHARDKEEPER_TOKEN": token})
    poll_until(lambda: cluster.settled({"agent-1", "agent-2"}), 30, "convergence")
    r = cluster.cli("token", "rotate", "begin", "--timeout", "2")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == ("Error: timed out after 2s: agents that do not accept the new"
                                " token: agent-2 (answers 401)")
    before = cluster.client.get(cluster.paths.token)[0]
    r = cluster.cli("token", "rotate", "switch", "--timeout", "1")
    assert r.returncode == 1 and "agent-2 (answers 401)" in r.stderr
    assert cluster.client.get(cluster.paths.token)[0] == before, "switch wrote nothing"
    assert "rotation begun, next: `shardkeeper token rotate switch`" in cli_ok(
        cluster, "token", "status")
    listed = before.decode().split()
    assert listed[0] == token and len(listed) == 2
    new = listed[1]
    address = read_members(cluster.client, cluster.paths)["agent-1"].address
    assert PeerClient(new, attempts=1).call(address, "GET", "/v1/auth").status == 200
    out = cli_ok(cluster, "token", "rotate", "abort", "--timeout", "5")
    assert f"aborted: {fingerprint(token)} alone is accepted" in out
    assert read_token(cluster.client, cluster.paths) == token
    assert "rotation" not in cli_ok(cluster, "token", "status")
    poll_until(lambda: PeerClient(new, attempts=1).call(address, "GET", "/v1/auth").status
               == 401, 10, "agent-1 to refuse the dropped token")


def test_a_rotation_aborted_after_switch_goes_back_to_the_old_token_with_no_failed_write(
    cluster,
) -> None:
    """`abort` after `switch` of the peer token (every forward carries it): the agents send
    the old one again, then the new one is dropped; no write fails on the way."""
    kv = start(cluster, agents=AGENTS, shards=8, replicas=3)
    old_peer = read_peer_token(cluster.client, cluster.paths)
    addresses = list(kv.routing().addresses.values())
    assert "nothing to abort" in refused(cluster, "token", "rotate", "abort", "--peer")
    writer = Writer(kv, "abort-")
    writer.start()
    try:
        writer.wait_acks(50)
        cli_ok(cluster, "token", "rotate", "begin", "--peer")
        cli_ok(cluster, "token", "rotate", "switch", "--peer")
        new_peer = read_peer_token(cluster.client, cluster.paths)
        assert new_peer != old_peer
        writer.wait_acks(len(writer.acked) + 30)
        out = cli_ok(cluster, "token", "rotate", "abort", "--peer")
        assert f"peer token {fingerprint(old_peer)} is sent again" in out
        assert f"aborted: {fingerprint(old_peer)} alone is accepted" in out
        writer.wait_acks(len(writer.acked) + 30)
    finally:
        writer.stop()
    assert writer.failed == 0, f"{writer.failed} writes failed during the abort"
    assert_all_readable(kv, writer.acked)
    assert read_peer_token(cluster.client, cluster.paths) == old_peer
    assert not cluster.client.exists(cluster.paths.rotation(cluster.paths.peer_token))
    for address in addresses:
        assert PeerClient(new_peer, attempts=1).call(address, "GET", "/v1/auth").status == 401
        reply = PeerClient(old_peer, attempts=1).call(address, "GET", "/v1/auth")
        assert (reply.status, reply.body) == (200, {"credential": "peer", "current": True})
    assert "nothing to abort" in refused(cluster, "token", "rotate", "abort", "--peer")
    kv.put(b"after", b"1")
    assert kv.get(b"after") == b"1"


def test_tokens_set_by_environment_rotate_by_rolling_restarts_with_no_failed_write(
    cluster,
) -> None:
    """Hosts that take both tokens from SHARDKEEPER_TOKEN and SHARDKEEPER_PEER_TOKEN do not
    follow the znodes; security.md's procedure for them: the same three lists through the
    variables (`old new`, `new old`, `new`), each step a rolling restart of every host
    (coordinators too: the leader checks the peer token of every agent's liveness link)
    that reaches every one before the next. Under a write load at R=3, nothing fails."""
    cluster.init(8, 3)
    old = {"client": secrets.token_urlsafe(32), "peer": secrets.token_urlsafe(32)}
    new = {"client": secrets.token_urlsafe(32), "peer": secrets.token_urlsafe(32)}

    def env(client: list[str], peer: list[str]) -> dict[str, str]:
        return {"SHARDKEEPER_TOKEN": " ".join(client), "SHARDKEEPER_PEER_TOKEN": " ".join(peer)}

    first = env([old["client"]], [old["peer"]])
    coordinators = ("coord-1", "coord-2")
    for name in coordinators:
        cluster.start_coordinator(name, session_timeout=SESSION, env=first)
    for name in AGENTS:
        cluster.start_agent(name, session_timeout=SESSION, env=first)
    everyone = set(AGENTS)
    poll_until(lambda: cluster.settled(everyone), 30, "initial convergence")
    kv = DataClient(cluster.client, cluster.paths, token=old["client"], deadline=20.0)
    writer = Writer(kv, "env-")
    writer.start()
    try:
        writer.wait_acks(50)
        steps = [env([old["client"], new["client"]], [old["peer"], new["peer"]]),
                 env([new["client"], old["client"]], [new["peer"], old["peer"]]),
                 env([new["client"]], [new["peer"]])]
        for step, variables in enumerate(steps, 1):
            for name in coordinators:
                assert cluster.procs[name].term(timeout=30) == 0
                cluster.start_coordinator(name, session_timeout=SESSION, env=variables)
                poll_until(lambda: cluster.settled(everyone), 30, f"step {step}: {name} back")
            for name in AGENTS:
                assert cluster.procs[name].term(timeout=30) == 0
                cluster.start_agent(name, session_timeout=SESSION, env=variables)
                poll_until(lambda: cluster.settled(everyone), 30, f"step {step}: {name} back")
            writer.wait_acks(len(writer.acked) + 20)
            if step == 1:  # every host accepts the new token: the client may send it
                kv._use_token(new["client"])
    finally:
        writer.stop()
    assert writer.failed == 0, f"{writer.failed} writes failed during the rotation"
    assert len(writer.acked) >= 100
    assert_all_readable(kv, writer.acked)
    for address in list(kv.routing().addresses.values()):
        for token in old.values():
            assert PeerClient(token, attempts=1).call(address, "GET", "/v1/auth").status == 401
        for kind, token in new.items():
            reply = PeerClient(token, attempts=1).call(address, "GET", "/v1/auth")
            assert (reply.status, reply.body) == (200, {"credential": kind, "current": True})
    # The leaders took every agent's liveness link all along (a coordinator left out of the
    # rotation refuses them, and logs it: crashes would be seen only at session expiry).
    for name in coordinators:
        assert "refused a link" not in cluster.procs[name].output(), name
