"""Cluster configuration: the one place that validates it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from coordinator.layout import CorruptZnode, decode_object, encode

MAX_SHARDS = 1_000_000
MAX_REPLICAS = 16


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and why."""


@dataclass(frozen=True)
class ClusterConfig:
    shards: int
    replicas: int

    def __post_init__(self) -> None:
        for name, value, top in (
            ("shards", self.shards, MAX_SHARDS),
            ("replicas", self.replicas, MAX_REPLICAS),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if not 1 <= value <= top:
                raise ConfigError(f"{name} must be between 1 and {top}, got {value}")

    def encode(self) -> bytes:
        return encode(asdict(self))

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> ClusterConfig:
        unknown = set(obj) - {"shards", "replicas"}
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
        try:
            return cls(shards=obj["shards"], replicas=obj["replicas"])
        except KeyError as e:
            raise ConfigError(f"config is missing {e.args[0]!r}") from None

    @classmethod
    def decode(cls, path: str, data: bytes | None) -> ClusterConfig:
        try:
            return cls.from_dict(decode_object(path, data))
        except ConfigError as e:
            raise CorruptZnode(f"{path}: {e}") from None
