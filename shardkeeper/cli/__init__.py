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
from shardkeeper.dev.cluster import dev


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shardkeeper")
def main() -> None:
    """shardkeeper: a ZooKeeper-coordinated cluster manager.

    Agents hold shard replicas; an elected coordinator plans which agent holds which;
    this CLI shows and steers the cluster.
    """
    # kazoo logs each failed connection attempt; admin commands report one clear error
    # instead. `agent run` and `coordinator run` configure logging for themselves.
    logging.getLogger("kazoo").setLevel(logging.CRITICAL)


for _command in (*admin.COMMANDS, *data.COMMANDS, *roles.COMMANDS, dev):
    main.add_command(_command)

if __name__ == "__main__":
    main()
