"""The gateway's lean upstream client: keep-alive connections on raw asyncio transports.

Why not ``aiohttp.ClientSession`` for every request: for a small proxied request the
session's machinery (``ClientRequest``/``ClientResponse`` objects, header multidicts
built and merged three times, timer contexts, tracing hooks, the connector's key lookup)
cost about as much CPU as the rest of the gateway together, and the gateway's
requests/s is bounded by its own CPU. The common case — a plain ``http://`` upstream and
a request without a body or with a small declared one — goes through this module
instead:

- one pool of idle keep-alive connections per upstream origin; a connection goes back
  only when its answer was read to the end and neither side asked to close;
- the request head (and the small body) leave in **one** ``transport.write``;
- the answer is parsed by aiohttp's own protocol/parser pair
  (``aiohttp.client_proto.ResponseHandler`` around the C ``HttpResponseParser``: the
  same strict parsing, body framing, flow control and read timeout as the session has),
  without decompression;
- anything unusual (a streamed or large request body, an ``https://`` upstream) keeps the
  general ``ClientSession`` path in ``agent.gateway.proxy``.

A connection that fails, times out or is abandoned (the caller hung up: the handler is
cancelled) is closed, never pooled, so the upstream sees the hang-up as well.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from dataclasses import dataclass

from aiohttp.client_proto import ResponseHandler
from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import StreamReader
from yarl import URL

IDLE_TIMEOUT = 15.0       # seconds an idle upstream connection is kept (aiohttp's default)
READ_BUFSIZE = 1 << 16    # what the session uses: the payload pauses reading past 2x this


class UpstreamUnreachable(ConnectionError):
    """The TCP connection to the upstream could not be made: nothing was sent."""


@dataclass(frozen=True)
class Origin:
    """Where a plain-HTTP upstream lives: connect address, ``Host`` header, path prefix."""

    host: str
    port: int
    host_header: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Origin | None:
        """The origin of an ``http://`` URL; None for anything the lean path leaves alone."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() != "http" or not parts.hostname or parts.username \
                or parts.password:
            return None
        try:
            port = parts.port or 80
        except ValueError:
            return None
        host = parts.hostname
        netloc = f"[{host}]" if ":" in host else host
        return cls(host, port, netloc if port == 80 else f"{netloc}:{port}", parts.path)

    def target(self, raw_path: str) -> str:
        """The request-target on the upstream: its path prefix + the caller's path after
        ``/{service}``, with the query, exactly as the caller encoded them (the string
        twin of ``proxy.target_url``)."""
        path, _, query = raw_path.partition("?")
        rest = path[1:].partition("/")
        tail = ("/" + rest[2]) if rest[1] else ""
        return (self.prefix + tail or "/") + ("?" + query if query else "")


class Pool:
    """Idle keep-alive connections to one origin, most recently used first."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.url = URL(f"http://{origin.host_header}")     # for error messages
        self._idle: list[tuple[ResponseHandler, float]] = []
        self._closed = False

    async def acquire(self, connect_timeout: float) -> ResponseHandler:
        """An idle live connection, or a new one (``UpstreamUnreachable`` if that fails)."""
        idle = self._idle
        while idle:
            proto, _ = idle.pop()
            if proto.is_connected() and not proto.should_close:
                return proto
            proto.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: ResponseHandler(loop), self.origin.host, self.origin.port)
        except TimeoutError:
            raise UpstreamUnreachable(f"connect timed out after {connect_timeout:g} s") \
                from None
        except OSError as exc:
            raise UpstreamUnreachable(exc.strerror or str(exc) or type(exc).__name__) \
                from None
        return proto

    def release(self, proto: ResponseHandler, message: RawResponseMessage | None) -> None:
        """Pool ``proto`` when its exchange ended cleanly, else close it."""
        if (self._closed or message is None or message.should_close or proto.should_close
                or not proto.is_connected()):
            proto.close()
            return
        self._idle.append((proto, time.monotonic()))

    def sweep(self) -> None:
        """Close connections idle for longer than ``IDLE_TIMEOUT`` (or already dead)."""
        cutoff = time.monotonic() - IDLE_TIMEOUT
        keep = []
        for proto, since in self._idle:
            if since >= cutoff and proto.is_connected():
                keep.append((proto, since))
            else:
                proto.close()
        self._idle = keep

    def close(self) -> None:
        self._closed = True
        for proto, _ in self._idle:
            proto.close()
        self._idle = []


async def exchange(proto: ResponseHandler, head: bytes, *, head_only: bool,
                   read_timeout: float) -> tuple[RawResponseMessage, StreamReader]:
    """Send one request (``head`` holds its head and body) and wait for the answer's head.

    The read timeout runs from the write to the answer's head and then between any two
    reads of its body (``ResponseHandler`` restarts it on every packet), like the
    session's ``sock_read``. Interim 1xx answers are skipped."""
    proto.set_response_params(skip_payload=head_only, read_until_eof=True,
                              auto_decompress=False, read_timeout=read_timeout or None,
                              read_bufsize=READ_BUFSIZE)
    assert proto.transport is not None
    proto.transport.write(head)
    proto.start_timeout()
    while True:
        message, payload = await proto.read()
        if not 100 <= message.code <= 199 or message.code == 101:
            return message, payload
