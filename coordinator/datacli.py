"""Data commands of `shardkeeper` (put, get, delete, load, verify): see issue 5."""

from __future__ import annotations

import click


def register(main: click.Group) -> None:
    """Add the data commands to the `shardkeeper` group."""
