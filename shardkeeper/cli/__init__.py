"""`shardkeeper`: the admin CLI, and the entry point of the agent and coordinator roles.

Every command takes --zk and --cluster (or SHARDKEEPER_ZK / SHARDKEEPER_CLUSTER). Errors
meant for the operator are printed on one line and exit non-zero, without a traceback.
Commands live by theme: ``admin`` (state, pause, config, events, acl), ``steer`` (drain,
undrain, move, rebalance, the `plan` what-if), ``watch``, ``data`` (put/get/load/verify),
``roles`` (agent run, coordinator run), ``tokens`` (the data-plane tokens, their
rotation), and ``shardkeeper.dev`` (the local dev cluster).
"""

from __future__ import annotations

import logging

import click

from shardkeeper.cli import admin, data, roles, steer, tokens, watch


class Commands(click.Group):
    """The commands, with `dev` loaded when first used: shardkeeper.dev.cluster imports the
    shared options from this package, so importing it from here at the top would make
    `import shardkeeper.dev.cluster` (before this package) fail half-initialised."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "dev"})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "dev":
            from shardkeeper.dev.cluster import dev

            return show_envvars(dev)
        return super().get_command(ctx, name)


def show_envvars(command: click.Command, path: str = "") -> click.Command:
    """Give every option an environment variable, SHARDKEEPER_<COMMAND>_<OPTION> (e.g.
    SHARDKEEPER_DRAIN_TIMEOUT, SHARDKEEPER_DEV_UP_AGENTS, SHARDKEEPER_STATUS_JSON) unless
    it has one of its own (SHARDKEEPER_ZK, SHARDKEEPER_CLUSTER, SHARDKEEPER_LOG_LEVEL...),
    and let `--help` name it."""
    path = path or command.name or ""
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        if not param.envvar:
            flag = max(param.opts, key=len).lstrip("-")
            param.envvar = f"SHARDKEEPER_{path}_{flag}".upper().replace("-", "_")
        if "Env:" not in (param.help or ""):
            param.show_envvar = True
    for name, sub in getattr(command, "commands", {}).items():
        show_envvars(sub, f"{path}_{name}")
    return command


@click.group(cls=Commands, context_settings={
    "help_option_names": ["-h", "--help"],
    "show_default": True,
})
@click.version_option(package_name="shardkeeper")
def main() -> None:
    """shardkeeper: a ZooKeeper-coordinated cluster manager.

    Agents hold shard replicas; an elected coordinator plans which agent holds which;
    this CLI shows and steers the cluster.
    """
    # kazoo logs each failed connection attempt; admin commands report one clear error
    # instead. `agent run` and `coordinator run` configure logging for themselves.
    logging.getLogger("kazoo").setLevel(logging.CRITICAL)


for _command in (*admin.COMMANDS, *steer.COMMANDS, *watch.COMMANDS, *data.COMMANDS,
                 *roles.COMMANDS, *tokens.COMMANDS):
    main.add_command(show_envvars(_command))

if __name__ == "__main__":
    main()
