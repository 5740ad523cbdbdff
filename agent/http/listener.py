"""The agent's HTTP listeners (admin ``http.listen`` and public ``gateway.listen``).

aiohttp serves the requests; this module bounds what one client can hold of it (the
numbers and their reasons are in :mod:`agent.http.budget`, the bookkeeping in
:mod:`agent.http.connections`). Each accepted connection is a :class:`GuardedHandler`, an
aiohttp ``RequestHandler`` that also knows its state:

- **IDLE** — waiting for a request: closed after the keep-alive timeout (or, if it never
  sent anything, after the head timeout);
- **HEAD** — a request head is arriving: closed with 408 when the whole head did not
  arrive within the head timeout (slow-loris), with 431 past the per-head size cap, or with
  503 when it is the oldest head and all heads in progress passed their memory budget;
- **ACTIVE** — a request is being handled: closed when its body stalls (no byte for the
  body-idle timeout while we wait to read) or the caller stops reading the answer (writes
  blocked for the send timeout), and — at the next sweep — when the caller hung up while
  we were not reading (:func:`peer_gone`), so its handler is cancelled. The handler's own time is the handler's business (the
  gateway has ``upstream_timeout``).

aiohttp has no hook for these, so the handler reads two of its fields: ``_request_count``
(heads parsed on this connection) and ``_reading_paused`` (we stopped reading, not the
caller); ``tests/http/test_listener.py`` fails if an aiohttp upgrade renames them.

A connection over the caps is answered ``503`` + ``Retry-After`` and closed right after
accept; it never reaches aiohttp. Handler cancellation (a caller that hangs up cancels its
handler) is on for both listeners: the gateway's proxied requests and the admin API's
routed ones (``/route/``) stop working for nobody and free their slots at once.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from agent.config import Address
from agent.http.budget import ListenerLimits
from agent.http.connections import (
    ACTIVE,
    HEAD,
    IDLE,
    ConnectionTable,
    ListenerMetrics,
)
from agent.netgroups import address_unit

_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}
BACKLOG = 1024          # the kernel's accept queue (aiohttp's default is 128)
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)
_GONE_STATES = frozenset({7, 8})     # Linux tcp_states.h: TCP_CLOSE, TCP_CLOSE_WAIT


def _answer(status: int, message: str) -> bytes:
    """A complete ``Connection: close`` answer with a JSON error body."""
    body = json.dumps({"error": message}).encode()
    extra = "Retry-After: 1\r\n" if status == 503 else ""
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode() + body


class GuardedHandler(RequestHandler):
    """aiohttp's per-connection protocol, with the state the listener's bounds need."""

    __slots__ = ("_draining", "_refused", "_request", "_table", "_write_paused_at",
                 "head_bytes", "key", "served", "since", "state")

    def __init__(self, table: ConnectionTable, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._table = table
        self.state = IDLE
        self.since = 0.0
        self.head_bytes = 0
        self.served = 0
        self.key = ""
        self._refused = False
        self._draining = False      # the handler returned; its body is still arriving
        self._request: web.BaseRequest | None = None
        self._write_paused_at = 0.0

    # ------------------------------------------------------------------ asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.key = address_unit(str(peer[0])) if isinstance(peer, tuple) and peer else ""
        self.since = self._loop.time()
        reason = self._table.admit(self)
        if reason is not None:
            # over a cap: a clear answer, then close; aiohttp never sees this connection
            self._refused = True
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(_answer(503, f"{self._table.name} listener: too many "
                                         "connections, try again"))
            transport.close()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        self._table.forget(self)
        self._request = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == ACTIVE:
            self.since = self._loop.time()
            super().data_received(data)
            if self._draining and (self._request is None or self._request.content.is_eof()):
                self._idle()
            return
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:          # a whole head arrived
            self.state = ACTIVE
            self.since = self._loop.time()
            self._table.became_active(self)
            return
        if state == IDLE:
            self.state = HEAD
            self.since = self._loop.time()
            self._table.head_started(self)
        self._table.head_grew(self, len(data))

    def pause_writing(self) -> None:
        self._write_paused_at = self._loop.time()
        super().pause_writing()

    def resume_writing(self) -> None:
        self._write_paused_at = 0.0
        super().resume_writing()

    # ------------------------------------------------------------------ the table's view
    def begin(self, request: web.BaseRequest) -> None:
        """The handler starts on ``request`` (called by :func:`track`)."""
        if self.state != ACTIVE:
            self._table.became_active(self)
        self.state = ACTIVE
        self._draining = False
        self.served += 1
        self.since = self._loop.time()
        self._request = request

    def end(self) -> None:
        """The handler returned: idle again, newest in the eviction order — once the
        request's body has arrived (aiohttp reads and drops what the handler left, and
        those bytes are body, not the next head)."""
        request = self._request
        if request is not None and not request.content.is_eof():
            self._draining = True
            return
        self._idle()

    def _idle(self) -> None:
        self._draining = False
        self._request = None
        if self._request_count > self.served:
            return           # the next request is parsed already (pipelined): still busy
        self.state = IDLE
        self.since = self._loop.time()
        self._table.became_idle(self)

    def stalled(self, now: float, limits: ListenerLimits) -> str | None:
        """Why an ACTIVE connection should be closed now, or None."""
        if self._write_paused_at and now - self._write_paused_at > limits.send_timeout:
            return "send_timeout"
        request = self._request
        if self._reading_paused and peer_gone(self.transport):
            return "peer_gone"
        if request is None or request.content.is_eof() or self._reading_paused:
            return None        # no body pending, or we are the ones not reading it
        if now - self.since > limits.body_idle_timeout:
            return "body_timeout"
        return None

    def evictable(self) -> bool:
        """Idle or half-sent, with nothing of ours still to deliver."""
        transport = self.transport
        return self.state != ACTIVE and (transport is None
                                         or transport.get_write_buffer_size() == 0)

    def shed(self, status: int, message: str) -> None:
        transport = self.transport
        if transport is None:
            return
        if status and self.state != ACTIVE:
            transport.write(_answer(status, f"{self._table.name} listener: {message}"))
            self.force_close()                  # flushes what was written, then closes
        else:
            transport.abort()                   # mid-request: a broken connection is honest

    def close_idle(self) -> None:
        self.force_close()


def peer_gone(transport: asyncio.BaseTransport | None) -> bool:
    """Whether the peer of a connection we stopped reading has closed or reset it.

    A paused transport does not poll its socket for reading, so it never sees the
    caller's FIN or RST: a caller that hangs up while its upload is backed up (the next
    hop is slow to read it) would leave the handler waiting for nobody. The kernel knows:
    the socket left ESTABLISHED for CLOSE_WAIT (FIN) or CLOSE (RST). Linux ``TCP_INFO``;
    False wherever it cannot be asked."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or _TCP_INFO is None:
        return False
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0]
    except (OSError, ValueError, TypeError, IndexError):
        return False
    return state in _GONE_STATES


