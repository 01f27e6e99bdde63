"""docker-compose.yml: every shardkeeper command it runs exists in the CLI as written."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import click
import pytest
import yaml

from shardkeeper.cli import main

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.yml"


def shardkeeper_services() -> dict[str, dict]:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    return {name: s for name, s in services.items() if s.get("image") == "shardkeeper:local"}


def parse(argv: list[str]) -> click.Command:
    """Parse argv exactly as `shardkeeper` would; raises click errors on unknown options."""
    command: click.Command = main
    ctx = main.make_context("shardkeeper", list(argv))
    args = unparsed(ctx)
    while isinstance(command, click.Group) and args:
        _, command, args = command.resolve_command(ctx, args)
        ctx = command.make_context(command.name, args, parent=ctx)
        args = unparsed(ctx) if isinstance(command, click.Group) else []
    return command


def unparsed(ctx: click.Context) -> list[str]:
    """A group's subcommand and its arguments (click 8.2 moved them to _protected_args)."""
    protected = vars(ctx).get("_protected_args", vars(ctx).get("protected_args", []))
    return [*protected, *ctx.args]


def test_compose_has_an_ensemble_coordinators_and_agents() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert [n for n, s in services.items() if s.get("image") == "zookeeper:3.8"] == [
        "zk1", "zk2", "zk3"]
    roles = [s["command"][0] for s in shardkeeper_services().values()]
    assert roles.count("coordinator") == 2 and roles.count("agent") == 3
    for name, s in services.items():
        if name != "init":
            assert "healthcheck" in s, f"{name} has no health check"


@pytest.mark.parametrize("service", sorted(shardkeeper_services()))
def test_every_command_and_option_exists(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s = shardkeeper_services()[service]
    for key, value in s.get("environment", {}).items():
        monkeypatch.setenv(key, str(value))
    command = parse(s["command"])
    assert command.callback is not None
    health = s.get("healthcheck", {}).get("test", [])
    if health[:2] == ["CMD", "shardkeeper"]:
        parse(health[2:])


def test_parse_rejects_an_unknown_option() -> None:
    with pytest.raises(click.NoSuchOption):
        parse(["agent", "run", "--id", "a", "--listen", "h:1", "--data-dir", "/d", "--nope"])


def engine_running() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.mark.skipif(not engine_running() or shutil.which("docker") is None,
                    reason="needs a running Docker engine")
def test_compose_config_is_valid_for_the_engine() -> None:
    r = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
