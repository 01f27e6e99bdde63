"""The reconciler (pure): make-before-break, throttles, pause, failover, convergence."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.reconcile import Throttle, at_target, next_step, with_terms
from shardkeeper.plan import ShardPlan

AGENTS = [f"a{i}" for i in range(8)]


def caught_up_all(plan) -> set[tuple[str, int]]:
    """Agents that copy instantly: every bootstrap reports caught up at the next step."""
    return {(a, s) for s, p in enumerate(plan) for a, _ in p.bootstrapping}


DEFAULT = Throttle()


def drive(plan, target, live, throttle=DEFAULT, steps=200):
    """Step until converged; check the invariants of every step on the way."""
    for _ in range(steps):
        step = next_step(plan, target, live, caught_up_all(plan), throttle)
        check_step(plan, step, target, live, throttle)
        plan = step.plan
        if at_target(plan, target):
            return plan
    raise AssertionError("did not converge")


def check_step(before, step, target, live, throttle) -> None:
    before = tuple(before) + (ShardPlan(),) * (len(step.plan) - len(before))
    for s, (old, new) in enumerate(zip(before, step.plan, strict=True)):
        holders = new.holders
        assert len(holders) == len(set(holders)), f"shard {s}: duplicate agent {holders}"
        old_live = [a for a in old.replicas if a in live]
        if old.replicas and not old_live:
            assert new == old, "an unavailable shard is left alone"
            continue
        # Make-before-break: in-sync replicas only shrink by departures, or by drops that
        # keep at least the target's count.
        assert len(new.replicas) >= min(len(old_live), len(target[s])), (s, old, new)
        assert all(a in live for a in new.replicas) or not old.replicas
        for _, source in new.bootstrapping:
            assert source in new.replicas, "copies come from an in-sync replica"
    copies_in: dict[str, int] = {}
    for p in step.plan:
        for a, _ in p.bootstrapping:
            copies_in[a] = copies_in.get(a, 0) + 1
    started_total = sum(len(p.bootstrapping) for p in step.plan)
    before_total = sum(len(p.bootstrapping) for p in before)
    assert started_total <= max(throttle.max_moves_total, before_total)
    if throttle.paused:
        assert step.started == 0 and step.dropped == 0


def random_target(rnd: random.Random, agents, shards: int, r: int):
    return [tuple(rnd.sample(sorted(agents), min(r, len(agents)))) for _ in range(shards)]


def test_new_cluster_is_seeded_directly_without_copies() -> None:
    target = [("a0", "a1"), ("a1", "a2")]
    step = next_step([], target, {"a0", "a1", "a2"}, set())
    assert [p.replicas for p in step.plan] == target
    assert step.started == 0 and step.in_flight == 0


def test_a_move_copies_first_and_drops_the_old_replica_only_after_it_joined() -> None:
    plan = (ShardPlan(("a0", "a1")),)
    target = [("a0", "a2")]
    live = {"a0", "a1", "a2"}
    s1 = next_step(plan, target, live, set())
    assert s1.plan[0] == ShardPlan(("a0", "a1"), (("a2", "a0"),))
    s2 = next_step(s1.plan, target, live, set())  # not caught up yet: nothing changes
    assert s2.plan == s1.plan
    s3 = next_step(s2.plan, target, live, {("a2", 0)})
    assert s3.plan[0] == ShardPlan(("a0", "a2"))
    assert (s3.joined, s3.dropped) == (1, 1)


def test_primary_moves_to_a_caught_up_replica() -> None:
    plan = (ShardPlan(("a0", "a1")),)
    step = next_step(plan, [("a1", "a0")], {"a0", "a1"}, set())
    assert step.plan[0].replicas == ("a1", "a0") and step.promotions == 1


def test_dead_primary_fails_over_at_once_even_when_paused() -> None:
    plan = (ShardPlan(("a0", "a1", "a2")),)
    live = {"a1", "a2", "a3"}
    step = next_step(plan, [("a1", "a2", "a3")], live, set(), Throttle(paused=True))
    assert step.plan[0] == ShardPlan(("a1", "a2"))
    assert step.failovers == 1 and step.started == 0 and step.deferred == 1
    resumed = next_step(step.plan, [("a1", "a2", "a3")], live, set())
    assert resumed.plan[0].bootstrapping == (("a3", "a1"),)


def test_shard_with_no_live_in_sync_replica_is_left_alone() -> None:
    plan = (ShardPlan(("a0", "a1"), (("a2", "a0"),)), ShardPlan(("a2", "a3")))
    step = next_step(plan, [("a2", "a3"), ("a2", "a3")], {"a2", "a3"}, set())
    assert step.plan[0] == plan[0] and step.unavailable == (0,)
    assert step.plan[1] == plan[1]


def test_bootstrap_from_a_departed_source_is_repointed() -> None:
    plan = (ShardPlan(("a0", "a1"), (("a2", "a1"),)),)
    step = next_step(plan, [("a0", "a2")], {"a0", "a2"}, set())
    assert step.plan[0] == ShardPlan(("a0",), (("a2", "a0"),))


def test_throttle_bounds_copies_and_restores_redundancy_first() -> None:
    # Shards 0-3 move for balance; shard 4 lost a replica: it must copy first.
    plan = tuple(ShardPlan(("a0", "a1")) for _ in range(4)) + (ShardPlan(("a0",)),)
    target = [("a0", "a2")] * 4 + [("a0", "a3")]
    step = next_step(plan, target, {"a0", "a1", "a2", "a3"}, set(),
                     Throttle(max_moves_per_agent=10, max_moves_total=2))
    assert step.plan[4].bootstrapping == (("a3", "a0"),)
    assert step.started == 2 and step.deferred == 3
    per_agent = next_step(plan, target, {"a0", "a1", "a2", "a3"}, set(),
                          Throttle(max_moves_per_agent=1, max_moves_total=100))
    copies_into_a2 = sum(1 for p in per_agent.plan for a, _ in p.bootstrapping if a == "a2")
    assert copies_into_a2 == 1


def test_drain_keeps_redundancy_until_the_replacement_joins() -> None:
    plan = (ShardPlan(("a0", "a1", "a2")),)
    target = [("a0", "a1", "a3")]  # a2 is draining
    live = {"a0", "a1", "a2", "a3"}
    s1 = next_step(plan, target, live, set())
    assert s1.plan[0].replicas == ("a0", "a1", "a2")
    s2 = next_step(s1.plan, target, live, {("a3", 0)})
    assert s2.plan[0] == ShardPlan(("a0", "a1", "a3"))


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    shards=st.integers(1, 24),
    r=st.integers(1, 3),
    kill=st.integers(0, 2),
    per_agent=st.integers(1, 4),
    total=st.integers(1, 16),
)
def test_random_histories_converge_without_losing_redundancy(seed, shards, r, kill, per_agent,
                                                             total) -> None:
    rnd = random.Random(seed)
    live = set(AGENTS[:6])
    target = random_target(rnd, live, shards, r)
    plan = drive((), target, live)
    # Crash some agents, add others, and re-target: converge again, step by step.
    for victim in rnd.sample(sorted(live), kill):
        live.discard(victim)
    live |= set(rnd.sample(AGENTS[6:], rnd.randint(0, 2)))
    target = random_target(rnd, live, shards, r)
    throttle = Throttle(max_moves_per_agent=per_agent, max_moves_total=total)
    survivors = [p for p in plan if any(a in live for a in p.replicas)]
    if len(survivors) == len(plan):
        drive(plan, target, live, throttle, steps=500)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_determinism(seed) -> None:
    rnd = random.Random(seed)
    live = set(AGENTS)
    plan = tuple(ShardPlan(t) for t in random_target(rnd, live, 12, 2))
    target = random_target(rnd, live, 12, 2)
    caught = {(a, s) for s in range(12) for a in rnd.sample(AGENTS, 2)}
    one = next_step(plan, target, live, caught, Throttle(2, 5))
    two = next_step(plan, target, set(reversed(sorted(live))), set(caught), Throttle(2, 5))
    assert one == two


def test_drain_never_costs_redundancy_when_there_is_no_room() -> None:
    # Two agents, R=2, one draining: the target can hold only one replica.
    plan = (ShardPlan(("a0", "a1")),)
    step = next_step(plan, [("a0",)], {"a0", "a1"}, set(), min_in_sync=2)
    assert step.plan[0] == ShardPlan(("a0", "a1")) and step.dropped == 0
    # Lowering R lets it go.
    step = next_step(plan, [("a0",)], {"a0", "a1"}, set(), min_in_sync=1)
    assert step.plan[0] == ShardPlan(("a0",)) and step.dropped == 1


def test_terms_change_with_the_primary_and_only_then() -> None:
    before = (ShardPlan(("a", "b"), term=3), ShardPlan(("a", "b"), term=3), ShardPlan())
    after = (ShardPlan(("a", "c")), ShardPlan(("b",)), ShardPlan(("c", "a")), ShardPlan(()))
    stamped = with_terms(before, after, 7)
    assert [p.term for p in stamped] == [3, 7, 7, 0]
    assert [p.replicas for p in stamped] == [p.replicas for p in after]
    # A plan from before terms (0) gets one at once.
    assert with_terms((ShardPlan(("a",)),), (ShardPlan(("a",)),), 4)[0].term == 4


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32), shards=st.integers(1, 16), kills=st.integers(1, 3))
def test_terms_only_grow_and_follow_every_primary_change(seed, shards, kills) -> None:
    rnd = random.Random(seed)
    live = set(AGENTS)
    plan: tuple[ShardPlan, ...] = ()
    generation = 0
    for _ in range(kills + 1):
        target = random_target(rnd, live, shards, 3)
        for _ in range(60):
            generation += 1
            step = next_step(plan, target, live, caught_up_all(plan), Throttle(2, 8))
            stamped = with_terms(plan, step.plan, generation)
            for s, new in enumerate(stamped):
                old = plan[s] if s < len(plan) else ShardPlan()
                if new.primary is None:
                    continue
                if new.primary != old.primary:
                    assert new.term == generation, (s, old, new)
                else:
                    assert new.term == old.term > 0, (s, old, new)
            plan = stamped
            if at_target(plan, target):
                break
        live.discard(rnd.choice(sorted(live)))


def test_a_staged_shard_keeps_its_own_term_before_with_terms() -> None:
    """next_step alone must not mix up terms: every shard it touches keeps the term it had
    (once, each staged shard took the term of the last shard of an earlier loop)."""
    current = (ShardPlan(("a", "b"), term=3), ShardPlan(("b", "c"), term=5),
               ShardPlan(("c", "a"), term=9))
    # Every shard changes (a replica added), none of their primaries does.
    target = (("a", "b", "d"), ("b", "c", "d"), ("c", "a", "d"))
    step = next_step(current, target, {"a", "b", "c", "d"}, set())
    assert [p.bootstrapping for p in step.plan] == [(("d", "a"),), (("d", "b"),), (("d", "c"),)]
    assert [p.term for p in step.plan] == [3, 5, 9]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_next_step_changes_no_term(data) -> None:
    """Terms are with_terms' business: next_step returns every shard with its own term."""
    n = data.draw(st.integers(1, 12))
    live = set(AGENTS[:5])
    rows = [tuple(data.draw(st.permutations(AGENTS[:6]))[: data.draw(st.integers(0, 3))])
            for _ in range(n)]
    current = tuple(ShardPlan(r, term=data.draw(st.integers(1, 50)) if r else 0) for r in rows)
    target = [tuple(data.draw(st.permutations(sorted(live)))[:2]) for _ in range(n)]
    step = next_step(current, target, live, set())
    for before, after in zip(current, step.plan, strict=True):
        assert after.term == before.term


