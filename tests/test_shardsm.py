"""The pure shard state machine: example stories plus property tests over random histories."""

from __future__ import annotations

from dataclasses import replace

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
    DropFailed,
    Limits,
    PeerLost,
    Plan,
    Promote,
    Promoted,
    PromoteFailed,
    Repair,
    ReportStatus,
    Serve,
    Session,
    SetServing,
    SetWritable,
    ShardRecord,
    ShardReport,
    StartBootstrap,
    StartDrop,
    Synced,
    SyncFailed,
    Target,
    cancels,
    distrust,
    reconcile,
    replaces,
    serving,
    states,
    waiting_shards,
)
from shardkeeper.vocab import Role, ShardState

P, R = Role.PRIMARY, Role.REPLICA
S = ShardState


def plain(action):
    """An action without its work number (numbers are checked by their own tests)."""
    return replace(action, work=0) if hasattr(action, "work") else action


def shard_actions(decision):
    return [
        plain(a) for a in decision.actions
        if not isinstance(a, ReportStatus | SetWritable | SetServing)
    ]


def done(decision, event_type, shard, *args):
    """The event that the shard's latest action produces (it carries the action's work)."""
    return event_type(shard, *args, work=decision.agent.shards[shard].work)


def connected(agent=None, **kwargs):
    return reconcile(agent or AgentState(), session=Session.CONNECTED, **kwargs)


# -- stories -----------------------------------------------------------------------------


def test_new_cluster_opens_empty_shards_directly():
    d = connected(plan=Plan(1, {0: Target(P, term=1), 1: Target(R, 1, primary="b:1")}))
    assert states(d.agent) == {0: S.PRIMARY, 1: S.REPLICA}
    assert shard_actions(d) == [Promote(0, 1), BecomeReplica(1, 1, "b:1")]
    assert d.actions[-1] == ReportStatus(1, d.actions[-1].shards)


def test_first_connect_serves_after_shard_actions_and_fences_on_suspend():
    d = connected(plan=Plan(1, {0: Target(P, 1)}))
    assert plain(d.actions[0]) == Promote(0, 1)
    assert d.actions[1:3] == (SetServing(True), SetWritable(True))
    suspended = reconcile(d.agent, session=Session.SUSPENDED)
    assert suspended.actions == (SetWritable(False),)
    lost = reconcile(suspended.agent, session=Session.LOST)
    assert lost.actions == (SetServing(False),)
    back = reconcile(lost.agent, session=Session.CONNECTED)
    assert back.actions == (SetServing(True), SetWritable(True))


def test_bootstrap_then_online_then_promoted_then_dropped():
    d = connected(plan=Plan(2, {7: Target(R, 1, source="a:1", primary="a:1")}))
    assert shard_actions(d) == [StartBootstrap(7, "a:1")]
    d = reconcile(d.agent, events=[done(d, CopyDone, 7, 1234)])
    assert states(d.agent) == {7: S.REPLICA}
    assert shard_actions(d) == [BecomeReplica(7, 1, "a:1")]
    assert not any(isinstance(a, ReportStatus) for a in d.actions), "reported once synced"
    d = reconcile(d.agent, events=[done(d, Synced, 7, 0)])
    assert d.actions == (ReportStatus(2, (ShardReport(7, S.REPLICA, 1234),)),)
    d = reconcile(d.agent, plan=Plan(3, {7: Target(P, 3, peers=("a:1",))}))
    assert shard_actions(d) == [Promote(7, 3, ("a:1",))]
    d = reconcile(d.agent, plan=Plan(4, {7: Target(R, 4, primary="c:1")}))
    assert shard_actions(d) == [Demote(7, 4, "c:1")]
    d = reconcile(d.agent, plan=Plan(5, {}))
    assert shard_actions(d) == [StartDrop(7)] and states(d.agent) == {7: S.DROPPING}
    d = reconcile(d.agent, events=[done(d, DropDone, 7)])
    assert states(d.agent) == {}


