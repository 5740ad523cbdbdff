"""Which endpoints a caller may contact at all (no SSRF through announced records).

A record's ``endpoint`` is a string any worker can sign. Without a rule, announcing
``https://10.0.0.1:6443/api``, ``https://169.254.169.254/`` or ``http://127.0.0.1:6666``
would make every agent that probes or routes to it send requests into its own private
network, or to its own loopback, on the announcer's behalf (issue 20).

The rule (SPEC §4 ``discovery.allow_http_hosts``, ``discovery.allow_private_hosts``):

* the scheme is ``https://``, or ``http://`` to a host listed in ``allow_http_hosts`` or
  to an allowed loopback address (a connection that never leaves the box);
* a destination that is not a public address — loopback (127/8, ::1, ``localhost``),
  private (10/8, 172.16/12, 192.168/16, fc00::/7), link-local (169.254/16 with the
  cloud metadata address, fe80::/10), CGNAT (100.64/10), unspecified, multicast or
  reserved — is refused for ``https://`` exactly as for ``http://``, unless the config
  names it: an address or CIDR network in ``allow_private_hosts``, or the host name as
  written in ``allow_private_hosts`` or ``allow_http_hosts`` (a host the operator listed
  for plain http is one they mean to reach);
* no other scheme, no credentials in the URL, no query or fragment (the caller appends
  paths), and redirects are never followed (every request made to an endpoint passes
  ``allow_redirects=False``), so an allowed endpoint cannot bounce a caller elsewhere.

A name is checked again when it is resolved, at connect time (:class:`GuardedConnector`
and its resolver): ``https://attacker.example`` whose DNS answers 10.0.0.1 is refused
too, and addresses of a mixed answer that are not allowed are dropped. A record whose
endpoint is refused is not offered and never contacted.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from agent.netgroups import in_networks, parse_networks

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# (network, what it is) for every destination that is not the public internet
_NOT_PUBLIC: tuple[tuple[Network, str], ...] = tuple(
    (ipaddress.ip_network(net), kind) for net, kind in (
        ("0.0.0.0/8", "unspecified"), ("10.0.0.0/8", "private"), ("100.64.0.0/10", "CGNAT"),
        ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"), ("192.0.0.0/24", "reserved"),
        ("192.168.0.0/16", "private"), ("198.18.0.0/15", "reserved"),
        ("224.0.0.0/4", "multicast"), ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"), ("::1/128", "loopback"), ("fc00::/7", "private"),
        ("fe80::/10", "link-local"), ("fec0::/10", "site-local"), ("ff00::/8", "multicast"),
    ))


def _addr(host: str) -> IPAddress | None:
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def address_kind(addr: IPAddress) -> str | None:
    """"loopback", "private", "link-local", ... for an address that is not public, or
    None for a public one."""
    for net, kind in _NOT_PUBLIC:
        if addr.version == net.version and addr in net:
            return kind
    return None


@dataclass(frozen=True)
class Allowance:
    """What the config lets callers contact besides public ``https://`` endpoints."""

    http_hosts: tuple[str, ...] = ()      # discovery.allow_http_hosts
    private: tuple[str, ...] = ()         # discovery.allow_private_hosts

    @classmethod
    def from_config(cls, discovery: Any) -> Allowance:
        return cls(tuple(h.lower().strip("[]") for h in discovery.allow_http_hosts),
                   tuple(h.lower() for h in getattr(discovery, "allow_private_hosts", ())))

    def _networks(self) -> tuple[Network, ...]:
        return parse_networks(self.private)

    def private_ok(self, host: str, addr: IPAddress | None) -> bool:
        """True when the config names this private destination (by address, network or
        the host name as written in the endpoint)."""
        host = host.lower().strip("[]")
        if host in self.private or host in self.http_hosts:
            return True
        if addr is None:
            return False
        if str(addr) in self.http_hosts:
            return True
        return in_networks(addr, self._networks())


def _as_allowance(allow: Allowance | Iterable[str]) -> Allowance:
    if isinstance(allow, Allowance):
        return allow
    return Allowance(http_hosts=tuple(h.lower().strip("[]") for h in allow))


def destination_refusal(host: str, addr: IPAddress | None,
                        allow: Allowance) -> str | None:
    """Why ``host`` (resolved to ``addr``, or None for a name not yet resolved) may not
    be contacted because of where it is, or None."""
    if addr is None:
        if host == "localhost" or host.endswith(".localhost"):
            kind = "loopback"
        else:
            return None                      # checked again once resolved
    else:
        kind = address_kind(addr)
        if kind is None:
            return None
    if allow.private_ok(host, addr):
        return None
    shown = host if addr is None or host == str(addr) else f"{host} ({addr})"
    return f"{kind} address {shown} (not in discovery.allow_private_hosts)"