def test_a_failed_copy_is_re_pointed_or_issued_afresh() -> None:
    """A copy its agent reports failed never stays stuck: another in-sync source takes it
    over, or, with only one source, it is withdrawn for a step and issued again."""
    live = {"a", "b", "c", "d"}
    two = ShardPlan(("a", "b"), (("c", "a"),), term=2)
    step = next_step((two,), [("a", "b", "c")], live, set(), failed={("c", 0)})
    assert step.plan[0].bootstrapping == (("c", "b"),)
    assert step.retried == ((0, "c", "a", "b"),)
    one = ShardPlan(("a",), (("c", "a"),), term=2)
    step = next_step((one,), [("a", "c")], live, set(), failed={("c", 0)})
    assert step.plan[0].bootstrapping == () and step.retried == ((0, "c", "a", None),)
    again = next_step(step.plan, [("a", "c")], live, set())
    assert again.plan[0].bootstrapping == (("c", "a"),), "issued afresh the step after"
    # Failures of other shards or agents change nothing here.
    assert next_step((two,), [("a", "b", "c")], live, set(),
                     failed={("d", 0), ("c", 1)}).plan[0] == two


def test_a_leaving_agents_primaries_go_to_in_sync_replicas_even_when_paused() -> None:
    """The graceful hand-off: a leaving agent keeps its replicas but no primary; the new
    primary is a replica in sync now (the target's primary if it is one)."""
    plan = (ShardPlan(("a0", "a1", "a2"), term=3), ShardPlan(("a0", "a2"), (("a1", "a2"),)),
            ShardPlan(("a1", "a0"), term=5))
    target = [("a0", "a2", "a1"), ("a0", "a1", "a2"), ("a1", "a0")]
    live = {"a0", "a1", "a2"}
    step = next_step(plan, target, live, set(), Throttle(paused=True), leaving={"a0"})
    assert step.plan[0].replicas == ("a2", "a0", "a1"), "the target's next in-sync replica"
    assert step.plan[1].replicas == ("a2", "a0"), "a1 is still copying: not promoted"
    assert step.plan[1].bootstrapping == (("a1", "a2"),)
    assert step.plan[2].replicas == ("a1", "a0"), "not its primary: untouched"
    assert step.handoffs == 2 and step.dropped == 0 and step.started == 0
    terms = with_terms(plan, step.plan, 9)
    assert [t.term for t in terms] == [9, 9, 5], "a new primary takes a new term"