def test_a_failed_drop_is_retried_with_backoff_until_it_is_done():
    """Issue 13: a drop that failed (its data could not be put aside on a full disk) left
    the shard DROPPING for good; the agent then never matched its plan."""
    d = connected(plan=Plan(1, {4: Target(R, 1, primary="a:1")}))
    d = reconcile(d.agent, events=[done(d, Synced, 4, 0)])
    d = reconcile(d.agent, plan=Plan(2, {}))
    assert shard_actions(d) == [StartDrop(4)]
    for attempt in (1, 2, 3):
        d = reconcile(d.agent, events=[done(d, DropFailed, 4, "OSError: no space left")])
        assert shard_actions(d) == [StartDrop(4, attempt=attempt)]
        assert states(d.agent) == {4: S.DROPPING}
    d = reconcile(d.agent, events=[done(d, DropDone, 4)])
    assert states(d.agent) == {}


def test_copy_done_goes_straight_to_primary_when_the_target_says_so():
    d = connected(plan=Plan(1, {0: Target(R, 1, source="a:1")}))
    d = reconcile(d.agent, plan=Plan(2, {0: Target(P, 2, source="a:1")}))
    d = reconcile(d.agent, events=[done(d, CopyDone, 0, 9)])
    assert states(d.agent) == {0: S.PRIMARY} and shard_actions(d) == [Promote(0, 2)]


def test_replica_repairs_when_its_primary_changes():
    d = connected(plan=Plan(1, {0: Target(R, 1, primary="a:1")}))
    d = reconcile(d.agent, plan=Plan(2, {0: Target(R, 2, primary="b:1")}))
    assert shard_actions(d) == [Repair(0, "b:1", 2)]
    # Nothing but the generation changed: a report that may wait (ACK_DELAY).
    assert reconcile(d.agent, plan=Plan(3, {0: Target(R, 2, primary="b:1")})).actions == (
        ReportStatus(3, d.actions[-1].shards, urgent=False),
    )


def test_failed_copies_retry_then_error_then_recover_on_a_newer_plan():
    limits = Limits(max_bootstraps=2, max_copy_retries=2)
    d = connected(plan=Plan(1, {0: Target(R, 1, source="a:1")}), limits=limits)
    d = reconcile(d.agent, events=[done(d, CopyFailed, 0, "timeout")], limits=limits)
    assert shard_actions(d) == [StartBootstrap(0, "a:1", attempt=1)]
    d = reconcile(d.agent, events=[PeerLost("a:1")], limits=limits)
    assert shard_actions(d) == [StartBootstrap(0, "a:1", attempt=2)]
    d = reconcile(d.agent, events=[done(d, CopyFailed, 0, "timeout")], limits=limits)
    assert states(d.agent) == {0: S.ERROR} and shard_actions(d) == []
    assert d.agent.shards[0].served is None, "a failed copy serves nothing"
    same = reconcile(d.agent, plan=Plan(1, {0: Target(R, 1, source="a:1")}), limits=limits)
    assert states(same.agent) == {0: S.ERROR}, "the same generation does not retry"
    d = reconcile(d.agent, plan=Plan(2, {0: Target(R, 1, source="b:1")}), limits=limits)
    assert states(d.agent) == {0: S.BOOTSTRAPPING}
    assert shard_actions(d) == [StartBootstrap(0, "b:1")]


def test_a_failed_copy_is_retried_by_a_newer_generation_with_the_very_same_target():
    """The shell carries unchanged targets over as the same objects; ERROR still resets
    under a newer generation (reconcile must not skip it as already followed)."""
    limits = Limits(max_bootstraps=2, max_copy_retries=0)
    target = Target(R, 1, source="a:1")
    d = connected(plan=Plan(1, {0: target}), limits=limits)
    d = reconcile(d.agent, events=[done(d, CopyFailed, 0, "timeout")], limits=limits)
    assert states(d.agent) == {0: S.ERROR}
    d = reconcile(d.agent, plan=Plan(1, {0: target}), limits=limits)
    assert states(d.agent) == {0: S.ERROR}, "the same generation does not retry"
    d = reconcile(d.agent, plan=Plan(2, {0: target}), limits=limits)
    assert states(d.agent) == {0: S.BOOTSTRAPPING}
    assert shard_actions(d) == [StartBootstrap(0, "a:1")]


