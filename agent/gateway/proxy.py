"""The streaming reverse proxy behind ``ANY /{service}/{path}`` on a worker's gateway.

Why it is written this way:

- **Streams, never buffers.** The request body is read from ``request.content`` chunk by
  chunk and handed to the upstream request as an async generator; the answer is copied
  from the upstream's ``content`` into a ``web.StreamResponse`` as it arrives — its head
  at once, then each chunk as it comes. Only a small answer that is *already all here*
  (declared length <= ``SMALL_BODY``, body parsed with the head) is sent in one write: an
  answer is never held back waiting for more of it, even one that announces its length. Both sides
  have flow control (aiohttp pauses reading a socket whose buffer is full, and ``write``
  waits for the peer to drain), so memory stays flat whatever the body size and a
  ``text/event-stream`` answer reaches the caller event by event.
- **Hop-by-hop headers stay on their hop** and **paths stay inside the upstream's
  prefix**: the rules are :mod:`agent.http.forwarding`'s, shared with the router. Each
  hop frames its own body.
- **No decompression** and no headers added that the caller did not send (no
  ``Accept-Encoding``, ``User-Agent``, ``Content-Type``): the upstream sees the caller's
  request and the caller gets the upstream's bytes.
- **Errors say whether the work was done.** Nothing reached the upstream (service full,
  connect failure, no upstream configured) -> ``RMA-Not-Processed: 1``, so a router may
  retry any method elsewhere; after that the gateway cannot know, and says nothing.
- **A caller that hangs up** cancels the handler (the listener runs with
  ``handler_cancellation``): the upstream connection is reset, never pooled half-read
  (:class:`agent.http.forwarding.ProxyResponse`; the lean path resets its own), so the
  upstream sees its caller go — while the body uploads, before the answer's head, or
  mid-answer — and an inference server stops generating for nobody.
- **Limits**: ``gateway.max_body_mb`` (413, checked against ``Content-Length`` up front
  and counted on chunked bodies as they stream) and ``gateway.upstream_timeout``
  (nginx's ``proxy_read_timeout``: the longest the upstream may stay silent, before its
  answer starts or between two chunks; 504 when the answer had not started).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from agent.gateway.upstream import Origin, Pool, UpstreamUnreachable, exchange
from agent.http.forwarding import (
    HOP_BY_HOP,
    ProxyResponse,
    connection_named,
    end_to_end,
    path_refusal,
    reset,
)

if TYPE_CHECKING:
    from agent.config import GatewaySection, Upstream

log = logging.getLogger("rma_agent.gateway")

CHUNK = 64 * 1024
# Bodies of at most this size with a declared length are read whole and sent with their
# message head in one write (a syscall per message instead of three); memory per request
# stays bounded by it, and anything larger or of unknown length streams.
SMALL_BODY = 64 * 1024
CONNECT_TIMEOUT = 10.0        # seconds to open a TCP connection to the upstream (at most)
NOT_PROCESSED = "RMA-Not-Processed"
# only the gateway itself says it (routers retry on it): dropped from upstreams' answers
UPSTREAM_ANSWER_DROP = frozenset({NOT_PROCESSED.lower()})

# ``Expect`` is answered by our own server (100-continue is per hop); ``Host`` is the
# upstream's own.
REQUEST_DROP = HOP_BY_HOP | {"host", "expect", "content-length"}
# RFC 9110 §9.2.2: may be sent again when a kept-alive connection closes under them
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# methods sent without Content-Length when they carry no body (as aiohttp's client does)
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class BodyTooLarge(Exception):
    """The request body grew past ``gateway.max_body_mb`` while streaming."""


def _forwarded_node(ip: str) -> str:
    """RFC 7239 node: IPv6 in quotes and brackets, others bare."""
    return f'"[{ip}]"' if ":" in ip else ip


def forward_pairs(request: web.Request) -> list[tuple[str, str]]:
    """The headers the upstream gets, in order: the end-to-end ones, then
    ``X-Forwarded-For`` and ``Forwarded`` (both appended to, never replaced) and
    ``X-Forwarded-Host``/``-Proto`` unless the caller sent them. One pass over the
    caller's headers: this runs for every proxied request."""
    headers = request.headers
    named = connection_named(headers) if "Connection" in headers else ()
    out: list[tuple[str, str]] = []
    xff: list[str] = []
    fwd: list[str] = []
    has_xfh = has_xfp = False
    for key, value in headers.items():
        low = key.lower()
        if low == "x-forwarded-for":
            xff.append(value)
            continue
        if low == "forwarded":
            fwd.append(value)
            continue
        if low in REQUEST_DROP or low in named:
            continue
        if low == "x-forwarded-host":
            has_xfh = True
        elif low == "x-forwarded-proto":
            has_xfp = True
        out.append((key, value))
    peer = request.remote or "unknown"
    out.append(("X-Forwarded-For", f"{', '.join(xff)}, {peer}" if xff else peer))
    host = headers.get("Host", "")
    scheme = request.scheme
    element = f"for={_forwarded_node(peer)};proto={scheme}"
    if host and host.isprintable() and '"' not in host and ";" not in host \
            and "," not in host:
        element += f';host="{host}"'
    out.append(("Forwarded", f"{', '.join(fwd)}, {element}" if fwd else element))
    if host and not has_xfh:
        out.append(("X-Forwarded-Host", host))
    if not has_xfp:
        out.append(("X-Forwarded-Proto", scheme))
    return out