def test_a_hand_off_goes_only_to_a_replica_the_leaving_primary_knows_in_sync() -> None:
    """As for any handover from a live primary (issue 13's lost writes): the successor must
    be one the leaving primary forwards to with must-ack, else the hand-off waits."""
    plan = (ShardPlan(("a0", "a1", "a2"), term=3),)
    target = [("a1", "a2", "a0")]
    live = {"a0", "a1", "a2"}
    step = next_step(plan, target, live, set(), leaving={"a0"}, fenced={("a2", 0)})
    assert step.plan[0].replicas[0] == "a2", "a1 is not known in sync by a0: a2 takes it"
    assert step.handoffs == 1
    step = next_step(plan, target, live, set(), leaving={"a0"}, fenced=set())
    assert step.plan[0].replicas == ("a0", "a1", "a2"), "nobody fenced yet: it waits"
    assert step.handoffs == 0 and step.handovers_waiting == 1
    step = next_step(plan, target, live, set(), leaving={"a0"},
                     fenced={("a1", 0), ("a2", 0)})
    assert step.plan[0].replicas[0] == "a1", "the target's primary, once fenced"


def test_a_leaving_agent_keeps_a_primary_no_in_sync_replica_can_take() -> None:
    plan = (ShardPlan(("a0",), (("a1", "a0"),)), ShardPlan(("a0", "a1")))
    target = [("a0", "a1"), ("a0", "a1")]
    step = next_step(plan, target, {"a0", "a1"}, set(), leaving={"a0", "a1"})
    assert [p.primary for p in step.plan] == ["a0", "a0"]
    assert step.handoffs == 0


