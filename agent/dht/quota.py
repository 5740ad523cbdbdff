"""Per-sender record quotas of the provider storage: who a stored record counts against.

A record that a peer announces counts against the peer's *host* and its *network*
(``diversity.DiversityPolicy``: the IP, and its /24 or IPv6 /64), so rotating ports or
node ids gains nothing and one /24 holds at most ``max_per_prefix`` records.

A configured seed (a coordinator) republishes the records of many workers from one
address, so its own address cannot be the group — but exempting it (as before issue 20)
let two IPs of one /24 push 512 long-lived records through a coordinator onto every
storing node. Such a record now counts against **the worker it describes**, by the host
of its signed endpoint (the only location the record carries):

* an IP-literal endpoint: that IP and its /24 (/64), the very groups the worker's own
  announcements count in;
* a name: the name, and its registrable domain (``a.b.example.org`` -> ``example.org``;
  two-label suffixes such as ``co.uk`` and tunnel domains whose every subdomain belongs
  to a different owner — ``trycloudflare.com`` — keep one more label, as the Public
  Suffix List does), so a thousand names under one domain share one network quota.

The coordinator's registry bounds its registrants per IP and /24 first
(:mod:`agent.roles.registry`); this is the storing nodes' own bound, which does not
depend on trusting the coordinator's judgement. Records this node stores itself
(``sender=None``) count nowhere.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections import Counter
from typing import Any

from agent.dht.diversity import DiversityPolicy
from agent.dht.record import WorkerRecord

# suffixes under which each label is a different owner (a subset of the Public Suffix
# List's entries that tunnels and dynamic-DNS services use)
OWNER_SUFFIXES = frozenset({
    "trycloudflare.com", "cfargotunnel.com", "ngrok.io", "ngrok.app", "ngrok-free.app",
    "loca.lt", "duckdns.org", "ddns.net", "github.io", "herokuapp.com", "fly.dev",
})
_SECOND_LEVEL = frozenset({"co", "com", "net", "org", "ac", "gov", "edu", "ne", "or"})


def registrable_domain(name: str) -> str:
    """The part of ``name`` one owner registers (approximated: no full suffix list)."""
    labels = name.lower().rstrip(".").split(".")
    for n in (3, 2):
        if len(labels) > n and ".".join(labels[-n:]) in OWNER_SUFFIXES:
            return ".".join(labels[-(n + 1):])
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def endpoint_groups(record: WorkerRecord, diversity: DiversityPolicy) -> tuple[Any, Any]:
    """(host, network) a relayed record counts in: those of its endpoint's host."""
    try:
        parts = urllib.parse.urlsplit(record.endpoint)
        host = (parts.hostname or "").lower()
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        host, port = "", 0
    if not host:
        return ("endpoint", ""), ("endpoint", "")      # every malformed one: one group
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return ("name", host), ("domain", registrable_domain(host))
    return diversity.groups(host, port)


class QuotaBook:
    """Records counted per host and per network, and the bounds on them."""

    def __init__(self, max_per_sender: int, max_per_prefix: int) -> None:
        self.max_per_sender = max_per_sender
        self.max_per_prefix = max_per_prefix
        self.by_sender: Counter[Any] = Counter()    # host -> records
        self.by_prefix: Counter[Any] = Counter()    # /24, /64 or domain -> records

    def full(self, host: Any, prefix: Any) -> bool:
        """True when one more record of (host, prefix) would pass a bound."""
        if host is None:
            return False
        return (self.by_sender[host] >= self.max_per_sender
                or (self.max_per_prefix > 0 and self.by_prefix[prefix] >= self.max_per_prefix))

    def count(self, host: Any, prefix: Any) -> None:
        if host is not None:
            self.by_sender[host] += 1
            self.by_prefix[prefix] += 1

    def uncount(self, host: Any, prefix: Any) -> None:
        if host is None:
            return
        for counter, k in ((self.by_sender, host), (self.by_prefix, prefix)):
            n = counter[k] - 1
            if n > 0:
                counter[k] = n
            else:
                del counter[k]
