"""A streaming upstream for the stream tests (the token server a worker's gateway fronts),
on its own aiohttp loop in a background thread of the test process.

Each request names a ``?id=`` the test chose; the upstream keeps a :class:`Call` per id
so a test can steer one stream and observe it without sleeping:

* ``GET /sse?id=&n=N`` (``text/event-stream``) and ``GET /ndjson?id=&n=N``
  (``application/x-ndjson``) — writes part ``i``, then waits until the test
  :meth:`StreamUpstream.ack`\\ s it before writing part ``i + 1``: a part that is held
  anywhere on the way makes the test time out instead of passing; with ``&head_first=1``
  part 0 waits for the ack of the head (part -1), with ``&declared=1`` the answer has a
  ``Content-Length`` (a stream of announced length: still relayed as it comes);
* ``GET /gaps?id=&n=N&gap=S`` — N events, S seconds of silence between two (the pause is
  the behaviour under test: a stream that keeps sending);
* ``GET /silent?id=`` — one event, then silence until the caller goes;
* ``GET /hold?id=`` — no answer head at all until the caller goes;
* ``POST /upload?id=`` — reads the body as it comes (``body_bytes``; ``first`` once the
  first chunk arrived) and never answers: an upload still in progress; with
  ``&answer=1`` it answers the body's size once the whole body arrived; with ``&slow=S``
  it reads 64 KiB every S seconds (a fast upload backs up into every buffer on the way,
  and each hop stops reading from the one before). The listening socket's receive
  buffer is fixed at :data:`RCVBUF` (no autotuning): a slow reader learns of a reset
  only after it has read what its kernel holds, and an autotuned loopback buffer held
  2-3 MiB, 6-9 s of reading at 0.2 s per 64 KiB — the test would time the test
  upstream's buffer, not the agent's hang-up;
* ``GET /break?id=`` — one event, then the connection is aborted (a stream cut mid-way);
  with ``&at=0`` aborted before any byte of the answer.

Every handler counts its hits per id and sets the call's ``gone`` event when it learns
that its client went away (the server runs with ``handler_cancellation``, so a hang-up
cancels the handler; a failed write counts as well). ``first`` is set when the first
part was written and ``sent[i]`` is the ``time.monotonic()`` of part ``i``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from aiohttp import web

T = TypeVar("T")

_Handler = Callable[[web.Request, "Call"], Awaitable[web.StreamResponse]]
RCVBUF = 64 * 1024      # the upstream's socket receive buffer (the kernel doubles it)


@dataclass
class Call:
    """What the upstream knows of the requests carrying one ``id``."""

    hits: int = 0
    acked: int = -2                 # the highest part the test acknowledged (-1: the head)
    sent: list[float] = field(default_factory=list)
    first: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    gone_at: float = 0.0
    body_bytes: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def went(self) -> None:
        if not self.gone.is_set():
            self.gone_at = time.monotonic()
            self.gone.set()


class StreamUpstream:
    """``start()`` serves on ``host``:any port until ``stop()``; ``url`` is its base."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.url = ""
        self.calls: dict[str, Call] = {}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="stream-upstream")
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ test side
    def start(self) -> StreamUpstream:
        self._thread.start()
        self.url = self._run(self._start())
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self._run(self._runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def _run(self, coro: Awaitable[T], timeout: float = 10.0) -> T:
        async def wrap() -> T:
            return await coro
        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(timeout)

    def call(self, cid: str) -> Call:
        """The :class:`Call` of ``cid`` (made on the upstream's loop: its events live there)."""
        async def get() -> Call:
            return self._call(cid)
        return self._run(get())

    def ack(self, cid: str, part: int) -> None:
        """The test received part ``part`` of stream ``cid``: the next one may go."""
        async def set_acked() -> None:
            c = self._call(cid)
            async with c.changed:
                c.acked = max(c.acked, part)
                c.changed.notify_all()
        self._run(set_acked())

    async def wait(self, cid: str, what: str, timeout: float) -> bool:  # noqa: ASYNC109
        """From the test's loop: whether ``cid``'s event ``what`` ("gone" or "first") was
        set within ``timeout`` seconds."""
        async def on_upstream() -> bool:
            event: asyncio.Event = getattr(self._call(cid), what)
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except TimeoutError:
                return False
            return True
        fut = asyncio.run_coroutine_threadsafe(on_upstream(), self.loop)
        return await asyncio.wrap_future(fut)

    # ------------------------------------------------------------------ upstream side
    def _call(self, cid: str) -> Call:
        c = self.calls.get(cid)
        if c is None:
            c = self.calls[cid] = Call()
        return c

    async def _start(self) -> str:
        app = web.Application()
        for path, fn in (("/sse", self._sse), ("/ndjson", self._ndjson), ("/gaps", self._gaps),
                         ("/silent", self._silent), ("/hold", self._hold),
                         ("/break", self._break)):
            app.router.add_get(path, self._tracked(fn))
        app.router.add_post("/upload", self._tracked(self._upload))
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)   # inherited on accept
        sock.bind((self.host, 0))
        site = web.SockSite(self._runner, sock)
        await site.start()
        return f"http://{self.host}:{sock.getsockname()[1]}"

    def _tracked(self, fn: _Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            call = self._call(request.query.get("id", ""))
            call.hits += 1
            try:
                return await fn(request, call)
            except (asyncio.CancelledError, ConnectionError):
                call.went()              # the client went away (cancelled, or a write failed)
                raise
        return handler

    @staticmethod
    async def _open(request: web.Request, ctype: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": ctype, "Cache-Control": "no-cache"})
        await resp.prepare(request)
        return resp

    @staticmethod
    async def _part(resp: web.StreamResponse, call: Call, data: bytes) -> None:
        call.sent.append(time.monotonic())      # before the write: the reader may be quicker
        call.first.set()
        await resp.write(data)

    async def _acked_stream(self, request: web.Request, call: Call, ctype: str,
                            render: Callable[[int], bytes]) -> web.StreamResponse:
        n = int(request.query.get("n", "5"))
        resp = web.StreamResponse(headers={"Content-Type": ctype, "Cache-Control": "no-cache"})
        if request.query.get("declared") == "1":          # a stream of announced length
            resp.content_length = sum(len(render(i)) for i in range(n))
        await resp.prepare(request)
        for i in range(n):
            if i or request.query.get("head_first") == "1":
                async with call.changed:        # part i waits for the ack of part i - 1
                    await asyncio.wait_for(call.changed.wait_for(      # (-1: the head)
                        lambda part=i - 1: call.acked >= part), 30)
            await self._part(resp, call, render(i))
        await resp.write_eof()
        return resp

    async def _sse(self, request: web.Request, call: Call) -> web.StreamResponse:
        return await self._acked_stream(request, call, "text/event-stream",
                                        lambda i: f"id: {i}\ndata: token {i}\n\n".encode())

    async def _ndjson(self, request: web.Request, call: Call) -> web.StreamResponse:
        return await self._acked_stream(
            request, call, "application/x-ndjson",
            lambda i: (json.dumps({"token": i}) + "\n").encode())

    async def _gaps(self, request: web.Request, call: Call) -> web.StreamResponse:
        n = int(request.query.get("n", "5"))
        gap = float(request.query.get("gap", "0.1"))
        resp = await self._open(request, "text/event-stream")
        for i in range(n):
            if i:
                await asyncio.sleep(gap)
            await self._part(resp, call, f"data: {i}\n\n".encode())
        await resp.write_eof()
        return resp

    async def _silent(self, request: web.Request, call: Call) -> web.StreamResponse:
        resp = await self._open(request, "text/event-stream")
        await self._part(resp, call, b"data: 0\n\n")
        await asyncio.Event().wait()            # until cancelled: the caller went away
        return resp

    async def _hold(self, request: web.Request, call: Call) -> web.StreamResponse:
        call.first.set()                        # the request arrived; no head follows
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def _upload(self, request: web.Request, call: Call) -> web.StreamResponse:
        slow = float(request.query.get("slow", "0"))
        while True:
            chunk = await (request.content.read(65536) if slow
                           else request.content.readany())
            if not chunk:
                break
            call.body_bytes += len(chunk)
            call.first.set()                    # the upload is under way
            if slow:
                await asyncio.sleep(slow)       # a slow reader: the body backs up
        if request.query.get("answer") == "1":
            return web.json_response({"bytes": call.body_bytes})
        await asyncio.Event().wait()            # a whole body: still no answer
        raise AssertionError("unreachable")

    async def _break(self, request: web.Request, call: Call) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if request.query.get("at") != "0":
            await resp.prepare(request)
            await self._part(resp, call, b"data: 0\n\n")
        assert request.transport is not None
        request.transport.abort()
        return resp
