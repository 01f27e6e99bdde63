"""Headless Chromium driven over the DevTools protocol, for tests of the status page.

Debian's ``chromium`` runs headless with ``--remote-debugging-port=0``: it picks a free
port and writes it to ``DevToolsActivePort`` in its profile directory (no port race). The
test talks to the page target over a websocket (``websocket-client``) and reads the page
with ``Runtime.evaluate``. No browser download, no Playwright.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import websocket

from shardkeeper.poll import poll_until
from tests.harness import fetch

REQUIRE = "SHARDKEEPER_REQUIRE_BROWSER"  # set (by .ci/run): a missing chromium fails
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_or_skip() -> str:
    """The chromium executable; skip the test only when there is none and CI does not
    require one."""
    exe = find_chromium()
    if exe is not None:
        return exe
    if os.environ.get(REQUIRE):
        pytest.fail(f"{REQUIRE} is set but chromium is not installed: apt-get install -y"
                    " chromium")
    pytest.skip("chromium is not installed (apt-get install -y chromium)")


class BrowserError(AssertionError):
    pass


class Browser:
    """One headless Chromium with one page."""

    def __init__(self, exe: str, profile: Path, timeout: float = 20.0):
        profile.mkdir(parents=True, exist_ok=True)
        self.log = profile.parent / "chromium.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}",
                                          "about:blank"],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self._ids = itertools.count(1)
        try:
            port = poll_until(lambda: self._port(profile), timeout, "chromium's DevTools port")
            page = poll_until(lambda: self._page(port), timeout, "chromium's page target")
            # Chromium refuses websocket clients that send an Origin it does not allow.
            self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout,
                                                  suppress_origin=True)
        except BaseException:
            self.close()
            raise

    def _port(self, profile: Path) -> int | None:
        if self.proc.poll() is not None:
            raise BrowserError(f"chromium exited ({self.proc.returncode}): see {self.log}")
        try:
            first = (profile / "DevToolsActivePort").read_text().splitlines()[0]
        except (OSError, IndexError):
            return None
        return int(first) if first.isdigit() else None

    @staticmethod
    def _page(port: int) -> dict[str, Any] | None:
        with contextlib.suppress(OSError):
            targets = json.loads(fetch(f"http://127.0.0.1:{port}/json/list").body)
            return next((t for t in targets if t.get("type") == "page"), None)
        return None

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command and its result (events arriving meanwhile are dropped)."""
        n = next(self._ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == n:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def eval(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        """A PNG of the page (for a person looking at a failure)."""
        import base64

        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot")["data"]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# What the page shows, read from its DOM (the data-* attributes it sets for this).
PAGE_STATE = """(() => {
  if (!document.body || !document.getElementById('members')) {  // still loading
    return {generation: '', error: '', members: {}, down: [], ring: {}, copies: [],
            copyList: [], events: [], alerts: [], text: ''};
  }
  const rows = [...document.querySelectorAll('#members tr[data-member]')];
  const ring = {};
  for (const p of document.querySelectorAll('#ring path.arc')) {
    const shard = p.dataset.shard;
    (ring[shard] = ring[shard] || [])[Number(p.dataset.ring)] = p.dataset.agent;
  }
  return {
    generation: document.body.dataset.generation,
    error: document.body.dataset.error,
    members: Object.fromEntries(rows.map(r => [r.dataset.member,
      {state: r.dataset.state, replicas: Number(r.dataset.replicas)}])),
    down: [...document.querySelectorAll('#down [data-down]')].map(e => e.dataset.down),
    ring: Object.fromEntries(Object.entries(ring).map(([s, a]) => [s, a.filter(x => x)])),
    copies: [...document.querySelectorAll('#ring path.copy')].map(p =>
      [Number(p.dataset.shard), p.dataset.agent, p.dataset.source]),
    copyList: [...document.querySelectorAll('#copies [data-copy]')].map(e => e.textContent),
    events: [...document.querySelectorAll('#events [data-kind]')].map(e => e.textContent),
    alerts: [...document.querySelectorAll('#alerts .alert')].map(e => e.textContent),
    text: document.body.innerText,
  };
})()"""
