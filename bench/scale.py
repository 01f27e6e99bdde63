"""`python -m bench.scale [--json] [--profile]`: the leader at 1,000 agents and 100,000 shards.

The agents are simulated: a few kazoo sessions (250 agents each by default) register the
ephemeral member znodes with layout.MemberInfo and, once the first plan is written,
report a status znode per agent that holds exactly its planned replicas, as settled
agents would. The coordinator is real: a `coordinator run` process (or, with --profile,
coordinator.leader.Coordinator in a thread of this process under cProfile).

Measured:

* first plan: from the instant the config is created (the coordinator already leads and
  the members are registered) to plan/meta's mtime, i.e. the commit of the last multi;
* re-plan: one simulated agent leaves (its member and status znodes deleted in one
  transaction, as a session expiry does) to the mtime of the first plan/meta whose members
  exclude it;
* znodes and bytes written by that re-plan: every znode outside members/ and status/
  whose mzxid moved past the last zxid before the departure, up to the plan/meta commit,
  plus the znodes deleted; bytes are the new data lengths;
* changed_agents / changed_chunks: plan/agents znodes whose assignments differ (decoded,
  generation ignored) and routing chunks whose content differs, before vs after;
* the largest znode under the cluster root, members and statuses included.
"""

from __future__ import annotations

import cProfile
import io
import json
import logging
import os
import pstats
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click
from kazoo.client import KazooClient

from bench.common import (
    BenchTimeout,
    ClusterWatch,
    MetaSeen,
    Workspace,
    ZnodeStat,
    coordinator_argv,
    machine,
    rounded,
    table,
    wait_idle,
    walk,
    workspace,
)
from shardkeeper import cluster as clusterstate
from shardkeeper.config import ClusterConfig
from shardkeeper.layout import AgentPlan, AgentStatus, MemberInfo, Paths, RoutingChunk, ShardStatus
from shardkeeper.poll import poll_until
from shardkeeper.vocab import Role
from shardkeeper.zk import ZkTarget, close, connect, ensure_layout

CLUSTER = "scale"
CANDIDATE = "c1"
SIM_SESSION_TIMEOUT = 30.0  # simulated agents must not expire while ZooKeeper is busy
GOALS = {"first_plan_s": 10.0, "replan_s": 1.0, "largest_znode_bytes": 256 * 1024}