def test_primary_change_during_a_copy_starts_it_over():
    d = connected(plan=Plan(1, {0: Target(R, 1, source="a:1", primary="a:1")}))
    d = reconcile(d.agent, plan=Plan(2, {0: Target(R, 2, source="b:1", primary="b:1")}))
    assert shard_actions(d) == [StartDrop(0)]
    d = reconcile(d.agent, events=[done(d, DropDone, 0)])
    assert shard_actions(d) == [StartBootstrap(0, "b:1")]


def test_new_source_restarts_the_copy_and_a_new_term_moves_its_fence():
    d = connected(plan=Plan(1, {0: Target(R, 1, source="a:1", primary="p:1")}))
    d = reconcile(d.agent, plan=Plan(2, {0: Target(R, 1, source="b:1", primary="p:1")}))
    assert shard_actions(d) == [StartBootstrap(0, "b:1")]
    d = reconcile(d.agent, plan=Plan(3, {0: Target(R, 3, source="b:1", primary="p:1")}))
    assert shard_actions(d) == [] and d.agent.shards[0].term == 3


def test_bootstraps_are_bounded_and_the_rest_wait_in_shard_order():
    plan = Plan(1, {s: Target(R, 1, source="a:1") for s in range(5)})
    d = connected(plan=plan, limits=Limits(max_bootstraps=2))
    assert [a.shard for a in shard_actions(d)] == [0, 1]
    assert waiting_shards(d.agent) == [2, 3, 4]
    d = reconcile(d.agent, events=[done(d, CopyDone, 1, 5)], limits=Limits(max_bootstraps=2))
    assert [type(a).__name__ for a in shard_actions(d)] == ["BecomeReplica", "StartBootstrap"]
    assert waiting_shards(d.agent) == [3, 4]


def test_stale_plan_and_stale_events_are_ignored():
    d = connected(plan=Plan(5, {0: Target(P, 5)}))
    stale = reconcile(d.agent, plan=Plan(4, {}), events=[done(d, CopyDone, 0, 1),
                                                         done(d, DropDone, 0)])
    assert stale.agent == d.agent and stale.actions == ()


def test_events_of_overtaken_work_are_ignored():
    """A copy cancelled by a drop, then started again: the first copy's late result must
    not complete the second."""
    d = connected(plan=Plan(1, {0: Target(R, 1, source="a:1", primary="a:1")}))
    first = done(d, CopyDone, 0, 10)
    d = reconcile(d.agent, plan=Plan(2, {}))
    d = reconcile(d.agent, events=[done(d, DropDone, 0)])
    d = reconcile(d.agent, plan=Plan(3, {0: Target(R, 1, source="a:1", primary="a:1")}))
    assert states(d.agent) == {0: S.BOOTSTRAPPING}
    late = reconcile(d.agent, events=[first])
    assert states(late.agent) == {0: S.BOOTSTRAPPING} and shard_actions(late) == []
    assert d.agent.work > first.work and d.agent.shards[0].work != first.work


def test_every_action_gets_a_new_work_number():
    d = connected(plan=Plan(1, {s: Target(R, 1, source="a:1") for s in range(3)}))
    works = [a.work for a in d.actions if hasattr(a, "work")]
    assert works == sorted(set(works)) and min(works) > 0
    assert {r.work for r in d.agent.shards.values()} == set(works)
    d = reconcile(d.agent, plan=Plan(2, {}))
    assert min(a.work for a in d.actions if hasattr(a, "work")) > max(works)


def test_lost_ignores_the_plan_until_reconnected():
    d = connected(plan=Plan(1, {0: Target(P, 1)}))
    lost = reconcile(d.agent, plan=Plan(2, {}), session=Session.LOST)
    assert states(lost.agent) == {0: S.PRIMARY}
    back = reconcile(lost.agent, plan=Plan(2, {}), session=Session.CONNECTED)
    assert states(back.agent) == {0: S.DROPPING}
    assert shard_actions(back) == [StartDrop(0)]


def syncing(decision):
    return {s for s, r in decision.agent.shards.items() if r.catching_up}


def reported(decision):
    """shard -> (state, catching_up) from the decision's status report."""
    report = decision.actions[-1]
    assert isinstance(report, ReportStatus)
    return {e.shard: (e.state, e.catching_up) for e in report.shards}


