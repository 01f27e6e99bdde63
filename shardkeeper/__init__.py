"""shardkeeper: what the two roles share and what users touch.

The contract modules (``layout``, ``config``, ``ring``, ``wire``, ``zk``, ``vocab``...)
import neither ``coordinator`` nor ``agents``; the CLI and the dev cluster sit on top of
all three. ``tests/test_imports.py`` holds the code to these rules.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("shardkeeper")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"
