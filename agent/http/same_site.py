"""The admin API refuses cross-site requests (CSRF, DNS rebinding).

The admin API listens on loopback and trusts its callers: the ``rma-agent`` CLI, the
dashboard page it serves itself, local programs using ``/route/``. A web page the
operator happens to open is none of these, yet a browser lets it send "simple" requests
anywhere — a ``text/plain`` POST needs no CORS preflight — and a page whose DNS name is
rebound to 127.0.0.1 is even same-origin to the browser. So every request that may change
state (any method but GET, HEAD, OPTIONS) — and every request to the router's
``/route/``, whose GETs make a worker do work too — is refused with 403 JSON when:

- ``Sec-Fetch-Site`` says it comes from another site or origin (browsers send it; only
  ``same-origin`` and ``none`` — typed by the user — pass);
- it carries an ``Origin`` that is ``null`` or not this very host and port.

And every request, reads included, is refused when it comes from a browser (``Origin``,
any ``Sec-Fetch-*`` header, or a ``Mozilla/`` user agent — a page can remove none of them
from its own requests) and its ``Host`` is a DNS name other than ``localhost``
(``*.localhost``) or the configured ``http.listen`` host: that is what DNS rebinding looks
like — the page's own name, rebound to 127.0.0.1, makes it same-origin, so it could read
every answer (stats, topology, lookups) and not only send. IP literals pass: a rebinding
page cannot make the browser send one.

The CLI and local programs send no ``Origin`` and are not browsers (a local program
could do anything a request can anyway, so their ``Host`` is not judged); the dashboard
is same-origin. Other cross-site GETs (a link to the dashboard from a wiki page) pass:
they only read, and the admin API sends no CORS headers, so a foreign page cannot read
the answers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable

from aiohttp import web

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ROUTER_PREFIX = "/route/"
_FETCH_METADATA = ("Sec-Fetch-Site", "Sec-Fetch-Mode", "Sec-Fetch-Dest", "Sec-Fetch-User")
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def host_name(host: str) -> str:
    """The name part of a ``Host`` value (no port, no brackets, lower case)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


def _ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.partition("%")[0])
    except ValueError:
        return False
    return True


def host_allowed(host: str, listen_host: str) -> bool:
    """Whether ``Host`` names this box the way a local caller does (not a foreign name)."""
    name = host_name(host)
    if not name:
        return False
    return (_ip_literal(name) or name == "localhost" or name.endswith(".localhost")
            or name == host_name(listen_host))


def _acts(request: web.Request) -> bool:
    """Whether ``request`` may change state or start work: any method but the safe ones,
    and anything sent to the router (a GET there is forwarded to a worker)."""
    return request.method not in SAFE_METHODS or request.path.startswith(ROUTER_PREFIX)


def cross_site_refusal(request: web.Request, listen_host: str) -> str | None:
    """Why ``request`` is refused as cross-site or DNS-rebound, or None."""
    headers = request.headers
    host = headers.get("Host", "")
    origin = headers.get("Origin")
    browser = (origin is not None or any(h in headers for h in _FETCH_METADATA)
               or headers.get("User-Agent", "").startswith("Mozilla/"))
    if browser and not host_allowed(host, listen_host):
        return f"Host {host[:100]!r} is not a loopback or configured name of this API " \
               "(DNS rebinding?)"
    if not _acts(request):
        return None
    site = headers.get("Sec-Fetch-Site", "").strip().lower()
    if site and site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site is {site!r}"
    if origin is not None:
        _scheme, sep, netloc = origin.strip().lower().partition("://")
        if not sep or netloc.rstrip("/") != host.strip().lower():
            return f"Origin {origin[:100]!r} is not this API's own"
    return None


def same_site_middleware(listen_host: Callable[[web.Request], str]) -> Callable[
        [web.Request, _Handler], Awaitable[web.StreamResponse]]:
    """An aiohttp middleware applying :func:`cross_site_refusal`; ``listen_host`` gives
    the configured ``http.listen`` host for a request (it may change on reload)."""

    @web.middleware
    async def same_site(request: web.Request, handler: _Handler) -> web.StreamResponse:
        why = cross_site_refusal(request, listen_host(request))
        if why is not None:
            return web.json_response(
                {"error": f"cross-site request refused: {why}; the admin API takes "
                          "requests from this box's programs and its own dashboard "
                          "only"}, status=403)
        return await handler(request)

    return same_site