def test_replica_back_from_a_lost_session_catches_up_before_it_counts_in_sync():
    copying = Plan(1, {0: Target(R, 1, source="a:1", primary="a:1")})
    d = connected(plan=copying)
    d = reconcile(d.agent, events=[done(d, CopyDone, 0, 10)])
    d = reconcile(d.agent, events=[done(d, Synced, 0, 10)])
    assert reported(d) == {0: (S.REPLICA, False)}
    d = reconcile(d.agent, plan=Plan(2, {0: Target(R, 1, primary="a:1")}))  # joined
    assert shard_actions(d) == [] and syncing(d) == set()
    lost = reconcile(d.agent, session=Session.LOST)
    # The leader dropped it from the in-sync set meanwhile and lists it copying again,
    # from the same source: it missed the writes of its absence.
    back = reconcile(lost.agent, plan=Plan(4, {0: Target(R, 1, source="a:1", primary="a:1")}))
    assert shard_actions(back) == [CatchUp(0, "a:1", "a:1")]
    assert reported(back) == {0: (S.REPLICA, True)}
    again = reconcile(back.agent, plan=Plan(5, {0: Target(R, 1, source="a:1",
                                                          primary="a:1")}))
    assert shard_actions(again) == [], "one catch-up per absence"
    finished = reconcile(again.agent, events=[done(again, Synced, 0, 42)])
    assert reported(finished) == {0: (S.REPLICA, False)}
    assert finished.agent.shards[0].lsn == 42


def test_repair_and_demotion_report_catching_up_until_synced():
    d = connected(plan=Plan(1, {0: Target(R, 1, primary="a:1"), 1: Target(P, 1)}))
    d = reconcile(d.agent, events=[done(d, Synced, 0, 0)])
    d = reconcile(d.agent, plan=Plan(2, {0: Target(R, 2, primary="b:1"),
                                         1: Target(R, 2, primary="b:1")}))
    assert shard_actions(d) == [Repair(0, "b:1", 2), Demote(1, 2, "b:1")]
    assert reported(d) == {0: (S.REPLICA, True), 1: (S.REPLICA, True)}
    d = reconcile(d.agent, events=[done(d, Synced, 1, 7), Synced(5, 1)])
    assert reported(d) == {0: (S.REPLICA, True), 1: (S.REPLICA, False)}


def test_failed_catch_up_retries_then_copies_afresh_unless_counted_in_sync():
    limits = Limits(max_bootstraps=2, max_copy_retries=1)
    copying = Plan(1, {0: Target(R, 1, source="a:1", primary="a:1"),
                       1: Target(R, 1, primary="a:1")})
    d = connected(plan=Plan(1, {0: Target(R, 0, primary="b:1"), 1: Target(R, 0, primary="b:1")}),
                  limits=limits)
    d = reconcile(d.agent, plan=copying, limits=limits)
    assert shard_actions(d) == [Repair(0, "a:1", 1), Repair(1, "a:1", 1)]
    d = reconcile(d.agent, events=[done(d, SyncFailed, 0, "x"), done(d, SyncFailed, 1, "x")],
                  limits=limits)
    assert shard_actions(d) == [CatchUp(0, "a:1", "a:1", 1), CatchUp(1, None, "a:1", 1)]
    d = reconcile(d.agent, events=[done(d, SyncFailed, 0, "x"), done(d, SyncFailed, 1, "x")],
                  limits=limits)
    # Shard 0 is not counted in sync by the plan: its data goes, a fresh copy follows.
    # Shard 1 is: it keeps every acknowledged write, and stays reported as catching up.
    assert shard_actions(d) == [StartDrop(0)]
    assert states(d.agent) == {0: S.DROPPING, 1: S.REPLICA} and syncing(d) == {1}
    d = reconcile(d.agent, events=[done(d, DropDone, 0)], limits=limits)
    assert shard_actions(d) == [StartBootstrap(0, "a:1")]


