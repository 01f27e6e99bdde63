"""Cluster configuration: the one place that validates it.

``shards`` and ``replicas`` are set by `shardkeeper init`; the policy knobs have defaults
and are changed at run time with `shardkeeper config set KEY=VALUE`.
"""

from __future__ import annotations

import decimal
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from shardkeeper.layout import decode_object, encode
from shardkeeper.vocab import ConfigError, CorruptZnode

MAX_SHARDS = 1_000_000
MAX_REPLICAS = 16


# name -> (kind, low, high, help). Bounds are inclusive.
KNOBS: dict[str, tuple[type, float, float, str]] = {
    "shards": (int, 1, MAX_SHARDS, "number of shards S (fixed after init)"),
    "replicas": (int, 1, MAX_REPLICAS, "replicas per shard R"),
    "rebalance_delay": (
        float, 0, 86_400,
        "seconds to wait before re-replicating a departed agent's replicas"
        " (its primaries fail over at once)",
    ),
    "max_moves_per_agent": (int, 1, 1_000, "concurrent copies into or out of one agent"),
    "max_moves_total": (int, 1, 100_000, "concurrent copies in the whole cluster"),
    "auto_maintenance_fraction": (
        float, 0, 1,
        "enter maintenance when more than this fraction of members vanish within"
        " auto_maintenance_window (0 disables)",
    ),
    "auto_maintenance_window": (float, 1, 3_600, "seconds over which departures are counted"),
}


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def parse_knob(key: str, text: str) -> int | float:
    """A `config set` value, refused (ConfigError with the allowed range) unless it is a
    finite number that survives the conversion: "1e-400" would silently become 0.0 and
    "1e400" infinity."""
    kind, low, high, _ = KNOBS[key]
    expected = (f"{key} must be {'an integer' if kind is int else 'a number'} between"
                f" {low:g} and {high:g}")
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{expected}, got {_shown(text)}") from None
    if kind is float:
        if not math.isfinite(value):
            raise ConfigError(f"{expected}, got {_shown(text)} (not a finite number)")
        if value == 0 and _nonzero(text):
            raise ConfigError(f"{expected}, got {_shown(text)}: too small for a float (it"
                              " would become 0); write 0 to mean 0")
        value += 0.0  # -0.0 reads as a typo in `config show`: store 0.0
    return value


def _nonzero(text: str) -> bool:
    try:
        return decimal.Decimal(text.strip()) != 0
    except decimal.InvalidOperation:
        return False


@dataclass(frozen=True)
class ClusterConfig:
    shards: int
    replicas: int
    rebalance_delay: float = 0.0
    max_moves_per_agent: int = 4
    max_moves_total: int = 64
    auto_maintenance_fraction: float = 0.5
    auto_maintenance_window: float = 30.0

    def __post_init__(self) -> None:
        for f in fields(self):
            kind, low, high, _ = KNOBS[f.name]
            value = getattr(self, f.name)
            wrong = isinstance(value, bool) or not isinstance(value, kind if kind is int else (
                int, float))
            if wrong:
                expected = "an integer" if kind is int else "a number"
                raise ConfigError(f"{f.name} must be {expected}, got {value!r}")
            if not low <= value <= high:
                raise ConfigError(f"{f.name} must be between {low:g} and {high:g}, got {value}")

    def encode(self) -> bytes:
        return encode(asdict(self))

    def with_settings(self, settings: dict[str, str]) -> ClusterConfig:
        """Apply `KEY=VALUE` strings from the CLI; shards cannot change after init."""
        changes: dict[str, Any] = {}
        for key, text in settings.items():
            if key not in KNOBS:
                raise ConfigError(f"unknown config key {key!r}; known: {', '.join(KNOBS)}")
            if key == "shards" and text != str(self.shards):
                raise ConfigError(
                    "shards cannot change after init: keys would map to other shards"
                )
            changes[key] = parse_knob(key, text)
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> ClusterConfig:
        unknown = set(obj) - set(KNOBS)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
        for required in ("shards", "replicas"):
            if required not in obj:
                raise ConfigError(f"config is missing {required!r}")
        values = dict(obj)
        for key, value in values.items():
            # JSON has one number type: accept 2.0 for a float knob written as 2.
            if KNOBS[key][0] is float and isinstance(value, int) and not isinstance(value, bool):
                values[key] = float(value)
        return cls(**values)

    @classmethod
    def decode(cls, path: str, data: bytes | None) -> ClusterConfig:
        try:
            return cls.from_dict(decode_object(path, data))
        except ConfigError as e:
            raise CorruptZnode(f"{path}: {e}") from None
