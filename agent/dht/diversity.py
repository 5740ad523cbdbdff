"""Address diversity: how many contacts, records and requests one host may account for.

Why: node ids are self-chosen, so one machine with many UDP ports (or many keys) can place
itself wherever it likes in the id space — e.g. take the 20 ids closest to a service key
and answer lookups with nothing (an eclipse), or announce a thousand fake workers. What it
cannot cheaply multiply is *addresses*. So every defence against hostile peers counts by
address group, never by ``(ip, port)`` or by node id:

* the routing table admits at most ``bucket_per_ip`` contacts of one IP and
  ``bucket_per_prefix`` of one /24 (IPv6: /64) per bucket, and ``table_per_ip`` /
  ``table_per_prefix`` in the whole table (``routing.RoutingTable``) — the model is
  libp2p's ``go-libp2p-kbucket/peerdiversity`` filter (a per-bucket and a per-table limit
  per address group);
* a lookup's closest window counts at most ``window_per_ip`` / ``window_per_prefix``
  nodes of one group (``crawling.Crawl``), so the nodes of one host cannot fill it and
  the lookup keeps going to the next-closest honest nodes;
* storage quotas and eviction count records per host (``storage.ProviderStorage``);
* the ``reachable`` RPC and reply budgets are per host (``protocol``).

**Private addresses** (10/8, 172.16/12, 192.168/16, 100.64/10 CGNAT, 169.254/16, IPv6
fc00::/7 and fe80::/10) keep the per-IP limits but form no /24 group: a LAN deployment puts
every box in one /24, and grouping them would cap its own routing tables and lookups at
three nodes. A remote attacker cannot use such addresses (a contact enters a table only
after answering a ping at its address, from our side of the network); an attacker inside
the LAN is limited per IP only. libp2p likewise applies its filter to the public DHT only.

**Loopback.** Tests and benchmarks run hundreds of nodes on ``127.0.0.1`` (one host, many
ports). By default (``loopback="exempt"``) every loopback ``ip:port`` counts as its own
host and its own group, so such networks behave as before: loopback cannot be reached, let
alone spoofed, from off the machine. ``loopback="strict"`` treats ``127.a.b.c`` like any
other address (host = the IP, group = its /24) so tests can put an attacker on one
loopback address with many ports and honest nodes on other /24s (``127.0.k.1``). Agent
processes read it from the environment variable ``RMA_AGENT_DHT_LOOPBACK`` (``strict`` or
``exempt``): a test knob, deliberately not a config key.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from agent.netgroups import network_of

LOOPBACK_ENV = "RMA_AGENT_DHT_LOOPBACK"


def _norm(ip: str) -> str:
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip


@dataclass(frozen=True)
class DiversityPolicy:
    """Limits per address group (see module docstring). 0 disables one limit."""

    bucket_per_ip: int = 2
    bucket_per_prefix: int = 3
    table_per_ip: int = 5
    table_per_prefix: int = 10
    window_per_ip: int = 2
    window_per_prefix: int = 3
    loopback: str = "exempt"          # "exempt" | "strict"

    @classmethod
    def from_env(cls, **kw: Any) -> DiversityPolicy:
        """The defaults, with ``loopback`` from ``RMA_AGENT_DHT_LOOPBACK`` when set."""
        mode = os.environ.get(LOOPBACK_ENV, "").strip().lower()
        if mode in ("strict", "exempt"):
            kw.setdefault("loopback", mode)
        return cls(**kw)

    @classmethod
    def unlimited(cls) -> DiversityPolicy:
        """No limits at all (unit tests of other behaviour on one made-up address)."""
        return cls(0, 0, 0, 0, 0, 0)

    # ------------------------------------------------------------------ grouping
    def host(self, ip: str, port: int) -> Any:
        """What counts as one host: the IP; a loopback ``ip:port`` when exempt."""
        ip = _norm(ip)
        if self.loopback == "exempt" and _is_loopback(ip):
            return (ip, port)
        return ip

    def prefix(self, ip: str, port: int) -> Any:
        """The host's network group: its /24 (IPv4) or /64 (IPv6); a private address is
        its own group."""
        ip = _norm(ip)
        if self.loopback == "exempt" and _is_loopback(ip):
            return (ip, port)
        if is_private(ip):
            return ip
        return network_of(ip)

    def groups(self, ip: str, port: int) -> tuple[Any, Any]:
        """``(host(ip, port), prefix(ip, port))`` in one pass (hot path: every contact and
        every lookup candidate)."""
        if not isinstance(ip, str):
            return None, None
        ip = _norm(ip)
        if _is_loopback(ip):
            if self.loopback == "exempt":
                key = (ip, port)
                return key, key
            return ip, network_of(ip)
        return ip, (ip if is_private(ip) else network_of(ip))

    def is_exempt(self, ip: str) -> bool:
        """True for loopback addresses under ``loopback="exempt"`` (not spoofable from
        off the machine; the reply budgets skip them)."""
        return self.loopback == "exempt" and _is_loopback(_norm(ip))


def _is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "::1"


def is_private(ip: str) -> bool:
    """RFC 1918, CGNAT, link-local, IPv6 ULA / link-local (string tests: this runs for
    every lookup candidate)."""
    if ":" in ip:
        low = ip.lower()
        return low.startswith(("fc", "fd", "fe8", "fe9", "fea", "feb"))
    if ip.startswith(("10.", "192.168.", "169.254.")):
        return True
    if ip.startswith("172.") or ip.startswith("100."):
        try:
            second = int(ip.split(".", 2)[1])
        except (IndexError, ValueError):
            return False
        return 16 <= second <= 31 if ip[1] == "7" else 64 <= second <= 127
    return False


class GroupCounter:
    """Counts of members per host and per prefix, with a check against two limits.

    Used for the whole routing table (kept up to date as contacts come and go) and,
    built fresh, for one bucket or one lookup window.
    """

    __slots__ = ("hosts", "policy", "prefixes")

    def __init__(self, policy: DiversityPolicy) -> None:
        self.policy = policy
        self.hosts: Counter[Any] = Counter()
        self.prefixes: Counter[Any] = Counter()

    def add(self, ip: str, port: int) -> None:
        if not isinstance(ip, str):     # an address-less Node (tests, id-only targets)
            return
        host, prefix = self.policy.groups(ip, port)
        self.hosts[host] += 1
        self.prefixes[prefix] += 1

    def remove(self, ip: str, port: int) -> None:
        if not isinstance(ip, str):
            return
        for counter, key in zip((self.hosts, self.prefixes), self.policy.groups(ip, port),
                                strict=True):
            n = counter[key] - 1
            if n > 0:
                counter[key] = n
            else:
                counter.pop(key, None)

    def count(self, host: Any, prefix: Any) -> tuple[int, int]:
        return self.hosts.get(host, 0), self.prefixes.get(prefix, 0)

    def allows(self, ip: str, port: int, per_ip: int, per_prefix: int) -> bool:
        """Would one more member at ``ip:port`` stay within the limits?"""
        if not isinstance(ip, str):
            return True
        host, prefix = self.policy.groups(ip, port)
        if per_ip and self.hosts.get(host, 0) >= per_ip:
            return False
        return not (per_prefix and self.prefixes.get(prefix, 0) >= per_prefix)

    def clear(self) -> None:
        self.hosts.clear()
        self.prefixes.clear()
