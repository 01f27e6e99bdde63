"""ZooKeeper digest credentials and ACLs, on a ZooKeeper of this module's own (so that the
first cluster created with credentials also creates the shared /shardkeeper parent)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from kazoo.exceptions import NoAuthError
from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl

from shardkeeper.cli import main
from shardkeeper.client import DataClient
from shardkeeper.dev.zkserver import ZkServer, standalone
from shardkeeper.layout import ROOT
from shardkeeper.poll import poll_until
from shardkeeper.zk import PARENT_ACL, Credential, ZkTarget, close, connect, walk
from tests.conftest import finish, running
from tests.harness import Cluster, RoleProcess

ALICE = Credential("alice", "al1ce-s3cret")
BOB = Credential("bob", "b0b-s3cret")


@pytest.fixture(scope="module")
def fresh_zk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZkServer]:
    with running(standalone(tmp_path_factory.mktemp("zkauth"))) as server:
        yield server


@pytest.fixture()
def secured(fresh_zk: ZkServer, tmp_path: Path, request: pytest.FixtureRequest
            ) -> Iterator[Cluster]:
    """A cluster initialised with ALICE's credentials."""
    c = Cluster(ZkTarget.parse(fresh_zk.address, (ALICE,)), tmp_path)
    try:
        yield c
    finally:
        finish(c, request)


def invoke(c: Cluster, *args: str, credentials: tuple[Credential, ...] = ()):
    """The CLI in this process (fast: many commands below), with ``credentials``."""
    env = {"SHARDKEEPER_ZK_AUTH": "\n".join(f"{x.user}:{x.password}" for x in credentials)
           or None}
    return CliRunner().invoke(main, [*args, "--zk", c.hosts, "--cluster", c.name], env=env)


def test_init_with_credentials_closes_every_znode_to_others(secured: Cluster) -> None:
    c = secured
    c.init(4, 1)
    c.start_coordinator("coord-1")
    c.start_agent("agent-1")
    poll_until(lambda: c.settled({"agent-1"}), 20, "the agent to hold its plan")
    assert c.cli("put", "k", "v").returncode == 0 and c.cli("get", "k").stdout == "v\n"
    # Every znode, whoever created it (init, the leader's plan, epoch, events and election,
    # the agent's ephemeral member and status), grants alice alone.
    paths = list(walk(c.client, c.paths.root))
    assert {c.paths.token, c.paths.member("agent-1"), c.paths.agent_status("agent-1"),
            c.paths.epoch, c.paths.plan_meta} <= set(paths)
    assert any(p.startswith(c.paths.events + "/") for p in paths)
    assert any(p.startswith(c.paths.election + "/") for p in paths)
    for path in paths:
        assert c.client.get_acls(path)[0] == [make_digest_acl("alice", "al1ce-s3cret", all=True)]
    # The shared parent: anyone may create a cluster there, nobody may take it over.
    assert c.client.get_acls(ROOT)[0] == list(PARENT_ACL)
    # Without the credentials, or with others, nothing below the root is readable or
    # writable: the data-plane token least of all.
    for creds in ((), (BOB,), (Credential("alice", "wrong"),)):
        other = connect(ZkTarget.parse(c.hosts, creds))
        try:
            for attempt in (lambda o=other: o.get(c.paths.token),
                            lambda o=other: o.get_children(c.paths.root),
                            lambda o=other: o.set(c.paths.config, b"{}"),
                            lambda o=other: o.create(f"{c.paths.root}/intruder"),
                            lambda o=other: o.delete(c.paths.maintenance),
                            lambda o=other: o.set_acls(c.paths.token, OPEN_ACL_UNSAFE)):
                with pytest.raises(NoAuthError):
                    attempt()
        finally:
            close(other)


def test_other_clusters_share_the_parent(secured: Cluster, tmp_path: Path) -> None:
    secured.init(4, 1)
    anyone = Cluster(secured.hosts, tmp_path)
    bobs = Cluster(ZkTarget.parse(secured.hosts, (BOB,)), tmp_path)
    try:
        for other in (anyone, bobs):
            other.init(2, 1)
            assert json.loads(other.cli("status", "--json").stdout)["shards"] == 2
        with pytest.raises(NoAuthError):
            bobs.client.get(secured.paths.token)
        with pytest.raises(NoAuthError):
            anyone.client.set_acls(ROOT, OPEN_ACL_UNSAFE)
    finally:
        anyone.close()
        bobs.close()


COMMANDS = [["status"], ["shards"], ["config", "show"], ["config", "set", "rebalance_delay=5"],
            ["drain", "a"], ["undrain", "a"], ["pause"], ["resume"], ["rebalance"],
            ["move", "0", "--from", "a", "--to", "b"], ["events"], ["put", "k", "v"],
            ["get", "k"], ["delete", "k"], ["verify"], ["acl", "show"],
            ["init", "--shards", "4", "--replicas", "1", "--force"]]


def test_every_command_without_the_right_credentials_is_one_line(secured: Cluster) -> None:
    secured.init(4, 1)
    for creds, expected in [((), "pass --zk-auth"), ((BOB,), "with the credentials given")]:
        for command in COMMANDS:
            r = invoke(secured, *command, credentials=creds)
            assert r.exit_code == 2, (command, r.output)
            assert r.output.startswith("Error: not authorised") and expected in r.output
            assert r.output.count("\n") == 1, r.output
    # Nothing changed: alice still reads the config as init wrote it.
    shown = invoke(secured, "config", "show", "--json", credentials=(ALICE,))
    assert shown.exit_code == 0 and json.loads(shown.output)["rebalance_delay"] == 0


