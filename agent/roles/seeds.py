"""Which contacts a coordinator hands out as seeds (its public ``GET /api/dht/bootstrap``).

A new node bootstraps from this list, so whoever fills it decides what the newcomer sees
first (issue 20: 20 sybils on 20 /24s held 17 of its 20 places — the list was simply the
routing table's first entries). Contacts in the routing table are verified already (a
contact enters only after answering a ping at its address); among them the list prefers:

* **long-lived contacts**: ordered by when this coordinator first saw them (observed at
  every request and every ``OBSERVE_INTERVAL``), oldest first — an attacker who arrives
  now lines up behind everyone who was already there;
* **diversity**: at most ``PER_WIDE`` contacts per /16 (IPv6 /48), ``PER_PREFIX`` per /24
  (/64) and one per IP — renting addresses in one provider's block buys one or two places,
  not seventeen. Private addresses group per IP (a LAN network is one /16) and loopback
  follows ``DiversityPolicy`` (exempt: every ``ip:port`` its own group).

Places left empty by the caps stay empty: a shorter list of diverse, long-lived seeds is
worth more to a newcomer than a full one.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from agent.dht.diversity import DiversityPolicy, is_private

OBSERVE_INTERVAL = 10.0     # seconds between looks at the routing table
PER_WIDE = 2                # seeds per /16 (IPv6 /48)
PER_PREFIX = 1              # seeds per /24 (IPv6 /64)
Contact = tuple[str, str, int]          # (node id hex, ip, port)


def wide_group(ip: str, port: int, policy: DiversityPolicy) -> Any:
    """The /16 (IPv4) or /48 (IPv6) a contact belongs to, per the diversity policy's
    treatment of loopback and private addresses."""
    if policy.is_exempt(ip):
        return (ip, port)
    if is_private(ip):
        return ip
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    bits = 16 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))


class SeedBook:
    """First-seen times of the routing table's contacts, and the pick from them."""

    def __init__(self, policy: DiversityPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy if policy is not None else DiversityPolicy.from_env()
        self._clock = clock
        self.first_seen: dict[Contact, float] = {}

    def observe(self, contacts: Iterable[Contact]) -> list[Contact]:
        """Note contacts not seen before; forget those gone from the table (the map
        never outgrows the routing table). Returns the contacts as a list."""
        now = self._clock()
        current = list(contacts)
        seen = set(current)
        for c in [c for c in self.first_seen if c not in seen]:
            del self.first_seen[c]
        for c in current:
            self.first_seen.setdefault(c, now)
        return current

    def pick(self, contacts: Iterable[Contact], limit: int) -> list[tuple[str, int]]:
        """Up to ``limit`` ``(ip, port)`` seeds: oldest first, within the diversity caps."""
        current = self.observe(contacts)
        current.sort(key=lambda c: (self.first_seen[c], c[0]))
        wide: Counter[Any] = Counter()
        narrow: Counter[Any] = Counter()
        hosts: set[Any] = set()
        out: list[tuple[str, int]] = []
        for _cid, ip, port in current:
            if len(out) >= limit:
                break
            host, prefix = self.policy.groups(ip, port)
            w = wide_group(ip, port, self.policy)
            if host in hosts or narrow[prefix] >= PER_PREFIX or wide[w] >= PER_WIDE:
                continue
            hosts.add(host)
            narrow[prefix] += 1
            wide[w] += 1
            out.append((ip, port))
        return out