def test_no_copy_starts_into_a_leaving_agent_and_it_is_the_last_choice_of_source() -> None:
    plan = (ShardPlan(("a0", "a1")), ShardPlan(("a2", "a3")))
    target = [("a1", "a0", "a2"), ("a2", "a3", "a0")]
    live = {"a0", "a1", "a2", "a3"}
    step = next_step(plan, target, live, set(), leaving={"a0"})
    assert step.plan[0].bootstrapping == (("a2", "a1"),), "copied from a1, not from a0"
    assert step.plan[1].bootstrapping == (), "a0 is shutting down: no copy into it"
    assert step.plan[0].primary == "a1"


def test_a_handover_waits_until_the_primary_knows_its_successor() -> None:
    """bench.chaos lost acknowledged writes when a replica joined and was promoted while
    the old primary still ran an older plan: it forwarded to the new primary only best
    effort and kept acknowledging writes, alone, after the new primary had caught up;
    the new primary's repairs then removed them. A live primary hands over only to a
    replica it knows in sync (``fenced``), and is not dropped before."""
    live = {"a", "b", "c"}
    joining = ShardPlan(("a", "c"), (("b", "a"),), term=2)
    step = next_step((joining,), [("b", "c")], live, {("b", 0)}, fenced={("c", 0)})
    assert step.plan[0].replicas[0] == "a", "b joined; a does not know it in sync yet"
    assert step.handovers_waiting == 1 and step.joined == 1
    assert set(step.plan[0].replicas) == {"a", "b", "c"}, "a stays until b takes over"
    known = next_step(step.plan, [("b", "c")], live, set(), fenced={("b", 0), ("c", 0)})
    assert known.plan[0].replicas == ("b", "a", "c") and known.promotions == 1
    done = next_step(known.plan, [("b", "c")], live, set(), fenced={("a", 0), ("c", 0)},
                     settled={("b", 0)})
    assert done.plan[0].replicas == ("b", "c") and done.dropped == 1
    # Without the check (None), the old behaviour: join and promote in one step.
    assert next_step((joining,), [("b", "c")], live, {("b", 0)}).plan[0].replicas[0] == "b"