def endpoint_refusal(endpoint: str, allow: Allowance | Iterable[str] = ()) -> str | None:
    """None when a caller may contact ``endpoint``; otherwise why not (one short phrase,
    shown as an exclusion reason). ``allow``: the config's :class:`Allowance` (a bare
    list of names is ``allow_http_hosts`` alone)."""
    if not isinstance(endpoint, str) or not endpoint:
        return "no endpoint"
    allowance = _as_allowance(allow)
    try:
        parts = urllib.parse.urlsplit(endpoint)
        port = parts.port        # raises ValueError on a malformed port
    except ValueError:
        return "endpoint is not a valid URL"
    del port
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return f"endpoint scheme {scheme or '(none)'!r} is not http(s)"
    host = (parts.hostname or "").lower()
    if not host:
        return "endpoint has no host"
    if parts.username is not None or parts.password is not None:
        return "endpoint carries credentials"
    if parts.query or parts.fragment or "?" in endpoint or "#" in endpoint:
        return "endpoint has a query or fragment"
    addr = _addr(host)
    refused = destination_refusal(host, addr, allowance)
    if refused is not None:
        return refused
    if scheme == "https" or host in allowance.http_hosts:
        return None
    if host == "localhost" or (addr is not None and address_kind(addr) == "loopback"):
        return None                          # allowed loopback: never leaves the box
    return f"plain http to {host} (not in discovery.allow_http_hosts)"


class EndpointRefused(aiohttp.ClientConnectionError):
    """A connection to a host the endpoint rule forbids was asked for (and not made)."""


class _GuardedResolver(AbstractResolver):
    """Resolves like the default resolver, then keeps only the addresses the rule allows
    for the name: a name that resolves only to forbidden addresses is refused."""

    def __init__(self, allow: Callable[[], Allowance], on_refused: Callable[[], None],
                 inner: AbstractResolver | None = None) -> None:
        self._inner = inner if inner is not None else DefaultResolver()
        self._allow = allow
        self._on_refused = on_refused

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allow = self._allow()
        kept: list[ResolveResult] = []
        why = "no address"
        for r in results:
            reason = destination_refusal(host.lower(), _addr(r["host"]), allow)
            if reason is None:
                kept.append(r)
            else:
                why = reason
        if not kept:
            self._on_refused()
            raise EndpointRefused(f"not contacted: {why}")
        return kept

    async def close(self) -> None:
        await self._inner.close()


class GuardedConnector(aiohttp.TCPConnector):
    """The last line of the rule: every connection a caller-side session opens (probes,
    proofs, routed requests) passes here first. It counts the hosts asked for (the
    ``contacts`` counter, bounded), refuses any URL the rule forbids, and resolves names
    through :class:`_GuardedResolver`, so a filter bug upstream — or a DNS answer that
    points into a private network — can still never make the agent send a packet there.

    ``allow`` returns the current :class:`Allowance` (read at each connection, so a
    config reload applies at once); a bare list of names is ``allow_http_hosts``.
    ``dns``: the resolver whose answers are checked (default: aiohttp's)."""

    def __init__(self, allow: Callable[[], Allowance | Iterable[str]],
                 contacts: Counter[str] | None = None, max_hosts: int = 256,
                 dns: AbstractResolver | None = None, **kw: Any) -> None:
        self._allow = lambda: _as_allowance(allow())
        self.refused = 0
        self._guarded_resolver = _GuardedResolver(self._allow, self._count_refused, dns)
        super().__init__(resolver=self._guarded_resolver, **kw)
        self.contacts: Counter[str] = contacts if contacts is not None else Counter()
        self._max_hosts = max_hosts
        self._verdicts: dict[tuple[str, str], tuple[Allowance, str | None]] = {}
        self._last_allow: Allowance | None = None

    def _count_refused(self) -> None:
        self.refused += 1

    def allowance(self) -> Allowance:
        """The rule this connector enforces now."""
        return self._allow()

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:  # noqa: ASYNC109
        url = req.url
        host = (url.host or "").lower()
        if host in self.contacts or len(self.contacts) < self._max_hosts:
            self.contacts[host] += 1
        allow = self._allow()
        if allow != self._last_allow:
            # resolutions cached under another rule (a config reload) are judged again
            self.clear_dns_cache()
            self._last_allow = allow
        key = (url.scheme, url.raw_authority)
        cached = self._verdicts.get(key)
        if cached is not None and cached[0] == allow:
            reason = cached[1]
        else:
            reason = endpoint_refusal(f"{url.scheme}://{url.raw_authority}/", allow)
            if len(self._verdicts) >= self._max_hosts:
                self._verdicts.clear()
            self._verdicts[key] = (allow, reason)
        if reason is not None:
            self.refused += 1
            raise EndpointRefused(f"not contacted: {reason}")
        return await super().connect(req, traces, timeout)

    async def close(self, *args: Any, **kw: Any) -> None:
        await super().close(*args, **kw)
        await self._guarded_resolver.close()
