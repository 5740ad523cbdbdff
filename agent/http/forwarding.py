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
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Mapping

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
