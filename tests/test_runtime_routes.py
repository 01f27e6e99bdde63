"""The term the agent runtime puts in each data-plane route: a primary's own term, and for a
replica or a bootstrapping replica the term its plan gives the shard's primary (whatever
plan generation the agent itself noticed the change in). No ZooKeeper: the runtime's state
is set as a turn of its main loop leaves it."""

from __future__ import annotations

import pytest

from agents.dataplane import ShardRoute
from agents.runtime import Agent
from agents.shardsm import AgentState, ShardRecord, ShardState
from shardkeeper.layout import Assignment
from shardkeeper.vocab import Role


@pytest.fixture
def agent(tmp_path):
    a = Agent("127.0.0.1:1", "routes", "a1", address="127.0.0.1:9001", data_dir=tmp_path)
    a.addresses = {"a2": "127.0.0.1:9002", "a3": "127.0.0.1:9003"}
    return a


def routes_after_turn(agent: Agent, records: dict, assignments: dict, served: dict) -> dict:
    agent.state = AgentState(shards=records)
    agent.assignments = assignments
    agent._served = served
    agent._refresh_table()
    return agent.table.routes()


def test_a_primary_routes_by_its_own_term(agent):
    routes = routes_after_turn(
        agent,
        {1: ShardRecord(state=ShardState.PRIMARY, generation=4)},
        {1: Assignment(Role.PRIMARY, peers=("a2",), bootstrapping=("a3",), term=4)},
        {1: ShardState.PRIMARY},
    )
    assert routes[1] == ShardRoute(ShardState.PRIMARY, 4, "127.0.0.1:9001",
                                   ("127.0.0.1:9002",), ("127.0.0.1:9003",))


def test_replicas_route_by_the_term_their_plan_gives_the_primary(agent):
    # Both became what they are at plan generation 7, long after the primary's term 4.
    routes = routes_after_turn(
        agent,
        {2: ShardRecord(state=ShardState.REPLICA, generation=7, primary="127.0.0.1:9002",
                        term=4),
         3: ShardRecord(state=ShardState.BOOTSTRAPPING, generation=7, source="127.0.0.1:9002",
                        primary="127.0.0.1:9002")},
        {2: Assignment(Role.REPLICA, primary="a2", term=4),
         3: Assignment(Role.REPLICA, primary="a2", source="a2", term=4)},
        {2: ShardState.REPLICA, 3: ShardState.BOOTSTRAPPING},
    )
    assert routes[2] == ShardRoute(ShardState.REPLICA, 4, "127.0.0.1:9002")
    assert routes[3] == ShardRoute(ShardState.BOOTSTRAPPING, 4, "127.0.0.1:9002")


def test_a_new_primary_in_the_plan_moves_the_replica_route_at_once(agent):
    record = ShardRecord(state=ShardState.REPLICA, generation=3, primary="127.0.0.1:9002",
                         term=3)
    routes_after_turn(agent, {5: record}, {5: Assignment(Role.REPLICA, primary="a2", term=3)},
                      {5: ShardState.REPLICA})
    # Plan 8 promotes a3: the route takes its term before the repair has even started.
    routes = routes_after_turn(
        agent, {5: record}, {5: Assignment(Role.REPLICA, primary="a3", term=8)},
        {5: ShardState.REPLICA},
    )
    assert routes[5] == ShardRoute(ShardState.REPLICA, 8, "127.0.0.1:9003")
