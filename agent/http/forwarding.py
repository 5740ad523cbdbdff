"""What a proxy of this agent passes on: the one copy of each forwarding rule.

The worker's gateway (``agent.gateway.proxy``) and the caller's router
(``agent.router.proxy``) both forward requests; they used to carry their own copies of
these rules, and the copies drifted (only one dropped ``Trailers``, the two decoded dot
segments differently and neither looked for encoded slashes). Both import from here now.

**Hop-by-hop headers** (RFC 9110 §7.6.1) stay on their hop: ``Connection`` and every
header it names, ``Keep-Alive``, ``Proxy-Connection``, ``TE``, ``Trailer``,
``Transfer-Encoding``, ``Upgrade``, ``Proxy-Authenticate``/``-Authorization``, and
``Trailers`` (RFC 2616's misspelt list, still dropped by proxies; harmless to drop).
Each caller adds what its own hop must not pass on (``Host``, ``Expect``, the router's
filter headers ...).

**The path rule** (:func:`path_refusal`): a path is forwarded as the caller encoded it,
appended to the upstream's own prefix (``www = "http://127.0.0.1:9100/prefix"``). The
upstream decodes it and resolves dot segments itself, so every segment is decoded *first*
(and split again where ``%2F`` or ``%5C`` decode to ``/`` or ``\\``, as many servers
do) and then judged — splitting on a literal ``/`` before decoding is what let
``/www/..%2fsecret.txt`` out of ``/prefix``. Refused (400, nothing sent upstream):

- a ``.`` or ``..`` segment, literal or percent-encoded, also with a ``;params`` tail
  (``..;/`` is ``..`` to Tomcat and Spring);
- one that appears once ``%2F``/``%5C`` are decoded: ``..%2f``, ``%2e%2e%2f``,
  ``%2E%2E%2F``, ``..%5c``, ``a%2f..%2f..``;
- a literal ``\\`` anywhere (not valid in a URI; many servers read it as ``/``);
- the same hidden under a second layer of encoding (``%252e%252e%252f``: servers that
  decode twice exist) and overlong UTF-8 forms of ``/``, ``\\`` and ``.`` (``%c0%af``);
- an encoded NUL (``%00``): no upstream means it, some truncate the path there.

An encoded slash that cannot climb (``/v1/models/org%2Fmodel``, common in model APIs)
passes, as do ``...``, ``.hidden``, ``a..b`` and ``%2e%2e%2e``.

**A dropped exchange is reset** (:class:`ProxyResponse`, the response class of both
proxies' client sessions; :func:`reset`): when the caller hangs up — while its body
uploads, while the answer's head is awaited, mid-answer — the connection to the next hop
is reset (RST), not closed. aiohttp's close is ``transport.close()``, which keeps the
socket open until the write buffer drains, and even a closed socket sends its FIN only
after the data the kernel still holds; when the next hop stopped reading (an upload
backed up behind a slow upstream) neither ever arrives, and the next hop would never
learn that nobody waits. A reset arrives at once (a hop whose reading is paused finds
it at its listener's next sweep: :func:`agent.http.listener.peer_gone`).
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "proxy-authenticate", "proxy-authorization",
})

Headers = CIMultiDict[str] | CIMultiDictProxy[str] | Mapping[str, str]

# Overlong UTF-8 for '/', '.', '\\' (2- and 3-byte forms): decoded by some old servers.
_OVERLONG = re.compile(r"%c0%a[ef]|%c1%9c|%e0%80%a[ef]|%e0%81%9c", re.IGNORECASE)


def connection_named(headers: Headers) -> set[str]:
    """Header names listed in ``Connection`` (lower case): hop-by-hop for this message."""
    getall = getattr(headers, "getall", None)
    values: Iterable[str] = (getall("Connection", ()) if getall is not None
                             else [headers.get("Connection", "")])
    names: set[str] = set()
    for value in values:
        names.update(t.strip().lower() for t in value.split(",") if t.strip())
    return names


def end_to_end(headers: Headers, also: frozenset[str] | set[str] = frozenset(),
               ) -> CIMultiDict[str]:
    """A copy of ``headers`` without the hop-by-hop ones, those ``Connection`` names and
    the (lower-case) names in ``also``; order and repeated headers are kept."""
    named = connection_named(headers) if "Connection" in headers else ()
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        low = key.lower()
        if low in HOP_BY_HOP or low in also or low in named:
            continue
        out.add(key, value)
    return out


def _dot(segment: str) -> bool:
    """``.`` or ``..``, also with a ``;params`` tail (``..;x``)."""
    return segment.partition(";")[0] in (".", "..")


def _pieces(text: str) -> list[str]:
    """What a decoded segment becomes for a server that reads ``\\`` as ``/``."""
    return text.replace("\\", "/").split("/")


def _segment_refusal(seg: str) -> str | None:
    """Why one raw segment may not be forwarded, or None."""
    if "%" not in seg:
        return "a '.' or '..' segment" if _dot(seg) else None
    if _OVERLONG.search(seg):
        return "an overlong UTF-8 escape"
    decoded = urllib.parse.unquote(seg)
    for text in (decoded, urllib.parse.unquote(decoded)):    # once, and a second layer
        if "\x00" in text:
            return "an encoded NUL (%00)"
        if any(_dot(piece) for piece in _pieces(text)):
            return "a '.' or '..' segment once decoded (%2E, %2F, %5C and their mixes)"
    return None


def path_refusal(raw_path: str) -> str | None:
    """Why ``raw_path`` (still percent-encoded, query allowed) could leave an upstream's
    path prefix once the upstream decodes it; None when it may be forwarded as is."""
    path = raw_path.partition("?")[0]
    if "\\" in path:
        return "path must not contain '\\' (servers read it as '/')"
    if "." not in path and "%" not in path:       # the common case, without a split
        return None
    for seg in path.split("/"):
        why = _segment_refusal(seg)
        if why is not None:
            return f"path must not contain {why}: it could leave the upstream's prefix " \
                   "(path segments are judged decoded)"
    return None


class ProxyResponse(aiohttp.ClientResponse):
    """A client response whose connection is aborted (RST, buffers dropped) when the
    exchange is dropped unfinished: closed before or while its head is read (a
    cancellation included), or released with its body not read to the end. A finished
    exchange is released as usual and its connection may be kept alive."""

    def close(self) -> None:
        _abort(self._connection)
        super().close()

    def release(self) -> Any:
        content = getattr(self, "content", None)
        if content is not None and not content.is_eof():
            _abort(self._connection)
        return super().release()


def _abort(connection: aiohttp.connector.Connection | None) -> None:
    reset(connection.transport if connection is not None else None)


_LINGER_RESET = struct.pack("ii", 1, 0)


def reset(transport: asyncio.BaseTransport | None) -> None:
    """Abort ``transport`` with a TCP reset. ``abort()`` alone drops only the user-space
    buffer: the kernel still sends what it holds and queues the FIN behind it, and when
    the peer stopped reading (a backed-up upload) that FIN never arrives. ``SO_LINGER``
    with a zero timeout makes the close drop the kernel's buffer and send RST."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except (OSError, ValueError, TypeError):
            pass                      # not a TCP socket (or closed): a plain abort then
    transport.abort()
