"""The pure shard state machine: example stories plus property tests over random histories."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agents.shardsm import (
    LEGAL_TRANSITIONS,
    AgentState,
    BecomeReplica,
    CatchUp,
    CopyDone,
    CopyFailed,
    Demote,
    DropDone,
    Limits,
    PeerLost,
    Plan,
    Promote,
    Repair,
    ReportStatus,
    Session,
    SetServing,
    SetWritable,
    ShardStatus,
    StartBootstrap,
    StartDrop,
    Synced,
    SyncFailed,
    Target,
    reconcile,
    states,
    waiting_shards,
)
from shardkeeper.vocab import Role, ShardState

P, R = Role.PRIMARY, Role.REPLICA
S = ShardState


def shard_actions(decision):
    return [
        a for a in decision.actions if not isinstance(a, ReportStatus | SetWritable | SetServing)
    ]


def connected(agent=None, **kwargs):
    return reconcile(agent or AgentState(), session=Session.CONNECTED, **kwargs)


# -- stories -----------------------------------------------------------------------------


def test_new_cluster_opens_empty_shards_directly():
    d = connected(plan=Plan(1, {0: Target(P), 1: Target(R, primary="b:1")}))
    assert states(d.agent) == {0: S.PRIMARY, 1: S.REPLICA}
    assert shard_actions(d) == [Promote(0, 1), BecomeReplica(1, 1, "b:1")]
    assert d.actions[-1] == ReportStatus(1, d.actions[-1].shards)


def test_first_connect_serves_after_shard_actions_and_fences_on_suspend():
    d = connected(plan=Plan(1, {0: Target(P)}))
    assert d.actions[:1] == (Promote(0, 1),)
    assert d.actions[1:3] == (SetServing(True), SetWritable(True))
    suspended = reconcile(d.agent, session=Session.SUSPENDED)
    assert suspended.actions == (SetWritable(False),)
    lost = reconcile(suspended.agent, session=Session.LOST)
    assert lost.actions == (SetServing(False),)
    back = reconcile(lost.agent, session=Session.CONNECTED)
    assert back.actions == (SetServing(True), SetWritable(True))


def test_bootstrap_then_online_then_promoted_then_dropped():
    d = connected(plan=Plan(2, {7: Target(R, source="a:1", primary="a:1")}))
    assert shard_actions(d) == [StartBootstrap(7, "a:1", 2)]
    d = reconcile(d.agent, events=[CopyDone(7, 1234)])
    assert states(d.agent) == {7: S.REPLICA}
    assert shard_actions(d) == [BecomeReplica(7, 2, "a:1")]
    assert not any(isinstance(a, ReportStatus) for a in d.actions), "reported once synced"
    d = reconcile(d.agent, events=[Synced(7, 0)])
    assert d.actions == (ReportStatus(2, (ShardStatus(7, S.REPLICA, 1234),)),)
    d = reconcile(d.agent, plan=Plan(3, {7: Target(P)}))
    assert shard_actions(d) == [Promote(7, 3)]
    d = reconcile(d.agent, plan=Plan(4, {7: Target(R, primary="c:1")}))
    assert shard_actions(d) == [Demote(7, 4, "c:1")]
    d = reconcile(d.agent, plan=Plan(5, {}))
    assert shard_actions(d) == [StartDrop(7)] and states(d.agent) == {7: S.DROPPING}
    d = reconcile(d.agent, events=[DropDone(7)])
    assert states(d.agent) == {}


def test_copy_done_goes_straight_to_primary_when_the_target_says_so():
    d = connected(plan=Plan(1, {0: Target(R, source="a:1")}))
    d = reconcile(d.agent, plan=Plan(2, {0: Target(P, source="a:1")}))
    d = reconcile(d.agent, events=[CopyDone(0, 9)])
    assert states(d.agent) == {0: S.PRIMARY} and shard_actions(d) == [Promote(0, 2)]


def test_replica_repairs_when_its_primary_changes():
    d = connected(plan=Plan(1, {0: Target(R, primary="a:1")}))
    d = reconcile(d.agent, plan=Plan(2, {0: Target(R, primary="b:1")}))
    assert shard_actions(d) == [Repair(0, "b:1", 2)]
    assert reconcile(d.agent, plan=Plan(3, {0: Target(R, primary="b:1")})).actions == (
        ReportStatus(3, d.actions[-1].shards),
    )


def test_failed_copies_retry_then_error_then_recover_on_a_newer_plan():
    limits = Limits(max_bootstraps=2, max_copy_retries=2)
    d = connected(plan=Plan(1, {0: Target(R, source="a:1")}), limits=limits)
    d = reconcile(d.agent, events=[CopyFailed(0, "timeout")], limits=limits)
    assert shard_actions(d) == [StartBootstrap(0, "a:1", 1, attempt=1)]
    d = reconcile(d.agent, events=[PeerLost("a:1")], limits=limits)
    assert shard_actions(d) == [StartBootstrap(0, "a:1", 1, attempt=2)]
    d = reconcile(d.agent, events=[CopyFailed(0, "timeout")], limits=limits)
    assert states(d.agent) == {0: S.ERROR} and shard_actions(d) == []
    same = reconcile(d.agent, plan=Plan(1, {0: Target(R, source="a:1")}), limits=limits)
    assert states(same.agent) == {0: S.ERROR}, "the same generation does not retry"
    d = reconcile(d.agent, plan=Plan(2, {0: Target(R, source="b:1")}), limits=limits)
    assert states(d.agent) == {0: S.BOOTSTRAPPING}
    assert shard_actions(d) == [StartBootstrap(0, "b:1", 2)]


def test_primary_change_during_a_copy_starts_it_over():
    d = connected(plan=Plan(1, {0: Target(R, source="a:1", primary="a:1")}))
    d = reconcile(d.agent, plan=Plan(2, {0: Target(R, source="b:1", primary="b:1")}))
    assert shard_actions(d) == [StartDrop(0)]
    d = reconcile(d.agent, events=[DropDone(0)])
    assert shard_actions(d) == [StartBootstrap(0, "b:1", 2)]


def test_new_source_restarts_the_copy():
    d = connected(plan=Plan(1, {0: Target(R, source="a:1")}))
    d = reconcile(d.agent, plan=Plan(2, {0: Target(R, source="b:1")}))
    assert shard_actions(d) == [StartBootstrap(0, "b:1", 2)]


def test_bootstraps_are_bounded_and_the_rest_wait_in_shard_order():
    plan = Plan(1, {s: Target(R, source="a:1") for s in range(5)})
    d = connected(plan=plan, limits=Limits(max_bootstraps=2))
    assert [a.shard for a in shard_actions(d)] == [0, 1]
    assert waiting_shards(d.agent) == [2, 3, 4]
    d = reconcile(d.agent, events=[CopyDone(1, 5)], limits=Limits(max_bootstraps=2))
    assert [type(a).__name__ for a in shard_actions(d)] == ["BecomeReplica", "StartBootstrap"]
    assert waiting_shards(d.agent) == [3, 4]


def test_stale_plan_and_stale_events_are_ignored():
    d = connected(plan=Plan(5, {0: Target(P)}))
    stale = reconcile(d.agent, plan=Plan(4, {}), events=[CopyDone(0, 1), DropDone(0)])
    assert stale.agent == d.agent and stale.actions == ()


def test_lost_ignores_the_plan_until_reconnected():
    d = connected(plan=Plan(1, {0: Target(P)}))
    lost = reconcile(d.agent, plan=Plan(2, {}), session=Session.LOST)
    assert states(lost.agent) == {0: S.PRIMARY}
    back = reconcile(lost.agent, plan=Plan(2, {}), session=Session.CONNECTED)
    assert states(back.agent) == {0: S.DROPPING}
    assert shard_actions(back) == [StartDrop(0)]


def syncing(decision):
    return {s for s, r in decision.agent.shards.items() if r.syncing}


def reported(decision):
    """shard -> (state, catching_up) from the decision's status report."""
    report = decision.actions[-1]
    assert isinstance(report, ReportStatus)
    return {e.shard: (e.state, e.catching_up) for e in report.shards}