def progress(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# -- simulated agents --------------------------------------------------------------------


class SimulatedAgents:
    """Member (and later status) znodes of many agents, spread over a few sessions."""

    def __init__(self, target: ZkTarget, paths: Paths, agents: int, sessions: int):
        self.paths = paths
        self.ids = [f"sim{i:04d}" for i in range(agents)]
        self.clients = [
            connect(target, session_timeout=SIM_SESSION_TIMEOUT) for _ in range(sessions)
        ]
        self.owner = {a: self.clients[i % sessions] for i, a in enumerate(self.ids)}

    def close(self) -> None:
        for client in self.clients:
            close(client)

    def register(self) -> None:
        pending = []
        for i, agent in enumerate(self.ids):
            info = MemberInfo(
                id=agent, address=f"127.0.0.1:{20000 + i}", version="sim", started=time.time()
            )
            pending.append(
                self.owner[agent].create_async(
                    self.paths.member(agent), info.encode(), ephemeral=True
                )
            )
        for result in pending:
            result.get()

    def report(self, plans: dict[str, AgentPlan]) -> None:
        """Each agent reports holding exactly its planned replicas, as after settling."""
        pending = []
        for agent in self.ids:
            plan = plans.get(agent, AgentPlan(generation=0, epoch=0))
            shards = {
                s: ShardStatus("PRIMARY" if a.role == Role.PRIMARY else "REPLICA")
                for s, a in plan.replicas.items()
            }
            status = AgentStatus(agent, plan.generation, shards)
            pending.append(
                self.owner[agent].create_async(
                    self.paths.agent_status(agent), status.encode(), ephemeral=True
                )
            )
        for result in pending:
            result.get()

    def depart(self, agent: str) -> float:
        """Delete the agent's member and status znodes in one transaction; returns the
        instant just before it was sent."""
        tx = self.owner[agent].transaction()
        tx.delete(self.paths.member(agent))
        tx.delete(self.paths.agent_status(agent))
        at = time.time()
        tx.commit()
        return at


# -- the coordinator: a process, or a profiled thread ---------------------------------------


class ReconcileProfiler:
    """Profiles each reconcile of an in-process leader, filed under the current phase.

    Wraps LeaderTerm.reconcile (the leader's one planning step, run in the leader's own
    thread, where cProfile can see it), so the figures are those of the first plan and
    of the re-plan alone, not of the whole term.
    """

    def __init__(self) -> None:
        self.phase = "startup"
        self.profiles: dict[str, cProfile.Profile] = {}
        self.seconds: dict[str, list[float]] = {}
        self._original: Callable[..., Any] | None = None

    def install(self) -> None:
        from coordinator.leader import LeaderTerm

        original = LeaderTerm.reconcile
        self._original = original

        def reconcile(term: Any, *args: Any, **kwargs: Any) -> Any:
            phase = self.phase
            profile = self.profiles.setdefault(phase, cProfile.Profile())
            start = time.perf_counter()
            try:
                return profile.runcall(original, term, *args, **kwargs)
            finally:
                self.seconds.setdefault(phase, []).append(time.perf_counter() - start)

        LeaderTerm.reconcile = reconcile  # type: ignore[method-assign]

    def uninstall(self) -> None:
        from coordinator.leader import LeaderTerm

        if self._original is not None:
            LeaderTerm.reconcile = self._original  # type: ignore[method-assign]

    def report(self, phases: tuple[str, ...] = ("first_plan", "replan"), limit: int = 25) -> str:
        out = io.StringIO()
        for phase in phases:
            calls = self.seconds.get(phase, [])
            out.write(
                f"===== {phase}: {len(calls)} reconcile(s),"
                f" {', '.join(f'{c:.3f}s' for c in calls)} =====\n"
            )
            if phase in self.profiles:
                stats = pstats.Stats(self.profiles[phase], stream=out)
                stats.sort_stats("cumulative").print_stats(limit)
        return out.getvalue()


class CoordinatorUnderTest:
    """The leader: `coordinator run` as a process, or in-process with its reconciles
    profiled."""

    def __init__(self, ws: Workspace, profile: bool):
        self.ws = ws
        self.profiler = ReconcileProfiler() if profile else None
        self._coordinator: Any = None
        self._thread: threading.Thread | None = None
        self.pid = os.getpid()

    def start(self) -> None:
        if self.profiler is None:
            proc = self.ws.procs.start(
                CANDIDATE, coordinator_argv(self.ws.hosts, CLUSTER, CANDIDATE, 10.0)
            )
            self.pid = proc.pid
            return
        from coordinator.leader import Coordinator

        self.profiler.install()
        self._coordinator = Coordinator(self.ws.target, CLUSTER, CANDIDATE, session_timeout=10.0)
        self._thread = threading.Thread(target=self._coordinator.run, daemon=True)
        self._thread.start()

    def phase(self, name: str) -> None:
        if self.profiler is not None:
            self.profiler.phase = name

    def stop(self) -> None:
        if self._coordinator is not None and self._thread is not None:
            self._coordinator.stop()
            self._thread.join(30)
        if self.profiler is not None:
            self.profiler.uninstall()

    def wait_idle(self) -> None:
        """Until the leader (this whole process with --profile) is quiet: it has finished
        reacting, to statuses say, and a measurement starts from a quiet leader."""
        wait_idle(lambda: [self.pid], 120, "the coordinator to go idle")

    def report(self) -> str:
        return self.profiler.report() if self.profiler is not None else ""


# -- reading what the leader wrote --------------------------------------------------------


@dataclass(frozen=True)
class PlanZnodes:
    """The decoded plan/agents and plan/routing znodes, by name."""

    agents: dict[str, AgentPlan]
    chunks: dict[str, RoutingChunk]


def read_plan_znodes(client: KazooClient, paths: Paths) -> PlanZnodes:
    return PlanZnodes(
        agents=clusterstate.read_many(client, paths.plan_agents, AgentPlan.decode),
        chunks=clusterstate.read_many(client, paths.routing, RoutingChunk.decode),
    )


def changed(before: dict[str, Any], after: dict[str, Any], key: Callable[[Any], Any]) -> int:
    """Names whose content (as ``key`` sees it) differs, appeared or vanished."""
    names = set(before) | set(after)
    return sum(
        1 for n in names if n not in before or n not in after or key(before[n]) != key(after[n])
    )


def chunk_content(chunk: RoutingChunk) -> tuple[Any, ...]:
    return chunk.first, chunk.replicas, chunk.bootstrapping, chunk.targets


@dataclass(frozen=True)
class Written:
    znodes: int
    bytes: int
    by_kind: dict[str, int]
    after_commit: int  # written after the plan/meta commit, not counted above


def znode_kind(paths: Paths, path: str) -> str:
    for kind, prefix in (
        ("plan_agents", paths.plan_agents),
        ("routing", paths.routing),
        ("events", paths.events),
        ("meta", paths.plan_meta),
    ):
        if path == prefix or path.startswith(prefix + "/"):
            return kind
    return "other"


def written_between(
    paths: Paths, before: dict[str, ZnodeStat], after: dict[str, ZnodeStat], commit_zxid: int
) -> Written:
    since = max(s.mzxid for s in before.values())
    by_kind: dict[str, int] = {}
    count = size = late = 0
    for path, stat in after.items():
        if stat.mzxid <= since:
            continue
        if stat.mzxid > commit_zxid:
            late += 1
            continue
        count += 1
        size += stat.size
        kind = znode_kind(paths, path)
        by_kind[kind] = by_kind.get(kind, 0) + 1
    for path in set(before) - set(after):
        count += 1
        kind = znode_kind(paths, path) + "_deleted"
        by_kind[kind] = by_kind.get(kind, 0) + 1
    return Written(count, size, by_kind, late)


def leader_znodes(client: KazooClient, paths: Paths) -> dict[str, ZnodeStat]:
    """Every znode the leader may write: all of the cluster but members/ and status/."""
    return walk(client, paths.root, skip=(paths.members, paths.status))


# -- the scenario -----------------------------------------------------------------------------


def wait_meta(
    watch: ClusterWatch, since: int, accept: Callable[[Any], bool], timeout: float, what: str
) -> MetaSeen:
    trigger = watch.arm(lambda: watch.first_meta(since, accept))
    watch.wait_for(trigger, timeout, what)
    with watch.cond:
        seen = watch.first_meta(since, accept)
    assert seen is not None
    return seen


def run(opts: dict[str, Any], keep: bool) -> tuple[dict[str, Any], str]:
    agents, shards, replicas = opts["agents"], opts["shards"], opts["replicas"]
    paths = Paths(CLUSTER)
    with workspace("scale", heap_mb=opts["zk_heap_mb"], keep=keep) as ws:
        client = connect(ws.target, session_timeout=SIM_SESSION_TIMEOUT)
        sims = SimulatedAgents(ws.target, paths, agents, opts["sessions"])
        leader = CoordinatorUnderTest(ws, opts["profile"])
        try:
            ensure_layout(client, paths)
            watch = ClusterWatch(client, paths).start(statuses=False)
            t = time.time()
            sims.register()
            progress(
                f"{agents} members registered by {opts['sessions']} sessions"
                f" in {time.time() - t:.2f}s"
            )
            leader.start()
            poll_until(lambda: watch.epochs, 60, "the coordinator to lead", error=BenchTimeout)
            leader.wait_idle()

            mark = len(watch.metas)
            config = ClusterConfig(shards=shards, replicas=replicas)
            t_config = time.time()
            leader.phase("first_plan")
            client.create(paths.config, config.encode())
            first = wait_meta(
                watch, mark, lambda m: len(m.members) == agents, 300, "the first plan"
            )
            progress(f"first plan committed {first.committed - t_config:.2f}s after the config")

            leader.phase("statuses")
            plans = read_plan_znodes(client, paths)
            sims.report(plans.agents)
            leader.wait_idle()
            progress("statuses reported; the coordinator is idle")

            victim = sims.ids[len(sims.ids) // 2]
            before_stats = leader_znodes(client, paths)
            mark = len(watch.metas)
            leader.phase("replan")
            t_depart = sims.depart(victim)
            replan = wait_meta(
                watch, mark, lambda m: victim not in m.members, 120, f"a plan without {victim}"
            )
            after_stats = leader_znodes(client, paths)
            progress(f"re-plan committed {replan.committed - t_depart:.3f}s after {victim} left")
            leader.phase("after")
            after = read_plan_znodes(client, paths)
            everything = walk(client, paths.root)
        finally:
            leader.stop()
            sims.close()
            close(client)
    written = written_between(paths, before_stats, after_stats, replan.mzxid)
    largest = max(everything.items(), key=lambda kv: kv[1].size)
    result = {
        "agents": agents,
        "shards": shards,
        "replicas": replicas,
        "first_plan_s": rounded(first.committed - t_config, 3),
        "first_plan_created_s": rounded(first.meta.created - t_config, 3),
        "replan_s": rounded(replan.committed - t_depart, 3),
        "replan_created_s": rounded(replan.meta.created - t_depart, 3),
        "replan_observed_s": rounded(replan.observed - t_depart, 3),
        "znodes_written": written.znodes,
        "znodes_written_by_kind": written.by_kind,
        "znodes_written_after_commit": written.after_commit,
        "bytes_written": written.bytes,
        "largest_znode_bytes": largest[1].size,
        "largest_znode": largest[0].removeprefix(paths.root + "/"),
        "changed_agents": changed(plans.agents, after.agents, lambda p: p.replicas),
        "changed_chunks": changed(plans.chunks, after.chunks, chunk_content),
        "profiled": opts["profile"],
        "machine_at_end": machine(),
    }
    result["goals"] = goals(result)
    return result, leader.report()


def goals(r: dict[str, Any]) -> dict[str, bool]:
    return {
        "first_plan_s<=10": r["first_plan_s"] <= GOALS["first_plan_s"],
        "replan_s<=1": r["replan_s"] <= GOALS["replan_s"],
        "largest_znode<=256KiB": r["largest_znode_bytes"] <= GOALS["largest_znode_bytes"],
        "znodes_written<=changed_agents+changed_chunks+2": r["znodes_written"]
        <= r["changed_agents"] + r["changed_chunks"] + 2,
    }


def render(r: dict[str, Any]) -> str:
    ok = {True: "met", False: "NOT met"}
    g = r["goals"]
    rows = [
        ("figure", "value", "goal"),
        (
            "first plan, from config creation (s)",
            f"{r['first_plan_s']:.3f}",
            f"<= 10: {ok[g['first_plan_s<=10']]}",
        ),
        (
            "re-plan after one departure (s)",
            f"{r['replan_s']:.3f}",
            f"<= 1: {ok[g['replan_s<=1']]}",
        ),
        (
            "znodes written by the re-plan",
            str(r["znodes_written"]),
            f"<= {r['changed_agents']} + {r['changed_chunks']} + 2:"
            f" {ok[g['znodes_written<=changed_agents+changed_chunks+2']]}",
        ),
        ("bytes written by the re-plan", str(r["bytes_written"]), ""),
        (
            "largest znode (bytes)",
            f"{r['largest_znode_bytes']} ({r['largest_znode']})",
            f"<= 262144: {ok[g['largest_znode<=256KiB']]}",
        ),
    ]
    return "\n".join(
        [
            f"scale: {r['agents']} simulated agents, {r['shards']} shards, R={r['replicas']}"
            + (
                " (coordinator in-process, reconciles under cProfile: times inflated)"
                if r["profiled"]
                else ""
            ),
            table(rows),
            f"written by kind: {json.dumps(r['znodes_written_by_kind'], sort_keys=True)};"
            f" changed agents {r['changed_agents']}, changed chunks {r['changed_chunks']}",
            f"machine: {json.dumps(r['machine_at_end'])}",
        ]
    )


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--agents", type=click.IntRange(min=2), default=1000, show_default=True)
@click.option("--shards", type=click.IntRange(min=1), default=100_000, show_default=True)
@click.option("--replicas", type=click.IntRange(min=1), default=3, show_default=True)
@click.option(
    "--sessions",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="kazoo sessions that hold the simulated agents' znodes.",
)
@click.option("--zk-heap-mb", type=click.IntRange(min=128), default=1024, show_default=True)
@click.option(
    "--profile",
    is_flag=True,
    help="Run the coordinator in this process under cProfile; print the profile to stderr.",
)
@click.option("--keep", is_flag=True, help="Keep the temp dir (logs) for inspection.")
def main(as_json: bool, keep: bool, **opts: Any) -> None:
    """Time the leader's first plan and one re-plan at 1,000 agents and 100,000 shards."""
    # kazoo logs every reconnection at WARNING; the benchmark reports what matters.
    logging.getLogger("kazoo").setLevel(logging.CRITICAL)
    result, profile = run(opts, keep)
    if profile:
        print(profile, file=sys.stderr)
    click.echo(json.dumps(result, indent=2) if as_json else render(result))


if __name__ == "__main__":
    main()
