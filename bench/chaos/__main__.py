"""`python -m bench.chaos [--seed N] [--duration S] [--json]` (see bench/chaos/__init__.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import click

from bench.chaos.fleet import FleetOptions
from bench.chaos.nemesis import KINDS
from bench.chaos.run import RunOptions, progress, run
from bench.chaos.workload import WorkloadOptions


@click.command()
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--duration", type=click.FloatRange(min=5), default=120.0, show_default=True,
              help="Seconds of faults (then healing, convergence and the checks).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--kinds", default=",".join(KINDS), show_default=False,
              help="Comma-separated fault kinds (default: all).")
@click.option("--mean-gap", type=click.FloatRange(min=0.5), default=4.0, show_default=True,
              help="Mean seconds between faults after each kind has run once.")
@click.option("--max-active", type=click.IntRange(min=1), default=3, show_default=True,
              help="Faults active at once at most.")
@click.option("--agents", type=click.IntRange(min=5), default=6, show_default=True)
@click.option("--shards", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--preload-keys", type=click.IntRange(min=0), default=40_000, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=4, show_default=True,
              help="Client threads doing puts, deletes and reads.")
@click.option("--readers", type=click.IntRange(min=0), default=1, show_default=True,
              help="Client threads doing only reads.")
@click.option("--keep", is_flag=True, help="Keep the run's directory (logs, data).")
@click.option("--verbose", is_flag=True, help="Log each fault as it starts and ends.")
def main(seed: int, duration: float, as_json: bool, kinds: str, mean_gap: float,
         max_active: int, agents: int, shards: int, preload_keys: int, threads: int, readers: int,
         keep: bool, verbose: bool) -> None:
    """Faults against a real cluster; exit 0 only if nothing acknowledged was lost, no read
    was stale, and the cluster converged with equal replicas."""
    if os.geteuid() != 0:
        raise click.ClickException("needs root: network namespaces and a tmpfs mount")
    chosen = tuple(k.strip() for k in kinds.split(",") if k.strip())
    unknown = sorted(set(chosen) - set(KINDS))
    if unknown:
        raise click.BadParameter(f"unknown kinds {unknown}; known: {', '.join(KINDS)}")
    # SIGTERM (a harness's timeout) unwinds like Ctrl-C, so every finally block cleans up.
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("kazoo").setLevel(logging.ERROR)
    opts = RunOptions(seed=seed, duration=duration, kinds=chosen, mean_gap=mean_gap,
                      max_active=max_active, preload_keys=preload_keys, keep=keep,
                      fleet=FleetOptions(agents=agents, shards=shards),
                      workload=WorkloadOptions(threads=threads, readers=readers))
    report = run(opts)
    if as_json:
        print(json.dumps(report, sort_keys=True))
    else:
        print_report(report)
    sys.exit(0 if report["ok"] else 1)


def _interrupt(*_args: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


def print_report(r: dict) -> None:
    print(f"seed {r['seed']}  {r['duration_s']:g}s of faults  {r['ops']} ops  {r['acked']} acked"
          f"  {r['unknown']} unknown  lost {r['lost']}  stale reads {r['stale_reads']}")
    print(f"converged {r['converged']} ({r['converge_s']}s)  verify {r['verify_ok']}"
          f"  stuck {r['stuck_replicas']}  unexpected exits {r['unexpected_exits']}"
          f"  longest write gap {r['longest_write_gap_s']}s"
          f"  read gap {r['longest_read_gap_s']}s")
    print(f"{'fault':18} {'count':>5} {'gap s':>6} {'read s':>6} {'write s':>7}"
          f" {'unknown':>7}"
          f" {'left':>4} {'copies':>6}  recovery s")
    for kind, k in r["per_kind"].items():
        print(f"{kind:18} {k['count']:5} {k['worst_gap_s']:6.2f} {k['worst_read_gap_s']:6.2f}"
              f" {k['worst_write_s']:7.2f}"
              f" {k['unknown_writes']:7} {k['departures']:4} {k['copies']:6}"
              f"  {k['recovery_s']} {'; '.join(k['notes'])}")
    for name, items in r["details"].items():
        if items and name not in ("logs", "audit_events", "agents", "fault_log"):
            print(f"{name}: {items}")
    logs = r["details"]["logs"]
    print(f"logs: {logs['tracebacks']} tracebacks, {logs['error_lines']} ERROR lines")
    for line in logs["error_examples"]:
        print(f"  {line}")
    progress("ok" if r["ok"] else "FAILED")


if __name__ == "__main__":
    main()