def test_replica_back_from_a_lost_session_catches_up_before_it_counts_in_sync():
    copying = Plan(1, {0: Target(R, source="a:1", primary="a:1")})
    d = connected(plan=copying)
    d = reconcile(d.agent, events=[CopyDone(0, 10)])
    d = reconcile(d.agent, events=[Synced(0, 10)])
    assert reported(d) == {0: (S.REPLICA, False)}
    d = reconcile(d.agent, plan=Plan(2, {0: Target(R, primary="a:1")}))  # joined the in-sync set
    assert shard_actions(d) == [] and syncing(d) == set()
    lost = reconcile(d.agent, session=Session.LOST)
    # The leader dropped it from the in-sync set meanwhile and lists it copying again,
    # from the same source: it missed the writes of its absence.
    back = reconcile(lost.agent, plan=Plan(4, {0: Target(R, source="a:1", primary="a:1")}))
    assert shard_actions(back) == [CatchUp(0, "a:1", "a:1", 4)]
    assert reported(back) == {0: (S.REPLICA, True)}
    again = reconcile(back.agent, plan=Plan(5, {0: Target(R, source="a:1", primary="a:1")}))
    assert shard_actions(again) == [], "one catch-up per absence"
    done = reconcile(again.agent, events=[Synced(0, 42)])
    assert reported(done) == {0: (S.REPLICA, False)}
    assert done.agent.shards[0].lsn == 42


