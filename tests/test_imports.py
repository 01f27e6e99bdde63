"""The rooms of the house, held to their rules by walking every import.

- ``agents`` (the agent role) never imports ``coordinator`` (the leader role), nor the
  reverse: the roles meet only in the contracts of ``shardkeeper``.
- ``shardkeeper``'s contract modules import neither role; only the CLI and the dev
  cluster, which sit on top of everything, may.
- The pure cores (placement, reconcile, policy, decide, writes, the shard state machine)
  import no ZooKeeper client, socket, thread or clock.
- No module outside the tests is longer than MAX_LINES.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shardkeeper", "coordinator", "agents")
MAX_LINES = 800
# Modules of shardkeeper that may import the roles: they run them.
ON_TOP = ("shardkeeper.cli", "shardkeeper.dev", "shardkeeper.__main__")
PURE = (
    "coordinator.placement",
    "coordinator.reconcile",
    "coordinator.policy",
    "coordinator.decide",
    "coordinator.recover",
    "coordinator.writes",
    "agents.shardsm",
    "shardkeeper.plan",
    "shardkeeper.ring",
    "shardkeeper.vocab",
)
IMPURE = ("kazoo", "socket", "threading", "time", "http", "sqlite3", "subprocess", "os",
          "select", "urllib")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports, anywhere in it (function-level imports count)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


MODULES = modules()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_rooms_keep_their_doors(name: str) -> None:
    used = imports(MODULES[name], name)
    if under(name, "agents"):
        assert not any(under(m, "coordinator") for m in used), f"{name} imports the leader"
    if under(name, "coordinator"):
        assert not any(under(m, "agents") for m in used), f"{name} imports the agent"
    if under(name, "shardkeeper") and not any(under(name, top) for top in ON_TOP):
        bad = sorted(m for m in used if under(m, "agents") or under(m, "coordinator"))
        assert not bad, f"contract module {name} imports a role: {bad}"
        assert not any(under(m, top) for m in used for top in ON_TOP), (
            f"contract module {name} imports the CLI or the dev cluster")


@pytest.mark.parametrize("name", sorted(n for n in MODULES if any(under(n, p) for p in PURE)))
def test_pure_cores_do_no_io(name: str) -> None:
    used = imports(MODULES[name], name)
    bad = sorted(m for m in used if any(under(m, i) for i in IMPURE))
    assert not bad, f"{name} is a pure core but imports {bad}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_too_large_to_hold_in_ones_head(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines (split it by what it decides)"


def test_the_walk_finds_the_rooms() -> None:
    """Guards the test itself: a broken walk would pass every rule above."""
    assert {"coordinator.leader", "agents.runtime", "shardkeeper.layout"} <= set(MODULES)
    assert "shardkeeper.layout" in imports(MODULES["coordinator.leader"], "coordinator.leader")
