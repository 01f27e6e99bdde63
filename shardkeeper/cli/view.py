"""What `shardkeeper status` and `watch` show, as text (pure: summaries in, lines out).

``status_text`` is the `status` page; ``frame`` the screen `watch` redraws on a terminal;
``change_line`` and ``event_line`` the lines `watch` prints instead when its output is a
file or a pipe: one line per change of state, one per audit event.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from shardkeeper.layout import AuditEvent
from shardkeeper.summary import pending

BAR_WIDTH = 30


def ago(seconds: float) -> str:
    """A short, human duration: 42s, 7m, 3h."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """``[#####-----]``: done out of total (a full bar when there is nothing to do)."""
    filled = width if total <= 0 else min(width, width * max(done, 0) // total)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def percent(done: int, total: int) -> str:
    return "100%" if total <= 0 else f"{100 * done // total}%"


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def down_note(m: Mapping[str, Any], now: float) -> str:
    if not m["down_since"]:
        return "(the leader has not seen it leave yet)"
    return f"since {clock(m['down_since'])} ({ago(now - m['down_since'])} ago)"


def member_note(m: Mapping[str, Any], now: float) -> str:
    if m["state"] == "down":
        return f"down for {ago(now - m['down_since'])}" if m["down_since"] else "down"
    if m["kept"]:
        return f"keeps {m['kept']}: no other eligible agent"
    return ""


def headline(s: Mapping[str, Any]) -> str:
    return (f"cluster {s['cluster']}  leader {s['leader'] or '(none)'}  epoch {s['epoch']}"
            f"  generation {s['generation']}")


def status_text(s: Mapping[str, Any], now: float | None = None) -> str:
    """The `shardkeeper status` page."""
    now = time.time() if now is None else now
    lines = [
        headline(s),
        f"shards {s['shards']}  replicas {s['replicas']}  under-replicated {s['under_replicated']}"
        f"  balance {s['balance']:.3f} (max/mean replicas per member, by weight)",
    ]
    if s["shortfall"]:
        lines.append(f"shortfall {s['shortfall']} replicas: fewer members than replicas")
    if s["moves"]["in_flight"] or s["moves"]["deferred"]:
        lines.append(f"moves: {s['moves']['in_flight']} copying, {s['moves']['deferred']}"
                     " waiting for the throttle")
    if s["catching_up"]:
        lines.append(f"catching up: {s['catching_up']} replicas repairing or fetching missed"
                     " writes")
    if s["unavailable"]:
        lines.append(f"UNAVAILABLE: {s['unavailable']} shards have no live in-sync replica")
    m = s["maintenance"]
    if m:
        lines.append(f"MAINTENANCE ({m['reason']}) since {clock(m['since'])}:"
                     f" {m['note'] or 'no note'}; no moves until `shardkeeper resume`")
    header = ("MEMBER", "ZONE", "WEIGHT", "REPLICAS", "PRIMARIES", "COPYING", "APPLIED",
              "STATE", "ADDRESS")
    rows = [header] + [
        (m["id"], m["zone"] or "-", "-" if m["weight"] is None else f"{m['weight']:g}",
         str(m["replicas"]), str(m["primaries"]), str(m["copying"]),
         str(m["applied_generation"] if m["applied_generation"] is not None else "-"),
         m["state"], down_note(m, now) if m["state"] == "down" else m["address"])
        for m in s["members"]
    ]
    lines += table(rows)
    if not s["members"]:
        lines.append("(no members: start agents with `shardkeeper agent run`)")
    return "\n".join(lines)


def event_line(e: AuditEvent, indent: str = "") -> str:
    return f"{indent}{clock(e.time)}  {e.kind:<19} {e.message}"


def frame(s: Mapping[str, Any], events: Sequence[AuditEvent], now: float,
          height: int = 40) -> list[str]:
    """The screen of `watch` on a terminal: state, progress, members (down ones too), what
    is pending, and the latest events; at most ``height`` lines."""
    progress = s["progress"]
    reasons = pending(s)
    moves = s["moves"]
    lines = [
        f"{headline(s)}  {clock(now)}",
        f"replicas in place {bar(progress['in_place'], progress['target'])}"
        f" {progress['in_place']}/{progress['target']}"
        f" {percent(progress['in_place'], progress['target'])}"
        if s["generation"] else "replicas in place: no plan yet",
        f"under-replicated {s['under_replicated']}  copying {moves['in_flight']}"
        f"  waiting {moves['deferred']}  catching up {s['catching_up']}"
        f"  balance {s['balance']:.3f}",
    ]
    if s["maintenance"]:
        lines.append(f"MAINTENANCE ({s['maintenance']['reason']}):"
                     f" {s['maintenance']['note'] or 'no note'}")
    status = (["stable: fully replicated, nothing in flight"] if not reasons
              else ["not stable:"] + [f"  {r}" for r in reasons[:4]])
    shown_events = list(events[-5:])
    tail = status + (["latest events:"] + [event_line(e, "  ") for e in shown_events]
                     if shown_events else [])
    rows = [("MEMBER", "ZONE", "STATE", "REPLICAS", "PRIMARIES", "COPYING", "")] + [
        (m["id"], m["zone"] or "-", m["state"], str(m["replicas"]), str(m["primaries"]),
         str(m["copying"]), member_note(m, now))
        for m in s["members"]
    ]
    room = max(2, height - len(lines) - len(tail) - 1)
    members = table(rows)
    if len(members) > room:
        # Down and busy members first: they are what an operator watches for.
        busy = [members[0]] + [line for line, m in zip(members[1:], s["members"], strict=True)
                               if m["state"] != "active" or m["copying"]]
        rest = [line for line in members[1:] if line not in busy]
        members = (busy + rest)[: room - 1] + [f"... {len(members) - room + 1} more members"]
    return lines + members + tail


def state_key(s: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a change line reports: when this changes, `watch` prints a line."""
    return (s["leader"], s["generation"], s["progress"]["in_place"], s["progress"]["target"],
            s["under_replicated"], s["moves"]["in_flight"], s["moves"]["deferred"],
            s["catching_up"], tuple((m["id"], m["state"]) for m in s["members"]),
            bool(s["maintenance"]))


def change_line(s: Mapping[str, Any], now: float) -> str:
    """One line of `watch` when its output is not a terminal."""
    states: dict[str, int] = {}
    for m in s["members"]:
        states[m["state"]] = states.get(m["state"], 0) + 1
    members = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "none"
    progress = s["progress"]
    verdict = "stable" if not pending(s) else "moving"
    return (f"{clock(now)} generation {s['generation']}  members {members}"
            f"  in place {progress['in_place']}/{progress['target']}"
            f"  under-replicated {s['under_replicated']}  copying {s['moves']['in_flight']}"
            f"  waiting {s['moves']['deferred']}  catching up {s['catching_up']}"
            f"  leader {s['leader'] or '(none)'}  {verdict}")