def test_fences_use_the_primarys_term_even_when_plans_were_skipped():
    d = connected(plan=Plan(1, {0: Target(R, 1, primary="a:1"), 1: Target(P, 1)}))
    d = reconcile(d.agent, events=[done(d, Synced, 0, 0)])
    # Generations 2-4 were never read: the primary changed at 4 (its term), read at 5.
    d = reconcile(d.agent, plan=Plan(5, {0: Target(R, 4, primary="b:1"),
                                         1: Target(R, 3, primary="c:1")}))
    assert shard_actions(d) == [Repair(0, "b:1", 4), Demote(1, 3, "c:1")]
    assert d.agent.shards[1].term == 3
    d = reconcile(d.agent, events=[done(d, Synced, 0, 0), done(d, Synced, 1, 0)])
    assert shard_actions(reconcile(d.agent, plan=Plan(6, {0: Target(R, 4, primary="b:1"),
                                                         1: Target(R, 3, primary="c:1")}))
                         ) == []
    # The same primary in a new term: fence at it and repair, as for a new primary.
    d = reconcile(d.agent, plan=Plan(7, {0: Target(R, 7, primary="b:1"), 1: Target(P, 7)}))
    assert shard_actions(d) == [Repair(0, "b:1", 7), Promote(1, 7)]
    assert d.agent.shards[1].term == 7


def test_a_primary_takes_a_new_term_from_the_plan():
    d = connected(plan=Plan(3, {0: Target(P, 3)}))
    assert shard_actions(d) == [Promote(0, 3)]
    d = reconcile(d.agent, plan=Plan(4, {0: Target(P, 4)}))
    assert shard_actions(d) == [Promote(0, 4)]
    assert shard_actions(reconcile(d.agent, plan=Plan(5, {0: Target(P, 4)}))) == []
    new = connected(plan=Plan(9, {0: Target(P, 2), 1: Target(R, 5, primary="a:1")}))
    assert shard_actions(new) == [Promote(0, 2), BecomeReplica(1, 5, "a:1")]
    assert new.agent.shards[1].term == 5


# -- what is served --------------------------------------------------------------------


def served(decision):
    return serving(decision.agent, "me:1")


def test_a_copy_takes_forwards_at_once_and_serves_reads_only_once_synced():
    d = connected(plan=Plan(2, {3: Target(R, 1, source="a:1", primary="a:1")}))
    assert served(d) == {3: Serve(S.BOOTSTRAPPING, 1, "a:1")}
    d = reconcile(d.agent, events=[done(d, CopyDone, 3, 9)])
    assert served(d) == {3: Serve(S.BOOTSTRAPPING, 1, "a:1")}, "not a replica before Synced"
    d = reconcile(d.agent, events=[done(d, Synced, 3, 9)])
    assert served(d) == {3: Serve(S.REPLICA, 1, "a:1")}


def test_a_primary_takes_writes_only_once_promoted_and_refuses_them_once_demoted():
    d = connected(plan=Plan(4, {1: Target(P, 4, peers=("b:1",), bootstrapping=("c:1",))}))
    assert served(d) == {}, "no writes before the promotion point is recorded"
    d = reconcile(d.agent, events=[done(d, Promoted, 1, 5)])
    assert served(d) == {1: Serve(S.PRIMARY, 4, "me:1", ("b:1",), ("c:1",))}
    d = reconcile(d.agent, plan=Plan(6, {1: Target(R, 6, primary="b:1")}))
    # Demoted: writes refused at once, forwards only from the new primary's term.
    assert served(d) == {1: Serve(S.REPLICA, 6, "b:1")}


def test_a_replica_being_promoted_names_no_primary_so_clients_retry_rather_than_loop():
    """A hand-off: the old primary redirects to the new one at once, but the new one takes
    writes only once promoted; meanwhile it must not send clients back to the old one."""
    d = connected(plan=Plan(1, {2: Target(R, 1, primary="a:1")}))
    d = reconcile(d.agent, events=[done(d, Synced, 2, 0)])
    d = reconcile(d.agent, plan=Plan(5, {2: Target(P, 5, peers=("a:1",))}))
    assert shard_actions(d) == [Promote(2, 5, ("a:1",))]
    assert served(d) == {2: Serve(S.REPLICA, 5, None)}
    d = reconcile(d.agent, events=[done(d, Promoted, 2, 7)])
    assert served(d) == {2: Serve(S.PRIMARY, 5, "me:1", ("a:1",))}