def forward_headers(request: web.Request) -> CIMultiDict[str]:
    """``forward_pairs`` as a multidict (for the general ``ClientSession`` path)."""
    return CIMultiDict(forward_pairs(request))


def request_head(request: web.Request, origin: Origin, body: bytes | None) -> bytes:
    """The request head for the lean path (``agent.gateway.upstream``), body appended.

    ``Content-Length`` is the body's; a method that normally has a body gets ``0``
    without one (what the session sends). Header values are passed on byte for byte (the
    server decoded them with ``surrogateescape``); CR/LF cannot occur in them (the
    request parser refuses them)."""
    lines = [f"{request.method} {origin.target(request.raw_path)} HTTP/1.1\r\n"
             f"Host: {origin.host_header}\r\n"]
    for k, v in forward_pairs(request):
        lines.append(f"{k}: {v}\r\n")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    elif request.method not in _BODYLESS_METHODS:
        lines.append("Content-Length: 0\r\n\r\n")
    else:
        lines.append("\r\n")
    head = "".join(lines).encode("utf-8", "surrogateescape")
    return head + body if body else head


def target_url(upstream: Upstream, raw_path: str) -> URL:
    """``upstream.url`` + the request's path after ``/{service}``, with its query, kept
    exactly as the caller encoded them (no decoding and re-encoding on the way)."""
    path, sep, query = raw_path.partition("?")
    rest = path[1:].partition("/")
    tail = ("/" + rest[2]) if rest[1] else ""
    return URL(upstream.url + tail + (sep + query if sep else ""), encoded=True)


def error(status: int, message: str, *, not_processed: bool = False,
          headers: Mapping[str, str] | None = None) -> web.Response:
    h = dict(headers or {})
    if not_processed:
        h[NOT_PROCESSED] = "1"
    return web.json_response({"error": message}, status=status, headers=h)


def new_session(limit: int) -> aiohttp.ClientSession:
    """The upstream client: no decompression, no headers of its own, no cookie jar."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=0, force_close=False),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None),
        response_class=ProxyResponse,       # a dropped exchange aborts its connection
    )


class Outcome:
    """How one proxied request ended, for metrics (see ``GatewayComponent``)."""

    OK = "ok"                       # upstream answered and the answer was relayed
    BAD_REQUEST = "bad_request"     # refused before reaching the upstream
    TOO_LARGE = "too_large"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"     # connect failed: not processed
    UPSTREAM_ERROR = "upstream_error"
    ABORTED = "aborted"             # the caller went away, or the stream broke mid-way


async def proxy(request: web.Request, session: aiohttp.ClientSession, upstream: Upstream,
                gw: GatewaySection, pool: Pool | None = None,
                ) -> tuple[web.StreamResponse, str, int, int]:
    """Forward ``request`` to ``upstream``; (response, outcome, bytes in, bytes out).

    With a ``pool`` (a plain-HTTP upstream), a request without a body or with a small
    declared one takes the lean path (``agent.gateway.upstream``); the rest, and every
    request to an ``https://`` upstream, goes through ``session``."""
    limit = gw.max_body_bytes
    refusal = path_refusal(request.raw_path)
    if refusal is not None:
        return error(400, refusal, not_processed=True), Outcome.BAD_REQUEST, 0, 0
    if request.content_length is not None and request.content_length > limit:
        return (error(413, f"request body of {request.content_length} bytes is over the "
                           f"gateway's limit of {gw.max_body_mb} MiB (gateway.max_body_mb)",
                      not_processed=True), Outcome.TOO_LARGE, 0, 0)
    received = 0
    too_large = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal received, too_large
        async for chunk in request.content.iter_chunked(CHUNK):
            received += len(chunk)
            if received > limit:
                too_large = True
                raise BodyTooLarge
            yield chunk

    declared = request.content_length
    small_request = request.body_exists and declared is not None and declared <= SMALL_BODY
    if pool is not None and (small_request or not request.body_exists):
        return await _proxy_lean(request, pool, gw, small_request)
    headers = forward_headers(request)
    data: AsyncIterator[bytes] | bytes | None = None
    if request.body_exists and not small_request:
        data = body()
        if declared is not None:
            headers["Content-Length"] = str(declared)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(CONNECT_TIMEOUT,
                                                                 gw.upstream_timeout),
                                    sock_read=gw.upstream_timeout)
    url = target_url(upstream, request.raw_path)
    sent = 0
    out: web.StreamResponse | None = None
    try:
        if small_request:
            # a small declared body goes out with the request head in one write
            data = await request.read()
            received = len(data)
        async with session.request(request.method, url, headers=headers, data=data,
                                   allow_redirects=False, timeout=timeout) as resp:
            length = resp.content_length
            if length is not None and length <= SMALL_BODY and request.method != "HEAD" \
                    and resp.content.is_eof():
                # small declared answer, all here: head and body in one write to the caller
                payload = await resp.read()
                out = web.Response(status=resp.status, reason=resp.reason,
                                   headers=end_to_end(resp.headers, UPSTREAM_ANSWER_DROP), body=payload)
                return out, Outcome.OK, received, len(payload)
            # no Content-Length from the upstream -> aiohttp frames the answer chunked
            out = web.StreamResponse(status=resp.status, reason=resp.reason,
                                     headers=end_to_end(resp.headers, UPSTREAM_ANSWER_DROP))
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
                sent += len(chunk)
            await out.write_eof()
            return out, Outcome.OK, received, sent
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return (*_failed(request, out, exc, too_large, gw, url), received, sent)