def test_repair_and_demotion_report_catching_up_until_synced():
    d = connected(plan=Plan(1, {0: Target(R, primary="a:1"), 1: Target(P)}))
    d = reconcile(d.agent, events=[Synced(0, 0)])
    d = reconcile(d.agent, plan=Plan(2, {0: Target(R, primary="b:1"), 1: Target(R, primary="b:1")}))
    assert shard_actions(d) == [Repair(0, "b:1", 2), Demote(1, 2, "b:1")]
    assert reported(d) == {0: (S.REPLICA, True), 1: (S.REPLICA, True)}
    d = reconcile(d.agent, events=[Synced(1, 7), Synced(5, 1)])
    assert reported(d) == {0: (S.REPLICA, True), 1: (S.REPLICA, False)}


def test_failed_catch_up_retries_then_copies_afresh_unless_counted_in_sync():
    limits = Limits(max_bootstraps=2, max_copy_retries=1)
    copying = Plan(1, {0: Target(R, source="a:1", primary="a:1"), 1: Target(R, primary="a:1")})
    d = connected(plan=Plan(1, {0: Target(R, primary="b:1"), 1: Target(R, primary="b:1")}),
                  limits=limits)
    d = reconcile(d.agent, plan=copying, limits=limits)
    assert shard_actions(d) == [Repair(0, "a:1", 1), Repair(1, "a:1", 1)]
    d = reconcile(d.agent, events=[SyncFailed(0, "x"), SyncFailed(1, "x")], limits=limits)
    assert shard_actions(d) == [CatchUp(0, "a:1", "a:1", 1, 1), CatchUp(1, None, "a:1", 1, 1)]
    d = reconcile(d.agent, events=[SyncFailed(0, "x"), SyncFailed(1, "x")], limits=limits)
    # Shard 0 is not counted in sync by the plan: its data goes, a fresh copy follows.
    # Shard 1 is: it keeps every acknowledged write, and stays reported as catching up.
    assert shard_actions(d) == [StartDrop(0)]
    assert states(d.agent) == {0: S.DROPPING, 1: S.REPLICA} and syncing(d) == {1}
    d = reconcile(d.agent, events=[DropDone(0)], limits=limits)
    assert shard_actions(d) == [StartBootstrap(0, "a:1", 1)]


def test_fences_use_the_primarys_term_even_when_plans_were_skipped():
    d = connected(plan=Plan(1, {0: Target(R, primary="a:1", since=1), 1: Target(P, since=1)}))
    d = reconcile(d.agent, events=[Synced(0, 0)])
    # Generations 2-4 were never read: the primary changed at 4 (its term), read at 5.
    d = reconcile(d.agent, plan=Plan(5, {0: Target(R, primary="b:1", since=4),
                                         1: Target(R, primary="c:1", since=3)}))
    assert shard_actions(d) == [Repair(0, "b:1", 4), Demote(1, 3, "c:1")]
    assert d.agent.shards[1].generation == 3
    d = reconcile(d.agent, events=[Synced(0, 0), Synced(1, 0)])
    assert shard_actions(reconcile(d.agent, plan=Plan(6, {0: Target(R, primary="b:1", since=4),
                                                         1: Target(R, primary="c:1", since=3)}))
                         ) == []
    # The same primary in a new term: fence at it and repair, as for a new primary.
    d = reconcile(d.agent, plan=Plan(7, {0: Target(R, primary="b:1", since=7),
                                         1: Target(P, since=7)}))
    assert shard_actions(d) == [Repair(0, "b:1", 7), Promote(1, 7)]
    assert d.agent.shards[1].generation == 7