_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def track(inner: _Handler) -> _Handler:
    """Wrap the server's request handler so each connection knows when a request runs."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        conn = request.protocol
        if not isinstance(conn, GuardedHandler):
            return await inner(request)
        conn.begin(request)
        try:
            return await inner(request)
        finally:
            conn.end()

    return handle


class GuardedSite(web.BaseSite):
    """A TCP site whose connections are :class:`GuardedHandler`\\ s of one table."""

    __slots__ = ("_factory", "_host", "_port")

    def __init__(self, runner: web.AppRunner, host: str, port: int,
                 factory: Callable[[], GuardedHandler]) -> None:
        super().__init__(runner, backlog=BACKLOG)
        self._host, self._port, self._factory = host, port, factory

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, self._host or None,
                                                self._port, backlog=self._backlog,
                                                reuse_address=True)
        if self._port == 0 and self._server.sockets:       # "any port": the one we got
            self._port = int(self._server.sockets[0].getsockname()[1])

    @property
    def port(self) -> int:
        return self._port


async def serve(app: web.Application, listen: Address, *, name: str, limits: ListenerLimits,
                metrics: ListenerMetrics, handler_cancellation: bool = True,
                ) -> tuple[web.AppRunner, str, ConnectionTable]:
    """Serve ``app`` on ``listen`` within ``limits``; (runner, the URL a local client
    reaches it at, the connection table). ``runner.cleanup()`` also stops the sweep."""
    table = ConnectionTable(name, limits, metrics)
    app.on_cleanup.append(table.stop)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
                           handler_cancellation=handler_cancellation)
    await runner.setup()
    try:
        server = runner.server
        assert server is not None
        server.request_handler = track(server.request_handler)
        loop = asyncio.get_running_loop()
        # aiohttp's own keep-alive timer is only a backstop behind the table's deadlines
        kwargs: dict[str, Any] = {
            "loop": loop, "access_log": None, "max_line_size": limits.max_line_size,
            "max_field_size": limits.max_field_size, "max_headers": limits.max_headers,
            "keepalive_timeout": limits.keepalive_timeout + limits.head_timeout + 5}
        site = GuardedSite(runner, listen.host, listen.port,
                           lambda: GuardedHandler(table, server, **kwargs))
        await site.start()
        table.start()
    except BaseException:
        await runner.cleanup()
        raise
    host = "127.0.0.1" if listen.host in ("0.0.0.0", "") else listen.host
    host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
    return runner, f"http://{host}:{site.port}", table