def retry_times(proc: RoleProcess) -> list[datetime]:
    return [datetime.strptime(m, "%H:%M:%S.%f") for m in re.findall(
        r"^(\d\d:\d\d:\d\d\.\d{3}) \w+ .*not authorised", proc.output(), re.MULTILINE)]


def test_roles_without_credentials_log_it_and_retry_with_backoff(secured: Cluster) -> None:
    secured.init(4, 1)
    intruders = secured.as_user()
    roles = [intruders.start_coordinator("coord-x"), intruders.start_agent("agent-x")]
    for proc in roles:
        poll_until(lambda p=proc: len(retry_times(p)) >= 4, 20,
                   f"{proc.name} to report the refusal a few times")
    for proc in roles:
        assert proc.alive(), proc.output()
        assert "Traceback" not in proc.output()
        assert "pass --zk-auth" in proc.output()
        times = retry_times(proc)
        gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]
        assert min(gaps) >= 0.15, f"{proc.name} retries too fast: {gaps}"
    assert not secured.members()


def test_auth_file_and_env_forms(secured: Cluster, tmp_path: Path) -> None:
    secured.init(4, 1)
    both = tmp_path / "zk-auth"
    both.write_text(f"{BOB.user}:{BOB.password}\n{ALICE.user}:{ALICE.password}\n")
    r = CliRunner().invoke(main, ["status", "--zk", secured.hosts, "--cluster", secured.name,
                                  "--zk-auth-file", str(both), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["shards"] == 4
    assert invoke(secured, "status", credentials=(BOB, ALICE)).exit_code == 0
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for args in (["--zk-auth-file", str(empty)], ["--zk-auth-file", str(tmp_path / "none")],
                 ["--zk-auth", "alice"], ["--zk-auth", ":hunter2"], ["--zk-auth", "a:b c"],
                 ["--zk-auth", "al\u00efce:hunter2"]):
        r = CliRunner().invoke(main, ["status", "--zk", secured.hosts, *args])
        assert r.exit_code == 2 and "Error:" in r.output, (args, r.output)
        assert "hunter2" not in r.output and "Traceback" not in r.output


def test_password_rotation_without_downtime(secured: Cluster) -> None:
    """docs/security.md's procedure: every process gets old+new, `acl apply` with both,
    every process gets new only, `acl apply` with new. The cluster keeps serving and no
    process is ever refused by ZooKeeper."""
    c = secured
    c.init(8, 2)
    agents = {"agent-1", "agent-2"}
    c.start_coordinator("coord-1")
    for a in sorted(agents):
        c.start_agent(a)
    poll_until(lambda: c.settled(agents), 20, "initial convergence")
    writes = 0

    def serving(credentials: tuple[Credential, ...]) -> None:
        nonlocal writes
        with DataClient.connect(ZkTarget.parse(c.hosts, credentials), c.name) as kv:
            kv.put(f"key-{writes}".encode(), b"v")
            writes += 1
            assert all(kv.get(f"key-{i}".encode()) == b"v" for i in range(writes))

    def roll(view: Cluster, generation: str) -> None:
        """Restart every process with ``view``'s credentials, one at a time (reading the
        cluster with them too: znodes the restarted processes create grant only them)."""
        old_leader = view.leader()
        view.start_coordinator(f"coord-{generation}")
        c.procs[old_leader].term()
        poll_until(lambda: view.leader() == f"coord-{generation}", 20, "the new candidate leads")
        for a in sorted(agents):
            c.procs[a].term()
            view.start_agent(a)
            poll_until(lambda: view.settled(agents), 30, f"{a} back with new credentials")
            serving(view.target.credentials)

    serving((ALICE,))
    roll(c.as_user(ALICE, BOB), "2")
    assert invoke(c, "acl", "apply", credentials=(ALICE, BOB)).exit_code == 0
    roll(c.as_user(BOB), "3")
    r = invoke(c, "acl", "apply", credentials=(BOB,))
    assert r.exit_code == 0 and "bob only" in r.output
    serving((BOB,))
    census = invoke(c, "acl", "show", credentials=(BOB,))
    assert census.exit_code == 0 and census.output.count("\n") == 1, census.output
    assert census.output.rstrip().endswith("znodes  digest:bob=rwcda")
    assert invoke(c, "status", credentials=(ALICE,)).exit_code == 2
    for proc in c.procs.values():
        assert "not authorised" not in proc.output(), proc.name


def test_acl_apply_closes_a_cluster_created_open(fresh_zk: ZkServer, tmp_path: Path) -> None:
    c = Cluster(fresh_zk.address, tmp_path)
    try:
        c.init(4, 1)
        assert invoke(c, "acl", "show").output.rstrip().endswith("znodes  world:anyone=rwcda")
        assert invoke(c, "acl", "apply").exit_code == 2  # no credentials: nothing to grant
        noted = invoke(c, "init", "--shards", "4", "--replicas", "1", "--force",
                       credentials=(ALICE,))
        assert noted.exit_code == 0 and "`shardkeeper acl apply`" in noted.output
        r = invoke(c, "acl", "apply", credentials=(ALICE,))
        assert r.exit_code == 0 and "alice only" in r.output
        denied = invoke(c, "status")
        assert denied.exit_code == 2 and "pass --zk-auth" in denied.output
        assert invoke(c, "status", credentials=(ALICE,)).exit_code == 0
        # init with the credentials on the (now closed) cluster notes nothing to fix.
        again = invoke(c, "init", "--shards", "4", "--replicas", "1", "--force",
                       credentials=(ALICE,))
        assert again.exit_code == 0 and "note:" not in again.output
    finally:
        c.close()
