"""The admin CLI against a real ZooKeeper: output, JSON shapes and one-line errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from shardkeeper.dev.zkserver import free_port
from shardkeeper.poll import poll_until
from shardkeeper.process import cli_command
from tests.harness import Cluster


def one_line_error(r) -> str:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_init_refuses_zero_replicas(cluster: Cluster) -> None:
    line = one_line_error(cluster.cli("init", "--shards", "8", "--replicas", "0"))
    assert "replicas must be between 1 and" in line


def test_init_is_idempotent_and_never_changes_the_shard_count(cluster: Cluster) -> None:
    cluster.init(8, 2)
    assert cluster.cli("config", "set", "rebalance_delay=30").returncode == 0
    again = cluster.cli("init", "--shards", "8", "--replicas", "2")
    assert again.returncode == 0 and "already initialised" in again.stdout
    line = one_line_error(cluster.cli("init", "--shards", "16", "--replicas", "2"))
    assert "already has a config" in line and "--force" in line
    forced = cluster.cli("init", "--shards", "16", "--replicas", "3", "--force")
    assert forced.returncode == 2 and "fixed" in forced.stderr
    assert "--cluster NEW-NAME --shards 16" in forced.stderr
    r = cluster.cli("init", "--shards", "8", "--replicas", "3", "--force")
    assert r.returncode == 0, r.stderr
    status = json.loads(cluster.cli("status", "--json").stdout)
    assert (status["shards"], status["replicas"]) == (8, 3)
    config = json.loads(cluster.cli("config", "show", "--json").stdout)
    assert config["rebalance_delay"] == 30, "a policy set with config set survives --force"


def test_init_force_replaces_a_damaged_config_but_keeps_the_shard_count(
        cluster: Cluster) -> None:
    cluster.init(8, 2)
    cluster.start_coordinator("coord-1")
    cluster.start_agent("agent-1")
    poll_until(lambda: cluster.settled({"agent-1"}), 20, "a plan")
    cluster.client.set(cluster.paths.config, b"{garbage")
    assert cluster.cli("init", "--shards", "8", "--replicas", "2").returncode == 2
    refused = cluster.cli("init", "--shards", "4", "--replicas", "2", "--force")
    assert refused.returncode == 2 and "8 shards" in refused.stderr, "from plan/meta"
    r = cluster.cli("init", "--shards", "8", "--replicas", "1", "--force")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("command", [["status"], ["shards"], ["status", "--json"]])
def test_cluster_without_config_says_run_init(cluster: Cluster, command: list[str]) -> None:
    line = one_line_error(cluster.cli(*command))
    assert f"cluster '{cluster.name}' has no config" in line
    assert "shardkeeper init" in line


def test_unreachable_zookeeper_is_one_clear_line(tmp_path) -> None:
    c = Cluster(f"127.0.0.1:{free_port()}", tmp_path)
    line = one_line_error(c.cli("status", timeout=30))
    assert "cannot reach ZooKeeper at 127.0.0.1:" in line


def test_bad_cluster_name_is_a_usage_error(cluster: Cluster) -> None:
    import subprocess

    from shardkeeper.process import cli_command

    r = subprocess.run(cli_command("status", "--zk", cluster.hosts, "--cluster", "../etc"),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid cluster name" in r.stderr
    assert "Traceback" not in r.stderr


def test_env_vars_select_zookeeper_and_cluster(cluster: Cluster) -> None:
    import os
    import subprocess

    from shardkeeper.process import cli_command

    cluster.init(4, 1)
    env = dict(os.environ, SHARDKEEPER_ZK=cluster.hosts, SHARDKEEPER_CLUSTER=cluster.name)
    r = subprocess.run(cli_command("status", "--json"), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shards"] == 4


def test_status_and_shards_show_the_running_cluster(cluster: Cluster) -> None:
    cluster.init(12, 2)
    cluster.start_coordinator("coord-1")
    for a in ("agent-1", "agent-2", "agent-3"):
        cluster.start_agent(a, zone=f"z{a[-1]}")
    poll_until(lambda: cluster.settled({"agent-1", "agent-2", "agent-3"}), 15,
        "cluster.settled({'agent-1', 'agent-2', 'agent-3'})")
    s = json.loads(cluster.cli("status", "--json").stdout)
    for key in ("leader", "epoch", "generation", "shards", "replicas", "members",
                "under_replicated", "balance"):
        assert key in s
    assert s["leader"] == "coord-1" and s["epoch"] >= 1 and s["generation"] >= 1
    assert s["under_replicated"] == 0 and s["balance"] == 1.0
    assert [m["id"] for m in s["members"]] == ["agent-1", "agent-2", "agent-3"]
    assert all(m["replicas"] == 8 and m["primaries"] == 4 for m in s["members"])
    assert {m["zone"] for m in s["members"]} == {"z1", "z2", "z3"}
    text = cluster.cli("status").stdout
    assert "leader coord-1" in text and "under-replicated 0" in text and "agent-2" in text

    shards = json.loads(cluster.cli("shards", "--json").stdout)
    assert len(shards["shards"]) == 12
    mine = json.loads(cluster.cli("shards", "--agent", "agent-1", "--json").stdout)["shards"]
    assert len(mine) == 8 and all("agent-1" in r["replicas"] for r in mine)
    lines = cluster.cli("shards").stdout.splitlines()
    assert lines[0].startswith("generation") and len(lines) == 13


def test_help_lists_every_command() -> None:
    import subprocess

    from shardkeeper.process import cli_command

    r = subprocess.run(cli_command("--help"), capture_output=True, text=True)
    for command in ("init", "status", "shards", "agent", "coordinator", "dev"):
        assert command in r.stdout


# -- issue 10, finding 8: every bad input is one line and exit 2, never a traceback ------

def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("zk", "reason"), [
    ("", "no ZooKeeper servers given"),
    ("127.0.0.1:notaport", "'notaport' is not a number"),
    ("127.0.0.1:99999", "99999 is outside 1-65535"),
    ("[::1", "unbalanced '['"),
    (",,,", "empty server entry"),
    ("127.0.0.1:", "missing"),
    ("::1", "IPv6 addresses need brackets"),
    ("zk1:2181/chroot", "chroot"),
])
def test_bad_zk_strings_are_refused_in_one_line(zk: str, reason: str) -> None:
    r = cli("status", "--zk", zk)
    assert r.returncode == 2
    assert one_line_error(r).startswith("Error: --zk: ") and reason in r.stderr


def test_get_with_the_routing_chunk_deleted_says_the_plan_is_incomplete(cluster: Cluster
                                                                         ) -> None:
    cluster.init(8, 1)  # one routing chunk
    cluster.start_coordinator("coord-1")
    cluster.start_agent("agent-1")
    poll_until(lambda: cluster.settled({"agent-1"}), 20, "the agent to hold its plan")
    assert cluster.cli("put", "k", "v").returncode == 0
    # A running leader repairs a deleted chunk by itself.
    cluster.client.delete(cluster.paths.routing_chunk(0))
    poll_until(lambda: cluster.cli("get", "k").stdout == "v\n", 20, "the leader's repair")
    # With no leader running, readers refuse the incomplete plan in one line.
    cluster.procs["coord-1"].term()
    cluster.client.delete(cluster.paths.routing_chunk(0))  # was `shards must be >= 1`
    for command in (["get", "k"], ["put", "k", "w"], ["status"], ["shards"]):
        r = cluster.cli(*command)
        assert r.returncode == 2, (command, r.stderr)
        line = one_line_error(r)
        assert "is incomplete: routing chunk 00000 missing" in line
        assert "restart the leading coordinator (coord-1)" in line
    # The advice works: a new leader writes the whole plan again.
    cluster.start_coordinator("coord-2")
    poll_until(lambda: cluster.cli("get", "k").stdout == "v\n", 20, "a complete plan again")


@pytest.mark.parametrize("where", ["/proc/x", "FILE/sub"])
def test_agent_data_dir_that_cannot_be_created_is_one_line(tmp_path: Path, where: str) -> None:
    (tmp_path / "FILE").write_text("")
    data_dir = where.replace("FILE", str(tmp_path / "FILE"))
    r = cli("agent", "run", "--zk", "127.0.0.1:1", "--id", "a", "--listen", "127.0.0.1:1",
            "--data-dir", data_dir)
    assert r.returncode == 2
    assert one_line_error(r).startswith(f"Error: --data-dir {data_dir}: cannot create or write")


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("--weight", "nan", "not a finite number"),  # FloatRange alone lets NaN through
    ("--weight", "inf", "is not in the range"),
    ("--session-timeout", "nan", "not a finite number"),
    ("--log-level", "root", "'root' is not one of"),  # was a TypeError from logging
    ("--listen", "host", "missing port"),
    ("--listen", "[::1:80", "unbalanced '['"),
    ("--listen", "127.0.0.1:70000", "outside 0-65535"),
    ("--listen", "a\x00b:80", "bad host"),  # was a ValueError from bind
])
def test_agent_run_refuses_bad_options(tmp_path: Path, option: str, value: str,
                                       expected: str) -> None:
    from click.testing import CliRunner

    from shardkeeper.cli import main

    args = {"--zk": "127.0.0.1:1", "--id": "a", "--listen": "127.0.0.1:1",
            "--data-dir": str(tmp_path / "d"), option: value}
    r = CliRunner().invoke(main, ["agent", "run", *[x for kv in args.items() for x in kv]])
    assert r.exit_code == 2 and expected in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


REFUSED_SETTINGS = [
    ("auto_maintenance_fraction=1e-400", "would become 0"),  # was silently 0: guard off
    ("auto_maintenance_fraction=-1e-400", "would become 0"),
    ("auto_maintenance_fraction=1e400", "not a finite number"),
    ("rebalance_delay=nan", "not a finite number"),
    ("rebalance_delay=-inf", "not a finite number"),
    ("max_moves_total=1e400", "must be an integer between 1 and 100000"),
    ("max_moves_total=99999999999999999999999", "between 1 and 100000"),
]


def test_config_values_that_do_not_survive_conversion_are_refused(cluster: Cluster) -> None:
    from click.testing import CliRunner

    from shardkeeper.cli import main

    cluster.init(4, 1)
    for setting, reason in REFUSED_SETTINGS:
        r = CliRunner().invoke(main, ["config", "set", setting, *cluster.zk_args()])
        assert r.exit_code == 2, r.output
        key = setting.split("=")[0]
        assert r.output.startswith(f"Error: {key} must be") and r.output.count("\n") == 1
        assert "between" in r.output and reason in r.output, r.output
    shown = json.loads(cluster.cli("config", "show", "--json").stdout)
    assert shown["auto_maintenance_fraction"] == 0.5 and shown["rebalance_delay"] == 0


def test_spawned_roles_run_the_installed_code_whatever_the_directory(tmp_path: Path) -> None:
    """`dev up` run from another checkout must not start that checkout's agents."""
    fake = tmp_path / "shardkeeper"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text("print('the wrong shardkeeper')")
    r = subprocess.run(cli_command("--version"), capture_output=True, text=True,
                       cwd=tmp_path, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("shardkeeper, version"), r.stdout
