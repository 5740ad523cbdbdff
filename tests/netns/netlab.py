"""A small network of real hosts built from Linux network namespaces (root only).

    public hosts  10.77.0.0/24 --- [br0 10.77.0.1]  router  [10.77.1.1] --- home host 10.77.1.2
                                                     masquerade (NAT) for 10.77.1.0/24

The router NATs the home subnet like a home router: the home host can send UDP out and
get replies, but no public host can reach it first (new inbound flows are dropped).
``lossy(percent)`` drops that share of routed packets with an nftables ``numgen`` rule
(netem is not available in this kernel). Everything stays inside namespaces this object
creates, with a per-run prefix, and ``close()`` deletes them all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from typing import Any


def available() -> str | None:
    """None when a lab can be built here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install iproute2 nftables)"
    return None


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    return res


class NetLab:
    PUBLIC = "10.77.0"
    HOME = "10.77.1"

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.router = f"rma{self.tag}-r"
        self.hosts: dict[str, str] = {}        # logical name -> namespace
        self.addrs: dict[str, str] = {}        # logical name -> IPv4
        self._links = 0
        self._namespaces: list[str] = []
        try:
            self._build_router()
        except BaseException:
            self.close()
            raise

    def _build_router(self) -> None:
        self._add_ns(self.router)
        self._ns(self.router, "ip", "link", "add", "br0", "type", "bridge")
        self._ns(self.router, "ip", "addr", "add", f"{self.PUBLIC}.1/24", "dev", "br0")
        self._ns(self.router, "ip", "link", "set", "br0", "up")
        self._ns(self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self._nft(self.router, f"""
table ip nat {{
  chain post {{ type nat hook postrouting priority srcnat; policy accept;
    ip saddr {self.HOME}.0/24 oifname "br0" masquerade
  }}
}}
table ip filter {{
  chain forward {{ type filter hook forward priority filter; policy accept;
    iifname "br0" oifname "home0" ct state new drop
  }}
}}""")

    # --- building ------------------------------------------------------------------
    def _add_ns(self, ns: str) -> None:
        _run("ip", "netns", "add", ns)
        self._namespaces.append(ns)
        self._ns(ns, "ip", "link", "set", "lo", "up")

    def _ns(self, ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", ns, *cmd, check=check)

    def _nft(self, ns: str, ruleset: str) -> None:
        res = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ruleset,
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nft in {ns}: {res.stderr.strip()}")

    def _veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        self._links += 1
        tmp_a, tmp_b = f"v{self.tag}a{self._links}", f"v{self.tag}b{self._links}"
        _run("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        _run("ip", "link", "set", tmp_a, "netns", ns_a)
        _run("ip", "link", "set", tmp_b, "netns", ns_b)
        self._ns(ns_a, "ip", "link", "set", tmp_a, "name", name_a)
        self._ns(ns_b, "ip", "link", "set", tmp_b, "name", name_b)

    def add_public(self, name: str) -> str:
        """A directly reachable host on the public subnet; returns its address."""
        ns = f"rma{self.tag}-{name}"[:15]
        addr = f"{self.PUBLIC}.{10 + len(self.hosts)}"
        self._add_ns(ns)
        port = f"p{len(self.hosts)}"
        self._veth(ns, "eth0", self.router, port)
        self._ns(self.router, "ip", "link", "set", port, "master", "br0")
        self._ns(self.router, "ip", "link", "set", port, "up")
        self._ns(ns, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
        self._ns(ns, "ip", "link", "set", "eth0", "up")
        self._ns(ns, "ip", "route", "add", "default", "via", f"{self.PUBLIC}.1")
        self.hosts[name], self.addrs[name] = ns, addr
        return addr

    def add_home(self, name: str) -> str:
        """The one host behind the NAT router; returns its (private) address."""
        if any(a.startswith(self.HOME) for a in self.addrs.values()):
            raise ValueError("one home host per lab")
        ns = f"rma{self.tag}-{name}"[:15]
        addr = f"{self.HOME}.2"
        self._add_ns(ns)
        self._veth(ns, "eth0", self.router, "home0")
        self._ns(self.router, "ip", "addr", "add", f"{self.HOME}.1/24", "dev", "home0")
        self._ns(self.router, "ip", "link", "set", "home0", "up")
        self._ns(ns, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
        self._ns(ns, "ip", "link", "set", "eth0", "up")
        self._ns(ns, "ip", "route", "add", "default", "via", f"{self.HOME}.1")
        self.hosts[name], self.addrs[name] = ns, addr
        return addr

    def lossy(self, percent: int) -> None:
        """Drop about ``percent`` % of packets the router forwards (both directions)."""
        self._nft(self.router, f"""
table ip loss {{
  chain lossy {{ type filter hook forward priority -10; policy accept;
    numgen random mod 100 < {int(percent)} drop
  }}
}}""")

    def heal(self) -> None:
        self._ns(self.router, "nft", "delete", "table", "ip", "loss", check=False)

    # --- using ---------------------------------------------------------------------
    def exec_argv(self, name: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[name], *cmd]

    def popen(self, name: str, *cmd: str, **kw: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.exec_argv(name, *cmd), **kw)

    def run(self, name: str, *cmd: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.exec_argv(name, *cmd), capture_output=True, text=True,
                              timeout=timeout)

    def close(self) -> None:
        for ns in reversed(self._namespaces):
            _run("ip", "netns", "del", ns, check=False)
        self._namespaces.clear()

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