async def _proxy_lean(request: web.Request, pool: Pool, gw: GatewaySection,
                      has_body: bool) -> tuple[web.StreamResponse, str, int, int]:
    """``proxy`` for a bodiless or small-bodied request over ``pool``'s connections."""
    method = request.method
    received = sent = 0
    out: web.StreamResponse | None = None
    proto = None
    try:
        body = None
        if has_body:
            body = await request.read()
            received = len(body)
        head = request_head(request, pool.origin, body)
        retry = method in IDEMPOTENT_METHODS
        while True:
            proto = await pool.acquire(min(CONNECT_TIMEOUT, gw.upstream_timeout))
            try:
                message, payload = await exchange(proto, head, head_only=method == "HEAD",
                                                  read_timeout=gw.upstream_timeout)
                break
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # The upstream closed a kept-alive connection as the request went out
                # (RFC 9112 §9.3.1): an idempotent request is sent once more on a new
                # connection, as aiohttp's session does.
                proto.close()
                proto = None
                if not retry:
                    raise
                retry = False
        headers = end_to_end(message.headers, UPSTREAM_ANSWER_DROP)
        length = message.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) <= SMALL_BODY \
                and method != "HEAD" and payload.is_eof():
            # small declared answer, all here (parsed with the head): head and body in one
            # write to the caller
            data = payload.read_nowait()
            pool.release(proto, message)
            proto = None
            out = web.Response(status=message.code, reason=message.reason, headers=headers,
                               body=data)
            return out, Outcome.OK, received, len(data)
        # no Content-Length from the upstream -> aiohttp frames the answer chunked
        out = web.StreamResponse(status=message.code, reason=message.reason, headers=headers)
        await out.prepare(request)
        async for chunk in payload.iter_any():
            await out.write(chunk)
            sent += len(chunk)
        await out.write_eof()
        pool.release(proto, message)
        proto = None
        return out, Outcome.OK, received, sent
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return (*_failed(request, out, exc, False, gw, pool.url), received, sent)
    finally:
        if proto is not None:       # failed, cancelled or abandoned: never pooled, and
            reset(proto.transport)  # reset: a close would wait for unsent bytes


def _failed(request: web.Request, out: web.StreamResponse | None, exc: Exception,
            too_large: bool, gw: GatewaySection, url: URL) -> tuple[web.StreamResponse, str]:
    """The answer for a proxied request that failed with ``exc``."""
    if out is not None and out.prepared:
        # Headers are gone: the only honest signal left is a broken connection, so
        # the caller never mistakes a truncated body for a complete one.
        if request.transport is not None:
            request.transport.abort()
        log.debug("gateway: %s %s broken mid-answer: %r", request.method, url, exc)
        return out, Outcome.ABORTED
    return _error_for(exc, too_large, gw, url)


def _error_for(exc: Exception, too_large: bool, gw: GatewaySection,
               url: URL) -> tuple[web.Response, str]:
    """The JSON error for a failure before the answer started."""
    if too_large or isinstance(exc, BodyTooLarge) or isinstance(exc.__cause__, BodyTooLarge):
        return (error(413, f"request body is over the gateway's limit of {gw.max_body_mb} MiB "
                           "(gateway.max_body_mb)"), Outcome.TOO_LARGE)
    if isinstance(exc, UpstreamUnreachable | aiohttp.ClientConnectorError
                  | aiohttp.ConnectionTimeoutError):
        return (error(502, f"upstream {url.origin()} is unreachable: {_why(exc)}",
                      not_processed=True), Outcome.UNREACHABLE)
    if isinstance(exc, TimeoutError):
        return (error(504, f"upstream {url.origin()} sent nothing for {gw.upstream_timeout:g} s "
                           "(gateway.upstream_timeout)"), Outcome.TIMEOUT)
    if isinstance(exc, aiohttp.ClientError):
        return (error(502, f"upstream {url.origin()} failed: {_why(exc)}"),
                Outcome.UPSTREAM_ERROR)
    if isinstance(exc, ConnectionError | aiohttp.http_exceptions.HttpProcessingError):
        return error(400, f"request body broke off: {_why(exc)}"), Outcome.ABORTED
    log.exception("gateway: unexpected error proxying to %s", url)
    return error(502, f"upstream {url.origin()} failed: {type(exc).__name__}"), \
        Outcome.UPSTREAM_ERROR


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
