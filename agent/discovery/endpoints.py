"""Which endpoints a caller may contact at all (no SSRF through announced records).

A record's ``endpoint`` is a string any worker can sign. Without a rule, announcing
``http://10.0.0.1/admin`` or ``http://169.254.169.254/`` would make every agent that probes
or routes to it send requests into its own private network on the announcer's behalf.

The rule (SPEC §4 ``discovery.allow_http_hosts``): callers contact

* ``https://`` endpoints (what tunnels and TLS proxies publish), or
* ``http://`` endpoints whose host is loopback (``127.0.0.0/8``, ``::1``, ``localhost``:
  tests, the demo, one-box setups) or listed in ``discovery.allow_http_hosts`` (a LAN);

and nothing else: no other scheme, no credentials in the URL, no query or fragment (the
caller appends paths), and redirects are never followed (every request made to an
endpoint passes ``allow_redirects=False``), so an allowed endpoint cannot bounce a caller
elsewhere. A record whose endpoint is refused is not offered and never contacted.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_refusal(endpoint: str, allow_http_hosts: Iterable[str] = ()) -> str | None:
    """None when a caller may contact ``endpoint``; otherwise why not (one short phrase,
    shown as an exclusion reason)."""
    if not isinstance(endpoint, str) or not endpoint:
        return "no endpoint"
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
    if scheme == "https":
        return None
    if _is_loopback_host(host):
        return None
    allowed = {h.lower().strip("[]") for h in allow_http_hosts}
    if host in allowed:
        return None
    return f"plain http to {host} (not loopback, not in discovery.allow_http_hosts)"


def endpoint_allowed(endpoint: str, allow_http_hosts: Iterable[str] = ()) -> bool:
    return endpoint_refusal(endpoint, allow_http_hosts) is None


class EndpointRefused(aiohttp.ClientConnectionError):
    """A connection to a host the endpoint rule forbids was asked for (and not made)."""


class GuardedConnector(aiohttp.TCPConnector):
    """The last line of the rule: every connection a caller-side session opens (probes,
    proofs, routed requests) passes here first. It counts the hosts asked for (the
    ``contacts`` counter, bounded) and refuses any the rule forbids, so a filter bug
    upstream can still never make the agent send a packet to such a host."""

    def __init__(self, allow_http_hosts: Callable[[], Iterable[str]],
                 contacts: Counter[str] | None = None, max_hosts: int = 256,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self._allow = allow_http_hosts
        self.contacts: Counter[str] = contacts if contacts is not None else Counter()
        self.refused = 0
        self._max_hosts = max_hosts
        self._verdicts: dict[tuple[str, str], tuple[tuple[str, ...], str | None]] = {}

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:  # noqa: ASYNC109
        url = req.url
        host = (url.host or "").lower()
        if host in self.contacts or len(self.contacts) < self._max_hosts:
            self.contacts[host] += 1
        allow = tuple(self._allow())
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
