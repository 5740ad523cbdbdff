"""How addresses group into networks: one rule for every limit that counts by network.

The DHT's diversity limits (``dht/diversity.py``), the storage quotas, the coordinator's
registry and the HTTP listeners' per-address caps all need "which network is this address
in". Written once here, below all of them (this module imports nothing of ``agent``), so
the limits cannot drift apart — an IPv4-mapped IPv6 address is its IPv4 address
everywhere, an IPv6 host counts by its /64 everywhere.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> Address | None:
    """The address ``text`` names (brackets and an IPv6 zone dropped, IPv4-mapped IPv6
    unwrapped to IPv4), or None when it is no address."""
    try:
        addr = ipaddress.ip_address(text.strip().removeprefix("[").removesuffix("]")
                                    .partition("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _dotted_quad(ip: str) -> list[str] | None:
    """The four parts of a plain dotted-quad IPv4 string (the hot path: datagram
    senders), without building an ``ipaddress`` object."""
    parts = ip.split(".")
    if len(parts) == 4 and all(p.isdigit() and len(p) <= 3 and int(p) < 256 for p in parts):
        return parts
    return None


@lru_cache(maxsize=8192)
def network_of(ip: str) -> str:
    """The network an address counts in for per-network limits: its /24 (IPv4, also
    IPv4-mapped IPv6) or its /64 (IPv6), e.g. ``"203.0.113.0/24"``. A string that is no
    address is its own group (it can only be refused later, never merged with others).
    Cached: the DHT asks it for every contact and lookup window, and peers repeat."""
    parts = _dotted_quad(ip)
    if parts is not None:
        return ".".join(parts[:3]) + ".0/24"
    addr = _address(ip)
    if addr is None:
        return ip
    bits = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))


def address_unit(host: str) -> str:
    """The unit a per-address limit counts: the IPv4 address, or the IPv6 /64 (one
    subscriber gets a whole /64, so counting single IPv6 addresses counts nothing)."""
    if ":" not in host:
        return host
    addr = _address(host)
    if addr is None:
        return host
    if addr.version == 4:
        return str(addr)
    return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))


@lru_cache(maxsize=64)
def parse_networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    """The IP networks among config entries (IPs or CIDRs; ``strict=False`` so
    ``10.0.0.1/8`` is ``10.0.0.0/8``). Entries that are no network (host names) are left
    out: the config parser has refused malformed ones, and a caller that accepts names
    matches them itself."""
    nets: list[Network] = []
    for entry in entries:
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue
    return tuple(nets)


def in_networks(addr: Address, networks: Iterable[Network]) -> bool:
    """Whether ``addr`` lies in one of ``networks`` (versions compared first)."""
    return any(addr.version == n.version and addr in n for n in networks)
