"""The agent's turn does work in proportion to what changed (issue 14; agents/turnwork.py):
the data plane's routes, the targets built from the plan, the status it writes and the
plan it decodes must equal what a full recomputation gives, whatever the history. No
ZooKeeper here: the runtime's helpers driven by the state machine's own histories."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from agents.dataplane import ShardRoute
from agents.runtime import Agent
from agents.shardsm import serving
from agents.shardsm.views import target_of
from shardkeeper.layout import AgentStatus, Assignment, ShardStatus
from shardkeeper.vocab import Role
from shardkeeper.zk import ZkTarget
from tests.test_shardsm import histories, limit_sets, run

ME = "me:1"


def idle_agent(tmp_path) -> Agent:
    return Agent(ZkTarget.parse("127.0.0.1:1"), "t", "me", address=ME,
                 data_dir=tmp_path / "me")


def full_routes(state) -> dict[int, ShardRoute]:
    return {s: ShardRoute(v.state, v.term, v.primary, v.in_sync, v.bootstrapping)
            for s, v in serving(state, ME).items()}


@settings(max_examples=150, deadline=None)
@given(histories, limit_sets)
def test_routes_refreshed_from_what_changed_equal_a_full_recomputation(
        tmp_path_factory, history, limits) -> None:
    agent = idle_agent(tmp_path_factory.mktemp("a"))
    for _before, _inputs, decision in run(history, limits):
        agent.state = decision.agent
        agent._refresh_table()
        assert agent.table.routes() == full_routes(decision.agent)


def test_a_primary_whose_peers_change_gets_a_new_route_though_its_record_does_not(
        tmp_path) -> None:
    from agents.shardsm import Plan, Promoted, Session, Target, reconcile

    agent = idle_agent(tmp_path)
    d = reconcile(agent.state, plan=Plan(4, {1: Target(Role.PRIMARY, 4, peers=("b:1",))}),
                  session=Session.CONNECTED)
    d = reconcile(d.agent, events=[Promoted(1, 5, work=d.agent.shards[1].work)])
    agent.state = d.agent
    agent._refresh_table()
    assert agent.table.route(1).in_sync == ("b:1",)
    d = reconcile(d.agent, plan=Plan(5, {1: Target(Role.PRIMARY, 4, peers=("b:1", "c:1"))}))
    assert d.agent.shards[1] is agent.state.shards[1], "the record itself is unchanged"
    agent.state = d.agent
    agent._refresh_table()
    assert agent.table.route(1).in_sync == ("b:1", "c:1")
    assert agent.table.routes() == full_routes(d.agent)


ids = st.sampled_from(["a", "b", "c", "me"])
assignments = st.one_of(
    st.builds(lambda peers, copying, term: Assignment(Role.PRIMARY, peers=tuple(peers),
                                                      bootstrapping=tuple(copying), term=term),
              st.lists(ids, max_size=2, unique=True), st.lists(ids, max_size=1),
              st.integers(1, 3)),
    st.builds(lambda primary, source, term: Assignment(Role.REPLICA, primary=primary,
                                                       source=source, term=term),
              ids, st.none() | ids, st.integers(1, 3)),
)
plan_steps = st.lists(
    st.tuples(st.dictionaries(st.integers(0, 6), assignments, max_size=7),
              st.dictionaries(ids, st.sampled_from(["x:1", "y:2", "z:3"]), max_size=3),
              st.booleans()),
    min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(plan_steps)
def test_targets_taken_over_from_the_last_plan_equal_targets_built_afresh(
        tmp_path_factory, steps) -> None:
    agent = idle_agent(tmp_path_factory.mktemp("a"))
    last: dict[int, Assignment] = {}
    for replicas, addresses, keep in steps:
        if keep:  # the next znode carries some of the same assignment objects over
            replicas = {**replicas, **{s: a for s, a in last.items() if s % 2}}
        agent.book.known.update(addresses)
        got = agent.targets.build(replicas, agent.book.known, agent.address_of)
        assert got == {s: target_of(a, agent.address_of) for s, a in replicas.items()}
        last = replicas


states = st.sampled_from(["OFFLINE", "BOOTSTRAPPING", "REPLICA", "PRIMARY", "ERROR"])
shard_statuses = st.builds(ShardStatus, states, st.integers(0, 1 << 62), st.booleans(),
                           st.sampled_from(["", "boom", "disk full: ü \"quoted\""]))
agent_statuses = st.builds(AgentStatus, st.sampled_from(["a", "agent-é"]),
                           st.integers(0, 1 << 40),
                           st.dictionaries(st.integers(0, 99_999), shard_statuses, max_size=30),
                           st.sampled_from(["", "forged: generation 9"]))


@settings(max_examples=300, deadline=None)
@given(agent_statuses, agent_statuses)
def test_status_codec_takes_over_unchanged_entries_and_keeps_its_bytes(first, second) -> None:
    from shardkeeper.layout import encode

    for status in (first, second):
        plain = encode({"agent": status.agent, "generation": status.generation,
                        "shards": {str(s): e.encode() for s, e in status.shards.items()},
                        **({"refused": status.refused} if status.refused else {})})
        assert status.encode() == plain  # the cached-text encoder, byte for byte
    path = "/t/status/a"
    before = AgentStatus.decode(path, first.encode())
    mixed = AgentStatus(second.agent, second.generation,
                        {**dict(list(first.shards.items())[::2]), **second.shards},
                        second.refused)
    again = AgentStatus.decode(path, mixed.encode(), before)
    assert again == AgentStatus.decode(path, mixed.encode()) == mixed
    for shard, entry in again.shards.items():
        if shard in before.shards and before.shards[shard] == entry:
            assert entry is before.shards[shard], "an unchanged entry is taken over"


def test_a_damaged_status_is_refused_even_when_the_previous_one_was_good() -> None:
    import pytest

    from shardkeeper.vocab import CorruptZnode

    path = "/t/status/a"
    good = AgentStatus("a", 3, {1: ShardStatus("REPLICA"), 2: ShardStatus("PRIMARY")})
    before = AgentStatus.decode(path, good.encode())
    for bad in (b'{"agent":"a","generation":3,"shards":{"1":{"state":"NOPE","lsn":0}}}',
                b'{"agent":"a","generation":3,"shards":{"x1":{"state":"REPLICA","lsn":0}}}',
                b'{"agent":"a","generation":-1,"shards":{}}', b"\xff"):
        with pytest.raises(CorruptZnode):
            AgentStatus.decode(path, bad, before)


def test_status_entries_equal_to_the_last_report_are_the_same_objects(tmp_path) -> None:
    from agents.shardsm import ReportStatus, ShardReport
    from shardkeeper.vocab import ShardState

    agent = idle_agent(tmp_path)
    rng = random.Random(7)
    entries = [ShardReport(s, ShardState.REPLICA, 0, False, "") for s in range(50)]
    agent._report = ReportStatus(1, tuple(entries))
    first = agent.status()
    changed = set(rng.sample(range(50), 5))
    entries = [ShardReport(e.shard, ShardState.PRIMARY, 9, False, "") if e.shard in changed
               else e for e in entries]
    agent._report = ReportStatus(2, tuple(entries))
    second = agent.status()
    for s in range(50):
        assert (second.shards[s] is first.shards[s]) == (s not in changed)
        assert second.shards[s] == ShardStatus(str(entries[s].state), entries[s].lsn)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(0, 999), assignments, max_size=20),
       st.dictionaries(st.integers(0, 999), assignments, max_size=20))
def test_plan_codec_takes_over_unchanged_assignments(first, second) -> None:
    from shardkeeper.layout import AgentPlan

    path = "/t/plan/agents/me"
    before = AgentPlan.decode(path, AgentPlan(3, 1, first).encode())
    mixed = AgentPlan(4, 1, {**dict(list(first.items())[::2]), **second})
    data = mixed.encode()
    again = AgentPlan.decode(path, data, before)
    assert again == AgentPlan.decode(path, data) == mixed
    for shard, a in again.replicas.items():
        if before.replicas.get(shard) == a:
            assert a is before.replicas[shard], "an unchanged assignment is taken over"
