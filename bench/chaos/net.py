"""A private network of Linux network namespaces, and the partitions made in it.

Every process of the cluster (each ZooKeeper server, coordinator and agent) gets a
namespace of its own with one address, ``10.X.i.2/24`` on ``eth0``, and a veth pair to a
**router** namespace that this module also creates (``10.X.i.1`` on the router side).
The router forwards between them; the benchmark itself, in the root namespace, reaches
``10.X.0.0/16`` through one more veth pair to the router. Nothing is routed anywhere
else: the root namespace does not forward, and the router knows no default route.

Faults are made in the router, where every packet between two nodes passes:

* **partition**: a pair of ``ip rule ... blackhole`` policy rules (one per direction)
  for two addresses. Forwarded packets that match are dropped silently, as on a real
  network that lost a link: connections hang until their timeouts, nothing is refused.
* **slow link**: a ``tbf`` qdisc on the node's router-side veth and on its own ``eth0``
  (rate-limited both ways). ``netem`` (delay, loss) would be the natural tool, but this
  machine's kernel is built without it (``CONFIG_NET_SCH_NETEM`` is not set;
  ``tc qdisc add ... netem`` answers "Error: Specified qdisc kind is unknown."), so a
  bandwidth limit stands in for a degraded link.

Names carry the owning process id (``skc<pid>...``), so that :func:`sweep` can remove
what a run that died left behind (namespaces, the veth in the root namespace, and the
processes still inside those namespaces) without touching anything of a live run.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
from dataclasses import dataclass, field

PREFIX = "skc"
_OWNED = re.compile(rf"^{PREFIX}(\d+)")


class NetError(Exception):
    """A network command failed; the message has the command and its error output."""


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS``; returns its stdout. Raises NetError with stderr on failure."""
    return _run(["ip", *args], check)


def tc(*args: str, check: bool = True) -> str:
    return _run(["tc", *args], check)


def _run(argv: list[str], check: bool) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pick_subnet(pid: int) -> int:
    """The second octet of a 10.X.0.0/16 that no route of the root namespace overlaps."""
    used = []
    for route in json.loads(ip("-j", "route", "show", "table", "all") or "[]"):
        dst = route.get("dst", "")
        with contextlib.suppress(ValueError):
            if dst and dst != "default":
                used.append(ipaddress.ip_network(dst, strict=False))
    for k in range(100):
        octet = 100 + (pid + k) % 100
        net = ipaddress.ip_network(f"10.{octet}.0.0/16")
        if not any(net.overlaps(u) for u in used):
            return octet
    raise NetError("no free 10.X.0.0/16 subnet for the namespaces")


@dataclass(frozen=True)
class Node:
    name: str
    index: int
    netns: str
    address: str  # the node's one address
    veth: str  # its router-side interface