def test_dropping_a_primary_hands_over_only_to_a_fenced_replica() -> None:
    live = {"a", "b", "c", "d"}
    over = ShardPlan(("a", "b", "c", "d"), term=2)
    step = next_step((over,), [("b", "c", "d")], live, set(), fenced={("c", 0)})
    assert step.plan[0].replicas[0] == "a", "b would take over unknown to a"
    step = next_step((over,), [("b", "c", "d")], live, set(),
                     fenced={("b", 0), ("c", 0), ("d", 0)})
    assert step.plan[0].replicas == ("b", "a", "c", "d"), "a stays while b takes over"
    step = next_step(step.plan, [("b", "c", "d")], live, set(), settled={("b", 0)})
    assert step.plan[0].replicas == ("b", "c", "d")


def test_no_replica_leaves_until_a_new_primary_reports_its_promotion_done() -> None:
    """bench.chaos rolled back acknowledged writes: a replica joined the in-sync set
    lacking writes acked while it copied (they reach a copy only best effort, and the
    primary pushes the gap only with its next write), was promoted, and the old primary,
    the one holder of those writes, was dropped in the same step. The new primary pulls
    what it lacks from the replicas its plan names; the old one must be among them."""
    live = {"a", "b", "c", "d"}
    moving = ShardPlan(("a", "b", "c", "d"), term=2)
    target = [("d", "b", "c")]
    step = next_step((moving,), target, live, set(), fenced={("b", 0), ("c", 0), ("d", 0)},
                     settled={("a", 0)})
    assert step.plan[0].replicas == ("d", "a", "b", "c") and step.dropped == 0
    # d reports at its new plan, but still promoting: nothing leaves yet.
    waiting = next_step(step.plan, target, live, set(), settled=set())
    assert waiting.plan[0].replicas == ("d", "a", "b", "c") and waiting.dropped == 0
    # Its promotion is done: the old primary goes.
    done = next_step(step.plan, target, live, set(), settled={("d", 0)})
    assert done.plan[0].replicas == ("d", "b", "c") and done.dropped == 1
    # A failover changes the primary too: a surplus replica stays for that step.
    failed = next_step((ShardPlan(("a", "b", "c", "d"), term=2),), [("b", "c")],
                       {"b", "c", "d"}, set(), settled={("a", 0), ("b", 0)})
    assert failed.plan[0].replicas == ("b", "c", "d") and failed.dropped == 0


def test_a_failover_prefers_a_survivor_the_old_primary_knew_in_sync() -> None:
    live = {"b", "c"}
    plan = ShardPlan(("a", "b", "c"), term=2)
    step = next_step((plan,), [("b", "c")], live, set(), fenced={("c", 0)})
    assert step.plan[0].replicas[0] == "c" and step.failovers == 1
    assert next_step((plan,), [("b", "c")], live, set()).plan[0].replicas[0] == "b"
