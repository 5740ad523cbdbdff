"""The real client of an HTTP request, from forwarding headers of *named* proxies only.

Behind cloudflared or a TLS proxy every connection comes from the proxy, and the proxy
names the client in ``CF-Connecting-IP``, ``X-Forwarded-For`` or ``X-Real-IP``. Anyone
else can send those headers too: believing them from any peer lets a client pick its own
per-client bucket (issue 20: rotating ``CF-Connecting-IP`` from a loopback peer escaped
the registry's per-IP limit). So the headers count only when the connection's peer is
listed in ``http.trusted_proxies`` (IPs or CIDR networks). cloudflared on the same box
connects from loopback: the operator writes ``trusted_proxies = ["127.0.0.1", "::1"]``.

``X-Forwarded-For`` is read right to left: each proxy appends the address it saw, so the
right-most entry that is not itself a trusted proxy is the client (earlier entries are
whatever the client sent).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from aiohttp import web

from agent.netgroups import in_networks, parse_networks

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(text.strip().removeprefix("[").removesuffix("]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_trusted(ip: str, trusted: Iterable[str]) -> bool:
    """True when ``ip`` lies in one of the ``trusted`` addresses or networks."""
    addr = _addr(ip)
    if addr is None:
        return False
    return in_networks(addr, parse_networks(tuple(trusted)))


def client_ip(request: web.Request, trusted: Iterable[str]) -> str:
    """The client's IP: the peer's, or — when the peer is a trusted proxy — the one its
    forwarding header names (``CF-Connecting-IP``, else ``X-Forwarded-For``, else
    ``X-Real-IP``). A header that names no valid IP is ignored."""
    remote = request.remote or ""
    trusted = tuple(trusted)
    if not trusted or not is_trusted(remote, trusted):
        peer = _addr(remote)
        return str(peer) if peer is not None else remote
    cf = _addr(request.headers.get("CF-Connecting-IP", "")[:64])
    if cf is not None:
        return str(cf)
    xff = request.headers.get("X-Forwarded-For", "")[:2048]
    for entry in reversed(xff.split(",")):
        addr = _addr(entry[:64])
        if addr is None:
            break                   # a garbled hop: trust nothing further left
        if not is_trusted(str(addr), trusted):
            return str(addr)
    real = _addr(request.headers.get("X-Real-IP", "")[:64])
    if real is not None:
        return str(real)
    peer = _addr(remote)
    return str(peer) if peer is not None else remote
