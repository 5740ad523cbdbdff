"""Local callers: the one rule for admin requests that only this box may make.

``POST /api/services/{name}/report`` (it can ban a worker from this agent's answers) and
``PUT /api/worker/load`` (it sets the load this worker announces) are for processes on the
same box. The test is the TCP peer address of the connection — never a header: anyone can
send ``X-Forwarded-For: 127.0.0.1``. A request that carries a forwarding header
(``Forwarded``, ``X-Forwarded-For``, ``X-Real-IP``, ``CF-Connecting-IP``,
``True-Client-IP``) is refused even from loopback: it was relayed by a proxy or tunnel on
this box for somebody else.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from aiohttp import web

FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP", "CF-Connecting-IP",
                      "True-Client-IP")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.removeprefix("::ffff:")).is_loopback
    except ValueError:
        return False


def peer_host(request: web.Request) -> str:
    """The connection's peer address ("" when unknown, e.g. a Unix socket)."""
    transport = request.transport
    peer: Any = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple | list) and peer:
        return str(peer[0])
    return ""


def local_caller(request: web.Request) -> bool:
    """True when the request came straight from this box (loopback peer, not relayed)."""
    if any(h in request.headers for h in FORWARDING_HEADERS):
        return False
    return is_loopback(peer_host(request))


def refuse_remote(request: web.Request, what: str) -> web.Response | None:
    """A 403 JSON answer unless :func:`local_caller`; None when the caller is local."""
    if local_caller(request):
        return None
    return web.json_response({"error": f"{what} is accepted from this box only "
                                       "(a loopback connection, not relayed)"}, status=403)