def reports(decision):
    """shard -> catching_up, from the status report the decision issues (None if none)."""
    for action in decision.actions:
        if isinstance(action, ReportStatus):
            return {e.shard: e.catching_up for e in action.shards}
    return None


def test_a_primary_reports_itself_catching_up_until_its_promotion_is_done():
    """The leader drops none of a shard's replicas until its new primary pulled from them
    what it may lack: the promotion is reported, as a change, once it is done."""
    d = connected(plan=Plan(4, {1: Target(P, 4, peers=("b:1",))}))
    assert reports(d) == {1: True}
    d = reconcile(d.agent, events=[done(d, Promoted, 1, 5)])
    assert reports(d) == {1: False}


def test_a_failed_promotion_is_retried_and_never_serves():
    d = connected(plan=Plan(4, {1: Target(P, 4, peers=("b:1",))}))
    d = reconcile(d.agent, events=[done(d, PromoteFailed, 1, "disk full")])
    assert shard_actions(d) == [Promote(1, 4, ("b:1",), attempt=1)]
    assert served(d) == {}
    d = reconcile(d.agent, events=[done(d, Promoted, 1, 0)])
    assert served(d)[1].state == S.PRIMARY and d.agent.shards[1].attempts == 0


def test_a_replica_moves_its_fence_to_the_new_primary_at_once():
    d = connected(plan=Plan(1, {2: Target(R, 1, primary="a:1")}))
    d = reconcile(d.agent, events=[done(d, Synced, 2, 0)])
    d = reconcile(d.agent, plan=Plan(8, {2: Target(R, 8, primary="b:1")}))
    assert served(d) == {2: Serve(S.REPLICA, 8, "b:1")}, "the old primary is fenced off"
    d = reconcile(d.agent, plan=Plan(9, {}))
    assert served(d) == {}, "a drop stops serving at once"


def test_superseding_rules():
    copy, drop_ = StartBootstrap(1, "a:1"), StartDrop(1)
    repair, catch = Repair(1, "b:1", 2), CatchUp(1, "a:1", None)
    promote, demote = Promote(1, 3), Demote(1, 3, "b:1")
    assert cancels(drop_, copy) and cancels(copy, copy) and not cancels(demote, copy)
    assert cancels(promote, repair) and cancels(repair, catch)
    assert not cancels(copy, drop_) and not cancels(drop_, drop_)
    assert replaces(drop_, copy) and replaces(copy, repair) and replaces(promote, catch)
    assert not replaces(promote, demote) and not replaces(repair, promote)


# -- trusting a plan -------------------------------------------------------------------


def test_a_plan_is_trusted_only_if_a_leader_could_have_committed_it():
    applied = Plan(10, {}, epoch=3)
    ok = Plan(11, {}, epoch=3)
    assert distrust(ok, applied, epoch=4, committed=11) is None
    assert "older" in distrust(Plan(9, {}, 3), applied, epoch=4, committed=11)
    assert "epoch 2" in distrust(Plan(11, {}, 2), applied, epoch=4, committed=11)
    assert "past the current epoch" in distrust(Plan(11, {}, 9), applied, epoch=4, committed=11)
    forged = Plan(999_999_999, {}, 0)
    assert distrust(forged, None, epoch=4, committed=11) is not None
    assert "committed" in distrust(Plan(12, {}, 4), applied, epoch=4, committed=11)
    assert "cannot be read" in distrust(ok, applied, epoch=None, committed=11)
    assert distrust(ok, None, epoch=3, committed=11) is None


# -- properties --------------------------------------------------------------------------

SHARDS = range(5)
ADDRESSES = ("a:1", "b:1")