def test_a_primary_takes_a_new_term_from_the_plan():
    d = connected(plan=Plan(3, {0: Target(P)}))
    assert shard_actions(d) == [Promote(0, 3)], "no term in the plan: the plan's generation"
    d = reconcile(d.agent, plan=Plan(4, {0: Target(P, since=4)}))
    assert shard_actions(d) == [Promote(0, 4)]
    assert shard_actions(reconcile(d.agent, plan=Plan(5, {0: Target(P, since=4)}))) == []
    new = connected(plan=Plan(9, {0: Target(P, since=2), 1: Target(R, primary="a:1", since=5)}))
    assert shard_actions(new) == [Promote(0, 2), BecomeReplica(1, 9, "a:1")]
    assert new.agent.shards[1].term == 5


# -- properties --------------------------------------------------------------------------

SHARDS = range(5)
ADDRESSES = ("a:1", "b:1")

targets = st.builds(
    Target,
    role=st.sampled_from([P, R]),
    source=st.sampled_from([None, *ADDRESSES]),
    primary=st.sampled_from([None, *ADDRESSES]),
    since=st.integers(0, 8),
)
plans = st.builds(
    Plan,
    generation=st.integers(0, 8),
    targets=st.dictionaries(st.sampled_from(SHARDS), targets, max_size=len(SHARDS)),
)
events = st.one_of(
    st.builds(CopyDone, st.sampled_from(SHARDS), st.integers(0, 100)),
    st.builds(CopyFailed, st.sampled_from(SHARDS), st.just("boom")),
    st.builds(DropDone, st.sampled_from(SHARDS)),
    st.builds(PeerLost, st.sampled_from(ADDRESSES)),
    st.builds(Synced, st.sampled_from(SHARDS), st.integers(0, 100)),
    st.builds(SyncFailed, st.sampled_from(SHARDS), st.just("boom")),
)
steps = st.tuples(st.none() | plans, st.lists(events, max_size=4), st.sampled_from(list(Session)))
histories = st.lists(steps, min_size=1, max_size=25)
limit_sets = st.builds(Limits, st.integers(1, 3), st.integers(0, 3))


def run(history, limits):
    agent = AgentState()
    for plan, evs, session in history:
        decision = reconcile(agent, plan=plan, events=evs, session=session, limits=limits)
        yield agent, (plan, evs, session), decision
        agent = decision.agent


@settings(max_examples=200, deadline=None)
@given(histories, limit_sets)
def test_only_legal_transitions_and_they_chain(history, limits):
    for before, _inputs, decision in run(history, limits):
        current = {s: r.state for s, r in before.shards.items()}
        for t in decision.transitions:
            assert t.after in LEGAL_TRANSITIONS[t.before], t
            assert current.get(t.shard, S.OFFLINE) == t.before
            current[t.shard] = t.after
        after = states(decision.agent)
        for shard, state in current.items():
            assert after.get(shard, S.OFFLINE) == state


@settings(max_examples=200, deadline=None)
@given(histories, limit_sets)
def test_concurrent_bootstraps_are_bounded(history, limits):
    for _before, _inputs, decision in run(history, limits):
        copying = [s for s, st_ in states(decision.agent).items() if st_ == S.BOOTSTRAPPING]
        assert len(copying) <= limits.max_bootstraps


@settings(max_examples=150, deadline=None)
@given(histories, limit_sets)
def test_deterministic(history, limits):
    for before, (plan, evs, session), decision in run(history, limits):
        again = reconcile(before, plan=plan, events=evs, session=session, limits=limits)
        assert again == decision