@dataclass
class Network:
    """The router, the nodes added to it, and the faults currently in force."""

    pid: int = field(default_factory=os.getpid)
    octet: int = 0
    nodes: dict[str, Node] = field(default_factory=dict)
    _rules: set[tuple[str, str]] = field(default_factory=set)
    _slow: set[str] = field(default_factory=set)
    _up: bool = False

    @property
    def tag(self) -> str:
        return f"{PREFIX}{self.pid}"

    @property
    def router(self) -> str:
        return f"{self.tag}-router"

    def up(self) -> Network:
        """Create the router namespace and its link to the root namespace."""
        sweep()
        self.octet = _pick_subnet(self.pid)
        self._up = True
        ip("netns", "add", self.router)
        self._ns(self.router, "link", "set", "lo", "up")
        _run(["ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
             True)
        host, peer = f"{self.tag}h", f"{self.tag}u"
        ip("link", "add", host, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", self.router)
        ip("addr", "add", f"10.{self.octet}.255.1/24", "dev", host)
        ip("link", "set", host, "up")
        self._ns(self.router, "addr", "add", f"10.{self.octet}.255.2/24", "dev", peer)
        self._ns(self.router, "link", "set", peer, "up")
        ip("route", "add", f"10.{self.octet}.0.0/16", "via", f"10.{self.octet}.255.2")
        return self

    def _ns(self, netns: str, *args: str) -> str:
        return ip("-n", netns, *args)

    def add(self, name: str) -> Node:
        """A namespace for one process, its address, and its link to the router."""
        index = len(self.nodes) + 1
        if index > 250:
            raise NetError("at most 250 nodes")
        node = Node(name, index, f"{self.tag}-{name}", f"10.{self.octet}.{index}.2",
                    f"{self.tag}v{index}")
        inner = f"{self.tag}p{index}"
        ip("netns", "add", node.netns)
        ip("link", "add", node.veth, "type", "veth", "peer", "name", inner)
        ip("link", "set", node.veth, "netns", self.router)
        ip("link", "set", inner, "netns", node.netns)
        self._ns(node.netns, "link", "set", inner, "name", "eth0")
        self._ns(self.router, "addr", "add", f"10.{self.octet}.{index}.1/24", "dev", node.veth)
        self._ns(self.router, "link", "set", node.veth, "up")
        self._ns(node.netns, "addr", "add", f"{node.address}/24", "dev", "eth0")
        self._ns(node.netns, "link", "set", "eth0", "up")
        self._ns(node.netns, "link", "set", "lo", "up")
        self._ns(node.netns, "route", "add", "default", "via", f"10.{self.octet}.{index}.1")
        self.nodes[name] = node
        return node

    def exec_prefix(self, name: str) -> list[str]:
        """The argv prefix that runs a command inside ``name``'s namespace."""
        return ["ip", "netns", "exec", self.nodes[name].netns]

    # -- faults ----------------------------------------------------------------------

    def cut(self, a: str, b: str) -> None:
        """Drop every packet between nodes ``a`` and ``b``, both ways, silently."""
        pair = tuple(sorted((a, b)))
        if pair in self._rules:
            return
        x, y = self.nodes[a].address, self.nodes[b].address
        for src, dst in ((x, y), (y, x)):
            self._ns(self.router, "rule", "add", "from", src, "to", dst, "blackhole",
                     "priority", "100")
        self._rules.add(pair)  # type: ignore[arg-type]

    def heal(self, a: str, b: str) -> None:
        pair = tuple(sorted((a, b)))
        if pair not in self._rules:
            return
        x, y = self.nodes[a].address, self.nodes[b].address
        for src, dst in ((x, y), (y, x)):
            self._ns(self.router, "rule", "del", "from", src, "to", dst, "blackhole",
                     "priority", "100")
        self._rules.discard(pair)  # type: ignore[arg-type]

    def cut_off(self, name: str, others: list[str]) -> None:
        for other in others:
            self.cut(name, other)

    def heal_off(self, name: str, others: list[str]) -> None:
        for other in others:
            self.heal(name, other)

    def slow(self, name: str, rate: str = "4mbit") -> None:
        """Limit ``name``'s link to ``rate`` both ways (a token bucket; see the docstring)."""
        if name in self._slow:
            return
        node = self.nodes[name]
        for netns, dev in ((self.router, node.veth), (node.netns, "eth0")):
            tc("-n", netns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
               "burst", "64kb", "latency", "200ms")
        self._slow.add(name)

    def unslow(self, name: str) -> None:
        if name not in self._slow:
            return
        node = self.nodes[name]
        for netns, dev in ((self.router, node.veth), (node.netns, "eth0")):
            tc("-n", netns, "qdisc", "del", "dev", dev, "root", check=False)
        self._slow.discard(name)

    def rules(self) -> list[str]:
        """The router's policy rules now (for checking that faults were undone)."""
        return [line for line in self._ns(self.router, "rule", "show").splitlines()
                if "blackhole" in line]

    def down(self) -> None:
        """Remove everything this network made; safe to call twice or after a failure."""
        if not self._up:
            return
        self._up = False
        remove_run(self.pid)


def _namespaces() -> list[str]:
    out = ip("netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_run(pid: int) -> None:
    """Remove the namespaces and root veth of the run of ``pid``, and kill what still
    runs inside them (processes a dead run started; its namespaces cannot go otherwise)."""
    tag = f"{PREFIX}{pid}"
    for netns in [n for n in _namespaces() if n.startswith(f"{tag}-")]:
        for line in ip("netns", "pids", netns, check=False).split():
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(line), signal.SIGKILL)
        ip("netns", "del", netns, check=False)
    ip("link", "del", f"{tag}h", check=False)  # its route goes with it


def sweep() -> list[int]:
    """Remove what runs whose process is gone left behind; returns their pids."""
    owners = set()
    for netns in _namespaces():
        if m := _OWNED.match(netns):
            owners.add(int(m.group(1)))
    for line in ip("-o", "link", "show", check=False).splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if m := _OWNED.match(name):
            owners.add(int(m.group(1)))
    dead = sorted(p for p in owners if p != os.getpid() and not _alive(p))
    for pid in dead:
        remove_run(pid)
    return dead