targets = st.builds(
    Target,
    role=st.sampled_from([P, R]),
    source=st.sampled_from([None, *ADDRESSES]),
    primary=st.sampled_from([None, *ADDRESSES]),
    term=st.integers(1, 8),
    peers=st.sampled_from([(), ADDRESSES[:1]]),
)
plans = st.builds(
    Plan,
    generation=st.integers(0, 8),
    targets=st.dictionaries(st.sampled_from(SHARDS), targets, max_size=len(SHARDS)),
)
# An event names its type, shard and payload; whether it answers the shard's latest work
# (``fresh``) or earlier work is drawn too, and bound to real work numbers in ``run``.
EVENT_TYPES = {
    CopyDone: st.integers(0, 100), CopyFailed: st.just("boom"), DropDone: st.none(),
    Synced: st.integers(0, 100), SyncFailed: st.just("boom"), Promoted: st.integers(0, 100),
    PromoteFailed: st.just("boom"),
}
events = st.one_of(
    st.builds(PeerLost, st.sampled_from(ADDRESSES)),
    st.tuples(st.sampled_from(list(EVENT_TYPES)), st.sampled_from(SHARDS), st.booleans())
    .flatmap(lambda t: st.tuples(st.just(t[0]), st.just(t[1]), EVENT_TYPES[t[0]],
                                 st.just(t[2]))),
)
steps = st.tuples(st.none() | plans, st.lists(events, max_size=4), st.sampled_from(list(Session)))
histories = st.lists(steps, min_size=1, max_size=25)
limit_sets = st.builds(Limits, st.integers(1, 3), st.integers(0, 3))


def bind(agent, event):
    """A drawn event as the shell would deliver it: with the shard's latest work number if
    fresh, else with an older one (a result of overtaken work)."""
    if isinstance(event, PeerLost):
        return event
    kind, shard, payload, fresh = event
    latest = agent.shards[shard].work if shard in agent.shards else 0
    work = latest if fresh else max(0, latest - 1)
    return kind(shard, work=work) if payload is None else kind(shard, payload, work=work)


def run(history, limits):
    agent = AgentState()
    for plan, drawn, session in history:
        evs = [bind(agent, e) for e in drawn]
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
                      if not (t.after == S.REPLICA and decision.agent.shards[t.shard].catching_up)]
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
            elif was is not None and was.state == S.REPLICA and was.catching_up and (
                not record.catching_up
            ):
                assert shard in synced_now, "only Synced ends syncing"
                clean[shard] = True
            elif record.catching_up:
                clean[shard] = False
        for action in decision.actions:
            if isinstance(action, BecomeReplica | Demote | Repair | CatchUp):
                assert decision.agent.shards[action.shard].catching_up
            if isinstance(action, ReportStatus):
                for e in action.shards:
                    assert e.catching_up == decision.agent.shards[e.shard].unsettled
        plan = decision.agent.plan
        if session != Session.CONNECTED or plan is None:
            continue
        for shard, record in decision.agent.shards.items():
            target = plan.targets.get(shard)
            if record.state == S.REPLICA and target is not None and target.source is not None:
                assert record.catching_up or clean.get(shard), (shard, record)


@settings(max_examples=200, deadline=None)
@given(histories, limit_sets)
def test_promotions_and_fences_follow_the_plans_term(history, limits):
    """A primary numbers its LSNs from, and a replica fences at, the term the plan gives,
    whatever plans the agent skipped; what is served always carries the record's term."""
    for _before, (_plan, _evs, _session), decision in run(history, limits):
        plan = decision.agent.plan
        for action in decision.actions:
            if isinstance(action, Promote | Repair | Demote):
                target = plan.targets.get(action.shard)
                if target is not None:  # (a retried promotion may outlive its target)
                    assert action.term == target.term, (action, target)
                assert decision.agent.shards[action.shard].term == action.term
        for shard, serve in serving(decision.agent, "me:1").items():
            record = decision.agent.shards[shard]
            assert serve.term == record.term and serve.state == record.served


@settings(max_examples=200, deadline=None)
@given(histories, limit_sets)
def test_work_numbers_grow_and_name_each_shards_latest_action(history, limits):
    for before, _inputs, decision in run(history, limits):
        works = [a.work for a in decision.actions if hasattr(a, "work")]
        assert works == sorted(works) and len(set(works)) == len(works)
        assert all(w > before.work for w in works) and decision.agent.work >= before.work
        last = {a.shard: a.work for a in decision.actions if hasattr(a, "work")}
        for shard, work in last.items():
            if shard in decision.agent.shards:
                assert decision.agent.shards[shard].work == work


