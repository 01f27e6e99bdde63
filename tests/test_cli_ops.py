"""The operator's CLI end to end, on real ZooKeeper and real processes: safety rails, the
what-if, blocking drains and moves, verify, watch --until-stable after a SIGKILL, down
members in status, Ctrl-C on the commands that follow the cluster, and JSON logs."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from shardkeeper.poll import poll_until
from shardkeeper.process import cli_command
from shardkeeper.summary import read_summary
from tests.harness import Cluster, RoleProcess
from tests.test_cli import one_line_error

AGENTS = ("agent-1", "agent-2", "agent-3")


def status(cluster: Cluster) -> dict:
    """What `status --json` prints, read in this process (the CLI costs a second a call
    on a loaded machine; `status` itself runs below too)."""
    return read_summary(cluster.client, cluster.paths)


def member(s: dict, agent: str) -> dict:
    return next(m for m in s["members"] if m["id"] == agent)


def interrupt(cluster: Cluster, tmp_path: Path, *args: str) -> tuple[int, str]:
    """Run a command that follows the cluster, press Ctrl-C once it has printed, and
    return its exit status and stderr."""
    out, err = tmp_path / f"{args[0]}.out", tmp_path / f"{args[0]}.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        p = subprocess.Popen(cli_command(*args, *cluster.zk_args()), stdout=stdout,
                             stderr=stderr, env=cluster.env())
    try:
        poll_until(lambda: out.stat().st_size > 0 or p.poll() is not None, 30,
                   f"`{' '.join(args)}` to print")
        assert p.poll() is None, err.read_text()
        p.send_signal(signal.SIGINT)
        return p.wait(15), err.read_text()
    finally:
        if p.poll() is None:
            p.kill()


def test_an_operators_day(cluster: Cluster, tmp_path: Path) -> None:
    cluster.init(24, 2)
    # The coordinator logs JSON, chosen through the environment.
    coordinator = RoleProcess("coord-1", cli_command(
        "coordinator", "run", *cluster.zk_args(), "--id", "coord-1", "--session-timeout", "1",
    ), tmp_path / "coord-1.log", cluster.env({"SHARDKEEPER_LOG_FORMAT": "json"}))
    cluster.procs["coord-1"] = coordinator
    for agent, zone in zip(AGENTS, "abc", strict=True):
        cluster.start_agent(agent, zone=zone)
    poll_until(lambda: cluster.settled(set(AGENTS)), 30, "the cluster to settle")

    # Safety rails: an agent the cluster never saw is refused and nothing is written.
    for command in (["drain", "agent-9"], ["undrain", "agent-9"],
                    ["move", "0", "--from", "agent-9", "--to", "agent-1"]):
        r = cluster.cli(*command)
        assert r.returncode == 2, (command, r.stderr)
        line = one_line_error(r)
        assert "no agent 'agent-9'" in line and "nothing was written" in line
    assert cluster.client.get_children(cluster.paths.drains) == []
    assert cluster.client.get_children(cluster.paths.moves) == []

    # The what-if: a drain moves exactly the agent's replicas, at no risk; dry run = plan.
    held = member(status(cluster), "agent-1")["replicas"]
    r = cluster.cli("plan", "--drain", "agent-1", "--json")
    assert r.returncode == 0, r.stderr
    w = json.loads(r.stdout)
    assert len(w["moves"]) == held and {m["from"] for m in w["moves"]} == {"agent-1"}
    assert w["shards_at_risk"] == [] and w["shortfall"] == 0
    assert {m["id"]: m["replicas_after"] for m in w["members"]}["agent-1"] == 0
    dry = cluster.cli("drain", "agent-1", "--dry-run", "--json")
    assert json.loads(dry.stdout) == w
    assert cluster.client.get_children(cluster.paths.drains) == [], "a dry run writes nothing"
    risky = json.loads(cluster.cli("plan", "--remove", "agent-1", "--json").stdout)
    assert len(risky["shards_at_risk"]) == held

    # verify: every shard, or some, as JSON.
    assert cluster.cli("load", "--keys", "300").returncode == 0
    v = json.loads(cluster.cli("verify", "--json").stdout)
    assert (v["shards"], v["agree"], v["differ"], v["unavailable"]) == (24, 24, [], [])
    some = json.loads(cluster.cli("verify", "--shard", "3", "--shard", "5", "--json").stdout)
    assert (some["shards"], some["agree"]) == (2, 2)
    assert "shards are 0..23" in one_line_error(cluster.cli("verify", "--shard", "24"))

    # A blocking drain, undrain and move.
    r = cluster.cli("drain", "agent-1", "--wait", "--timeout", "60")
    assert r.returncode == 0, r.stderr
    assert "agent-1 is drained" in r.stdout and "draining agent-1:" in r.stderr
    s = status(cluster)
    assert member(s, "agent-1")["state"] == "drained" and member(s, "agent-1")["replicas"] == 0
    r = cluster.cli("undrain", "agent-1", "--wait", "--timeout", "60")
    assert r.returncode == 0 and "rebalanced" in r.stdout, r.stderr
    rows = json.loads(cluster.cli("shards", "--json").stdout)["shards"]
    shard = next(r["shard"] for r in rows if "agent-1" not in r["replicas"])
    source = rows[shard]["replicas"][-1]
    shown = json.loads(cluster.cli("status", "--json").stdout)
    assert set(shown) == set(status(cluster)) and shown["under_replicated"] == 0
    assert [m["id"] for m in shown["members"]] == list(AGENTS)
    r = cluster.cli("move", str(shard), "--from", source, "--to", "agent-1", "--wait",
                    "--timeout", "60")
    assert r.returncode == 0, r.stderr
    row = cluster.plan().shards[shard]
    assert "agent-1" in row.replicas and source not in row.holders

    # Ctrl-C ends the commands that follow the cluster: no traceback.
    for command in (["events", "-f"], ["watch"]):
        code, err = interrupt(cluster, tmp_path, *command)
        assert code in (0, 130) and "Traceback" not in err, (command, code, err)

    # A SIGKILLed agent, while paused: watch --until-stable keeps watching until the
    # copies, held back by maintenance, have run after `resume`.
    assert cluster.cli("pause", "--note", "test").returncode == 0
    killed_at = time.time()
    cluster.procs["agent-3"].kill()
    poll_until(lambda: member(status(cluster), "agent-3")["state"] == "down", 30,
               "the leader to see agent-3 go")
    out = tmp_path / "watch.out"
    with open(out, "w") as stdout:
        watch = subprocess.Popen(cli_command("watch", "--until-stable", "--timeout", "60",
                                             *cluster.zk_args()),
                                 stdout=stdout, stderr=subprocess.PIPE, text=True,
                                 env=cluster.env())
    poll_until(lambda: "moving" in out.read_text(), 30, "watch to show the cluster moving")
    assert watch.poll() is None, "not stable while paused with shards under-replicated"
    assert cluster.cli("resume").returncode == 0
    assert watch.wait(60) == 0, watch.stderr.read()
    lines = out.read_text().splitlines()
    assert lines[-1].startswith("stable: fully replicated, nothing in flight"), lines
    # Independent of watch's own verdict: once agent-3's session (and member znode) has
    # expired, the survivors hold exactly their plans, in sync, with nothing copying.
    poll_until(lambda: "agent-3" not in cluster.members(), 30, "agent-3's session to expire")
    assert cluster.settled({"agent-1", "agent-2"})
    down = member(status(cluster), "agent-3")
    assert down["state"] == "down" and killed_at - 1 <= down["down_since"] <= time.time()
    assert "since" in cluster.cli("status").stdout
    kinds = [json.loads(line)["kind"]
             for line in cluster.cli("events", "--json").stdout.splitlines()]
    assert {"leader-elected", "member-left", "drain-done"} <= set(kinds)

    # Two agents left at R=2: a drain cannot finish, and --wait says why.
    r = cluster.cli("drain", "agent-2", "--wait", "--timeout", "2")
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: timed out after 2s: agent-2 still holds"), r.stderr
    assert "no other eligible agent" in line and "Traceback" not in r.stderr
    r = cluster.cli("watch", "--until-stable", "--timeout", "1")
    assert r.returncode == 1 and "not stable after 1s" in r.stderr and "shortfall" in r.stderr
    assert cluster.cli("undrain", "agent-2").returncode == 0
    r = cluster.cli("rebalance", "--wait", "--timeout", "60")
    assert r.returncode == 0 and "rebalanced" in r.stdout, r.stderr

    # The coordinator's log: one JSON object per line.
    lines = [json.loads(line) for line in coordinator.output().splitlines() if line.strip()]
    assert lines and all(line["role"] == "coordinator" and line["id"] == "coord-1"
                         for line in lines)
    assert any(line["event"].startswith("event member-left") for line in lines)
    assert all(line["time"][-6] in "+-" for line in lines)