@settings(max_examples=150, deadline=None)
@given(histories, limit_sets, plans)
def test_plans_older_than_the_applied_one_change_nothing(history, limits, old):
    for _before, (_plan, evs, session), decision in run(history, limits):
        agent = decision.agent
        if agent.plan is None or old.generation >= agent.plan.generation:
            continue
        with_old = reconcile(agent, plan=old, events=evs, session=session, limits=limits)
        without = reconcile(agent, plan=None, events=evs, session=session, limits=limits)
        assert with_old == without


@settings(max_examples=150, deadline=None)
@given(histories, limit_sets)
def test_actions_match_states_and_the_plan_is_followed(history, limits):
    writable = serving = False
    for _before, (_plan, _evs, session), decision in run(history, limits):
        after = states(decision.agent)
        for action in decision.actions:
            if isinstance(action, StartBootstrap):
                assert after[action.shard] == S.BOOTSTRAPPING
            elif isinstance(action, StartDrop):
                assert after[action.shard] == S.DROPPING
            elif isinstance(action, SetWritable):
                writable = action.writable
            elif isinstance(action, SetServing):
                serving = action.serving
        assert writable == (session == Session.CONNECTED)
        assert serving == (session != Session.LOST)
        unreported = [t for t in decision.transitions
                      if not (t.after == S.REPLICA and decision.agent.shards[t.shard].syncing)]
        assert unreported == [] or isinstance(decision.actions[-1], ReportStatus)
        if session == Session.LOST or decision.agent.plan is None:
            continue
        wanted = decision.agent.plan.targets
        for shard, state in after.items():
            if shard not in wanted:
                assert state == S.DROPPING, (shard, state)
            elif state in (S.REPLICA, S.PRIMARY):
                assert state == (S.PRIMARY if wanted[shard].role == P else S.REPLICA)


@settings(max_examples=200, deadline=None)
@given(histories, limit_sets)
def test_a_replica_counts_in_sync_only_after_its_handler_synced_it(history, limits):
    """Since the last lost session (or since it became a replica, or was told to repair), a
    replica the plan lists as copying is reported in sync only once a Synced event for it
    was folded in; and the report always matches the records."""
    clean: dict[int, bool] = {}
    for before, (_plan, evs, session), decision in run(history, limits):
        synced_now = {e.shard for e in evs if isinstance(e, Synced)}
        if session == Session.LOST and before.session != Session.LOST:
            clean = dict.fromkeys(clean, False)
        for shard, record in decision.agent.shards.items():
            was = before.shards.get(shard)
            if record.state != S.REPLICA:
                clean[shard] = False
            elif was is not None and was.state == S.REPLICA and was.syncing and (
                not record.syncing
            ):
                assert shard in synced_now, "only Synced ends syncing"
                clean[shard] = True
            elif record.syncing:
                clean[shard] = False
        for action in decision.actions:
            if isinstance(action, BecomeReplica | Demote | Repair | CatchUp):
                assert decision.agent.shards[action.shard].syncing
            if isinstance(action, ReportStatus):
                for e in action.shards:
                    assert e.catching_up == decision.agent.shards[e.shard].syncing
        plan = decision.agent.plan
        if session != Session.CONNECTED or plan is None:
            continue
        for shard, record in decision.agent.shards.items():
            target = plan.targets.get(shard)
            if record.state == S.REPLICA and target is not None and target.source is not None:
                assert record.syncing or clean.get(shard), (shard, record)


@settings(max_examples=200, deadline=None)
@given(histories, limit_sets)
def test_promotions_and_fences_follow_the_plans_term(history, limits):
    """A primary numbers its LSNs from, and a replica fences at, the term the plan gives
    (the plan's generation where it gives none), whatever plans the agent skipped."""
    for _before, (_plan, _evs, _session), decision in run(history, limits):
        plan = decision.agent.plan
        for action in decision.actions:
            if not isinstance(action, Promote | Repair | Demote):
                continue
            target = plan.targets[action.shard]
            assert action.generation == (target.since or plan.generation), (action, target)
            record = decision.agent.shards[action.shard]
            if isinstance(action, Promote):
                assert record.generation == action.generation
            else:
                assert record.term == action.generation
