"""`shardkeeper`: the admin CLI, and the entry point of the agent and coordinator roles.

Every command takes --zk and --cluster (or SHARDKEEPER_ZK / SHARDKEEPER_CLUSTER). Errors
meant for the operator are printed on one line and exit non-zero, without a traceback.
Commands live by theme: ``admin`` (state and steering), ``data`` (put/get/load/verify),
``roles`` (agent run, coordinator run), and ``shardkeeper.dev`` (the local dev cluster).
"""

from __future__ import annotations

import logging

import click

from shardkeeper.cli import admin, data, roles


class Commands(click.Group):
    """The commands, with `dev` loaded when first used: shardkeeper.dev.cluster imports the
    shared options from this package, so importing it from here at the top would make
    `import shardkeeper.dev.cluster` (before this package) fail half-initialised."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "dev"})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "dev":
            from shardkeeper.dev.cluster import dev

            return dev
        return super().get_command(ctx, name)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shardkeeper")
def main() -> None:
    """shardkeeper: a ZooKeeper-coordinated cluster manager.

    Agents hold shard replicas; an elected coordinator plans which agent holds which;
    this CLI shows and steers the cluster.
    """
    # kazoo logs each failed connection attempt; admin commands report one clear error
    # instead. `agent run` and `coordinator run` configure logging for themselves.
    logging.getLogger("kazoo").setLevel(logging.CRITICAL)


for _command in (*admin.COMMANDS, *data.COMMANDS, *roles.COMMANDS):
    main.add_command(_command)

if __name__ == "__main__":
    main()