@settings(max_examples=200, deadline=None)
@given(histories, limit_sets)
def test_only_finished_work_is_served(history, limits):
    """A replica is served as REPLICA only after a Synced, a primary as PRIMARY only after a
    Promoted, each for the shard's latest work; a copy serves (forwards) as it starts."""
    for before, (_plan, evs, _session), decision in run(history, limits):
        for shard, record in decision.agent.shards.items():
            was = before.shards.get(shard)
            if record.served == S.PRIMARY and (was is None or was.served != S.PRIMARY):
                assert record.state == S.PRIMARY
                assert any(isinstance(e, Promoted) and e.shard == shard for e in evs)
            if record.served == S.REPLICA and (was is None or was.served != S.REPLICA):
                # A replica synced in the same step as a plan that promotes it serves as a
                # replica while its promotion runs (the Promote is issued in this step).
                promoting = any(isinstance(a, Promote) and a.shard == shard
                                for a in decision.actions)
                assert record.state == S.REPLICA or (record.state == S.PRIMARY and promoting)
                demoted = was is not None and was.state == S.PRIMARY
                assert demoted or any(isinstance(e, Synced) and e.shard == shard for e in evs)
            if record.served is not None:
                assert record.state not in (S.OFFLINE, S.DROPPING, S.ERROR)


def test_what_the_machine_serves_is_the_data_planes_route_field_for_field():
    """The runtime copies a Serve into a ShardRoute field by field (per shard, per turn):
    a field added to one must be added to the other."""
    from dataclasses import fields

    from agents.dataplane.table import ShardRoute
    from agents.shardsm import Serve

    assert [f.name for f in fields(Serve)] == [f.name for f in fields(ShardRoute)]


# Histories whose plans carry some of the previous plan's Target objects over (as the
# shell does: an unchanged assignment keeps its target), under new generations too.
reused_steps = st.lists(
    st.tuples(st.none() | plans, st.lists(st.sampled_from(SHARDS), max_size=3),
              st.lists(events, max_size=4), st.sampled_from(list(Session))),
    min_size=1, max_size=25)


@settings(max_examples=300, deadline=None)
@given(reused_steps, limit_sets)
def test_skipping_what_was_followed_before_decides_as_following_everything(steps, limits):
    """reconcile skips shards whose record and target are the objects it followed last
    time; run in lockstep with a machine that forgets that (follows every shard), it
    must take the same decisions, including ERROR shards under a newer generation."""
    quick = full = AgentState()
    last_plan = None
    for drawn_plan, keep, drawn, session in steps:
        plan = drawn_plan
        if plan is not None and last_plan is not None:
            carried = {s: t for s, t in last_plan.targets.items() if s in keep}
            plan = Plan(plan.generation, {**plan.targets, **carried})
        evs = [bind(quick, e) for e in drawn]
        a = reconcile(quick, plan=plan, events=evs, session=session, limits=limits)
        b = reconcile(replace(full, followed={}), plan=plan, events=evs, session=session,
                      limits=limits)
        assert a.actions == b.actions and a.transitions == b.transitions
        assert a.agent == b.agent
        quick, full = a.agent, b.agent
        last_plan = plan if plan is not None else last_plan


@settings(max_examples=200, deadline=None)
@given(histories, limit_sets)
def test_a_change_the_leader_acts_on_is_reported_at_once(history, limits):
    """Only a report that acknowledges nothing but a new generation (or a copy starting,
    or a replica that still catches up) may wait; a state change the leader counts, or a
    finished sync, is reported urgently in the same decision."""
    for _before, _inputs, decision in run(history, limits):
        reports = [a for a in decision.actions if isinstance(a, ReportStatus)]
        counted = [t for t in decision.transitions
                   if t.after != S.BOOTSTRAPPING
                   and not (t.after == S.REPLICA and decision.agent.shards.get(
                       t.shard, ShardRecord()).catching_up)]
        if counted:
            assert reports and all(r.urgent for r in reports), (counted, reports)
        if reports and not reports[-1].urgent:
            assert not counted and decision.agent.plan is not None
            assert reports[-1].generation == decision.agent.plan.generation
