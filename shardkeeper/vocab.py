"""The words of the system, defined once: shard states, replica roles and the errors
that reach a person.

One word per idea, the same in code, znodes, CLI output, logs and docs:

- **member**: an agent registered in ``members/<id>``; **shard**: one of S fixed token
  ranges; **replica**: a copy of a shard on an agent; the **primary** is the replica
  that takes writes, the others follow it.
- **plan** and **generation**: the leader's desired state and its version number, bumped
  on every plan write. **epoch**: the leader's fencing number (the ``epoch`` znode's
  version), bumped on every leadership win.
- **term**: a shard primary's fencing number: the plan generation that made it primary.
  LSNs carry it in their high bits; replicas accept forwards only at the term their
  own plan gives the primary.
- **bootstrapping**: a replica copying the shard from a named source; **catching up**: a
  replica that holds the shard but must fetch writes it missed (a repair after a new
  primary, a return after a lost session) before it counts as **in sync**.
- **move**: a replica changing agent, make-before-break; **drain**: moving every replica
  off an agent; **status**: what an agent reports it actually holds.
"""

from __future__ import annotations

from enum import StrEnum


class ShardState(StrEnum):
    """A replica's state on its agent (the agent's shard state machine, agents.shardsm)."""

    OFFLINE = "OFFLINE"
    BOOTSTRAPPING = "BOOTSTRAPPING"
    REPLICA = "REPLICA"
    PRIMARY = "PRIMARY"
    DROPPING = "DROPPING"
    ERROR = "ERROR"


# States in which an agent holds a whole copy of the shard.
HOLDING = frozenset({ShardState.REPLICA, ShardState.PRIMARY})


class Role(StrEnum):
    """What the plan asks of a replica."""

    PRIMARY = "primary"
    REPLICA = "replica"


class ShardkeeperError(Exception):
    """An error with a message meant for the operator; the CLI prints it on one line."""


class CorruptZnode(ValueError):
    """A znode's content could not be decoded; the message names the path and the reason."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and why."""
