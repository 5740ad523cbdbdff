"""A real aiohttp upstream server for gateway tests, run on its own thread and loop.

It stands for the GPU service a worker fronts. Every route records what it saw, so a test
can tell whether a request reached the upstream at all (``hits``), and some routes hold
their answer until the test says so, so streaming is observed rather than inferred:

- ``ANY /echo/...``  -> JSON: method, raw path with query, headers, body length and SHA-256
- ``PUT|POST /upload`` -> JSON: body length and SHA-256, hashed while it streams in
- ``GET /download?size=N`` -> N bytes of ``pattern_block`` data (Content-Length set)
- ``GET /sse``  -> ``text/event-stream``: one event, then waits for ``release`` before the
  last one (``finished`` is set only after that)
- ``GET /chunked`` -> chunked plain text, same hold as ``/sse``
- ``GET /hold`` -> streams until ``release``; counts ``holding``
- ``GET /slow?delay=S`` -> answers after S seconds or once ``slow_release`` is set
  (``hits["slow_answered"]`` counts the answers)
- ``GET /hop`` -> an answer carrying hop-by-hop headers
- ``GET /health`` -> 200 (the health path tests configure)
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

from aiohttp import web

BLOCK = 1 << 20
_BASE = hashlib.sha256(b"gateway-test").digest() * (BLOCK // 32)


def pattern_block(i: int) -> bytes:
    """Block ``i`` of the deterministic test stream (1 MiB, differs per block)."""
    return i.to_bytes(8, "big") + _BASE[8:]


def pattern(size: int) -> Iterator[bytes]:
    """``size`` bytes of the test stream, in blocks."""
    i = 0
    while size > 0:
        block = pattern_block(i)[:size]
        yield block
        size -= len(block)
        i += 1


def pattern_sha256(size: int) -> str:
    h = hashlib.sha256()
    for block in pattern(size):
        h.update(block)
    return h.hexdigest()


class Upstream:
    """``start()`` serves on 127.0.0.1:``port`` (0 = any) until ``stop()``; restartable."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.hits: Counter[str] = Counter()
        self.holding = 0
        self.release = threading.Event()
        self.finished = threading.Event()
        self.slow_release = threading.Event()
        self.last: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ handlers
    async def _echo(self, request: web.Request) -> web.Response:
        self.hits["echo"] += 1
        h = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_chunked(65536):
            h.update(chunk)
            n += len(chunk)
        self.last = {"method": request.method, "path": request.raw_path,
                     "headers": [[k, v] for k, v in request.headers.items()],
                     "length": n, "sha256": h.hexdigest()}
        return web.json_response(self.last, headers={"X-Upstream": "echo"})

    async def _upload(self, request: web.Request) -> web.Response:
        self.hits["upload"] += 1
        h = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            h.update(chunk)
            n += len(chunk)
        return web.json_response({"length": n, "sha256": h.hexdigest()})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        self.hits["download"] += 1
        size = int(request.query["size"])
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        for block in pattern(size):
            await resp.write(block)
        await resp.write_eof()
        return resp

    async def _held_stream(self, request: web.Request, ctype: str,
                           parts: tuple[bytes, bytes]) -> web.StreamResponse:
        self.finished.clear()
        resp = web.StreamResponse(headers={"Content-Type": ctype, "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(parts[0])
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.release.wait, 15.0)
        await resp.write(parts[1])
        await resp.write_eof()
        self.finished.set()
        return resp

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        self.hits["sse"] += 1
        return await self._held_stream(request, "text/event-stream",
                                       (b"event: tick\ndata: first\n\n", b"data: last\n\n"))

    async def _chunked(self, request: web.Request) -> web.StreamResponse:
        self.hits["chunked"] += 1
        return await self._held_stream(request, "text/plain", (b"part one;", b"part two."))

    async def _hold(self, request: web.Request) -> web.StreamResponse:
        """Busy until ``release``: a space every 0.2 s keeps the gateway's read timeout
        (``upstream_timeout``) from firing, as a long-running streamed answer would."""
        self.hits["hold"] += 1
        self.holding += 1
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
            await resp.prepare(request)
            deadline = asyncio.get_running_loop().time() + 15.0
            while not self.release.is_set() and asyncio.get_running_loop().time() < deadline:
                await resp.write(b" ")
                await asyncio.sleep(0.2)
            await resp.write(b"held")
            await resp.write_eof()
            return resp
        finally:
            self.holding -= 1

    async def _slow(self, request: web.Request) -> web.Response:
        self.hits["slow"] += 1
        # answers after `delay` s, or as soon as the test sets `slow_release`
        await asyncio.get_running_loop().run_in_executor(
            None, self.slow_release.wait, float(request.query.get("delay", "3")))
        self.hits["slow_answered"] += 1
        return web.json_response({"slow": True})

    async def _hop(self, request: web.Request) -> web.Response:
        self.hits["hop"] += 1
        return web.Response(text="hop", headers={
            "Connection": "X-Hop-Resp, keep-alive", "X-Hop-Resp": "secret",
            "Keep-Alive": "timeout=5", "Proxy-Authenticate": "Basic realm=x",
            "Trailer": "X-Trailing", "Upgrade": "h2c", "X-End-To-End": "kept"})

    async def _health(self, request: web.Request) -> web.Response:
        self.hits["health"] += 1
        return web.json_response({"ok": True})

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        r = app.router
        r.add_route("*", "/echo/{tail:.*}", self._echo)
        r.add_put("/upload", self._upload)
        r.add_post("/upload", self._upload)
        r.add_get("/download", self._download)
        r.add_get("/sse", self._sse)
        r.add_get("/chunked", self._chunked)
        r.add_get("/hold", self._hold)
        r.add_get("/slow", self._slow)
        r.add_get("/hop", self._hop)
        r.add_get("/health", self._health)
        return app

    # ------------------------------------------------------------------ thread
    def start(self) -> Upstream:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def serve() -> None:
                self._runner = web.AppRunner(self._app(), access_log=None)
                await self._runner.setup()
                site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
                await site.start()
                sock = site._server.sockets[0]  # type: ignore[union-attr]
                self.port = sock.getsockname()[1]

            try:
                loop.run_until_complete(serve())
            except BaseException as exc:       # reported to start()'s caller
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())  # type: ignore[union-attr]
            loop.close()

        self._thread = threading.Thread(target=run, name="upstream", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self.release.set()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None
        self._thread = None
        self.release.clear()
