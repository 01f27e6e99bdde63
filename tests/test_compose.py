"""docker-compose.yml: every shardkeeper command it runs exists in the CLI as written, and
no secret has a default: compose refuses to start until the operator sets them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import click
import pytest
import yaml

from shardkeeper.cli import main

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.yml"
# What an operator exports before `docker compose up` (the test's stand-ins).
SECRETS = {"SHARDKEEPER_TOKEN": "test-token", "SHARDKEEPER_ZK_AUTH": "compose:test-password"}
SECRET_NAME = re.compile(r"TOKEN|AUTH|PASSWORD|SECRET|KEY")
VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env and (env[name] or op not in (":-", ":?")):
            return env[name]
        if op in (":?", "?"):
            raise ValueError(f"{name}: {arg}")
        return arg if op in (":-", "-") else ""

    return VARIABLE.sub(one, value)


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
        monkeypatch.setenv(key, interpolate(str(value), SECRETS))
    command = parse(s["command"])
    assert command.callback is not None
    health = s.get("healthcheck", {}).get("test", [])
    if health[:2] == ["CMD", "shardkeeper"]:
        parse(health[2:])


def test_secrets_are_required_and_have_no_default() -> None:
    services = shardkeeper_services()
    assert services
    for name, s in services.items():
        env = s.get("environment", {})
        assert set(SECRETS) <= set(env), f"{name} lacks a secret"
        for key, value in env.items():
            if SECRET_NAME.search(key):
                m = VARIABLE.fullmatch(str(value))
                assert m and m.group(1) == key and m.group(2) == ":?", f"{name}: {key}={value}"
                with pytest.raises(ValueError):
                    interpolate(str(value), {})
    # Nowhere in the file (comments, health checks, other services) a fallback secret.
    text = COMPOSE.read_text()
    for m in VARIABLE.finditer(text):
        if SECRET_NAME.search(m.group(1)):
            assert m.group(2) in (":?", "?"), f"default for {m.group(1)}: {m.group(0)}"
    assert "change-me" not in text


def test_interpolate_follows_compose() -> None:
    assert interpolate("${A:-x}", {}) == "x" and interpolate("${A:-x}", {"A": ""}) == "x"
    assert interpolate("${A-x}", {"A": ""}) == "" and interpolate("${A}", {"A": "v"}) == "v"
    with pytest.raises(ValueError, match="A: set it"):
        interpolate("${A:?set it}", {"A": ""})


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


def test_init_runs_without_force_and_every_role_waits_for_it() -> None:
    """`docker compose up` runs init every time: it must be idempotent (no --force, which
    could reset policies), and no role may start before it completed."""
    services = shardkeeper_services()
    assert "--force" not in services["init"]["command"]
    for name, service in services.items():
        if name == "init":
            continue
        assert service["depends_on"] == {"init": {"condition": "service_completed_successfully"}}
