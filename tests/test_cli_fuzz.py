"""Hypothesis feeds the CLI's options and arguments: whatever it gets, a command ends with
exit 0, 1 or 2 and never a traceback. In process through click's CliRunner (many
examples), and through real `shardkeeper` processes for a few."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from kazoo.hosts import collect_hosts

from shardkeeper.cli import main
from shardkeeper.process import cli_command
from shardkeeper.zk import Credential, ZkTarget, ZkTargetError
from tests.harness import Cluster

# What a command line can carry: no NUL, no lone surrogates beyond those surrogateescape
# makes (tested separately: test_data_e2e stores non-UTF-8 arguments).
CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
TEXT = st.text(CHARS, max_size=30)
# Text that looks like what it stands for: numbers, host lists, settings, with noise.
NUMBER = st.one_of(st.integers(-(10**30), 10**30).map(str), st.floats().map(repr),
                   st.sampled_from(["1e-400", "-1e-400", "1e400", "nan", "-inf", "0x10", "1_0",
                                    " 7 ", "", "-0"]))
HOST = st.one_of(st.from_regex(r"[a-z0-9][a-z0-9-]{0,8}(\.[a-z0-9-]{1,4}){0,2}", fullmatch=True),
                 st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
                 st.sampled_from(["[::1", "::1", "", "[]", "localhost"]))
ENTRY = st.tuples(HOST, st.one_of(st.none(), NUMBER, TEXT)).map(
    lambda hp: hp[0] if hp[1] is None else f"{hp[0]}:{hp[1]}")
ZK = st.one_of(TEXT, st.lists(ENTRY, max_size=3).map(",".join))
KNOB = st.sampled_from(["shards", "replicas", "rebalance_delay", "max_moves_per_agent",
                        "max_moves_total", "auto_maintenance_fraction",
                        "auto_maintenance_window", "nope", ""])
SETTING = st.one_of(TEXT, st.tuples(KNOB, NUMBER).map("=".join))
# Values that broke `agent run` before (a logging attribute, NUL in a host, port 0).
AGENT_HINTS = ["root", "ROOT", "debug", "[::1]:80", "[::1:80", "host", "127.0.0.1:0",
               "a\x00b:1", "::1:80"]
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def parses(zk: str) -> bool:
    try:
        ZkTarget.parse(zk)
        return True
    except ZkTargetError:
        return False


def clean_exit(r: Result, allowed: frozenset[int] = frozenset({0, 1, 2})) -> None:
    event(f"exit {r.exit_code}")  # --hypothesis-show-statistics: how far inputs got
    assert r.exit_code in allowed, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output


@settings(max_examples=400, deadline=None)
@given(ZK)
def test_zk_strings_parse_as_kazoo_reads_them_or_are_refused(zk: str) -> None:
    try:
        target = ZkTarget.parse(zk)
    except ZkTargetError:
        event("refused")
        return
    event("accepted")
    hosts, chroot = collect_hosts(target.connect_string)
    assert chroot is None
    assert [(h.lower(), p) for h, p in hosts] == [(h.lower(), p) for h, p in target.hosts]
    assert all(1 <= p <= 65535 for _, p in target.hosts)


@settings(max_examples=300, deadline=None)
@given(TEXT, TEXT)
def test_a_refused_credential_never_repeats_the_password(user: str, password: str) -> None:
    assume(len(password) >= 3)
    try:
        Credential.parse(f"{user}:{password}")
    except ZkTargetError as e:
        assert password not in str(e)


@FUZZ
@given(ZK)
def test_any_zk_option_is_used_or_refused_in_one_line(zk: str) -> None:
    assume(not parses(zk))  # a valid one would wait 5 s for a server that is not there
    r = CliRunner().invoke(main, ["status", f"--zk={zk}"])
    clean_exit(r, frozenset({2}))
    assert r.output.startswith("Error: --zk: ") and r.output.count("\n") == 1, r.output


@pytest.fixture()
def fuzzed(cluster: Cluster) -> Cluster:
    """A cluster with a config and nothing running: commands read and write its znodes."""
    cluster.init(8, 2)
    return cluster


COMMAND = st.one_of(
    st.lists(SETTING, min_size=1, max_size=3).map(lambda s: ["config", "set", *s]),
    st.tuples(NUMBER, NUMBER).map(lambda sr: ["init", "--shards", sr[0], "--replicas", sr[1],
                                              "--force"]),
    st.tuples(NUMBER, TEXT, TEXT).map(lambda m: ["move", m[0], "--from", m[1], "--to", m[2]]),
    st.tuples(st.sampled_from(["drain", "undrain", "get", "delete"]), TEXT).map(list),
    st.tuples(TEXT, TEXT).map(lambda kv: ["put", *kv]),
    NUMBER.map(lambda n: ["events", "--limit", n]),
    TEXT.map(lambda n: ["pause", "--note", n]),
    st.sampled_from([["status"], ["shards"], ["config", "show"], ["resume"], ["rebalance"],
                     ["acl", "show"], ["verify"]]),
)


@FUZZ
@given(COMMAND)
def test_any_admin_or_data_command_ends_cleanly(fuzzed: Cluster, command: list[str]) -> None:
    clean_exit(CliRunner().invoke(main, [*command, *fuzzed.zk_args()]))


@FUZZ
@given(st.sampled_from([["status"], ["config", "show"], ["events"], ["acl", "show"]]),
       TEXT, st.lists(st.one_of(TEXT, st.tuples(TEXT, TEXT).map(":".join)), max_size=2))
def test_any_cluster_name_or_credential_ends_cleanly(fuzzed: Cluster, command: list[str],
                                                    cluster_name: str,
                                                    auth: list[str]) -> None:
    options = ["--zk", fuzzed.hosts, f"--cluster={cluster_name}",
               *[f"--zk-auth={a}" for a in auth]]
    clean_exit(CliRunner().invoke(main, [*command, *options]))


@FUZZ
@given(st.dictionaries(st.sampled_from(["--id", "--weight", "--session-timeout", "--zone",
                                        "--log-level", "--listen"]),
                       st.one_of(st.text(max_size=30).filter(str.isprintable), NUMBER,
                                 st.sampled_from(AGENT_HINTS)), max_size=4))
def test_agent_run_options_never_end_in_a_traceback(tmp_path: Path,
                                                    options: dict[str, str]) -> None:
    blocker = tmp_path / "file"
    blocker.touch()
    # The data directory cannot be made, so no combination gets as far as running.
    args = {"--id": "a", "--listen": "127.0.0.1:1", **options,
            "--data-dir": str(blocker / "d"), "--zk": "127.0.0.1:1"}
    r = CliRunner().invoke(main, ["agent", "run", *[f"{k}={v}" for k, v in args.items()]])
    clean_exit(r, frozenset({2}))


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    ZK.filter(lambda zk: not parses(zk)).map(lambda zk: ["status", f"--zk={zk}"]),
    st.lists(SETTING, min_size=1, max_size=2).map(lambda s: ["config", "set", *s]),
    TEXT.map(lambda c: ["status", f"--cluster={c}"]),
))
def test_real_processes_end_cleanly(fuzzed: Cluster, argv: list[str]) -> None:
    # Options given first win over these defaults (click keeps the last, so put them first).
    env = fuzzed.env({"SHARDKEEPER_ZK": fuzzed.hosts, "SHARDKEEPER_CLUSTER": fuzzed.name})
    r = subprocess.run(cli_command(*argv), capture_output=True, text=True, timeout=30,
                       errors="replace", env=env)
    assert r.returncode in (0, 1, 2), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
