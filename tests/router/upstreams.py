"""Real upstream HTTP services for the end-to-end router tests (the GPU services a worker's
gateway fronts), on one aiohttp loop in a background thread of the test process.

Paths (any prefix the gateway strips is gone by the time they arrive):

* ``/echo/...`` — what arrived: method, path, raw query, headers, body size and SHA-256;
* ``/upload`` — reads the body, answers its size and SHA-256;
* ``/download?mb=N`` — N MiB of deterministic bytes (``block(i)``), Content-Length set;
* ``/events?n=N&gap=S`` — ``text/event-stream``, one event every S seconds, each carrying
  the time it was written;
* ``/slow?s=S`` — answers after S seconds;
* ``/hop`` — an answer carrying hop-by-hop headers (they must not reach the caller);
* ``/hang`` — never answers: holds the request until its caller goes away (``open``
  counts the requests held, ``gone`` those whose caller hung up);
* ``/lie`` — does the work (counted in ``hits``), then answers ``503`` with
  ``RMA-Not-Processed: 1`` (an upstream must not be able to get a POST sent twice).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from typing import Any

from aiohttp import web

MB = 1 << 20


def block(i: int) -> bytes:
    """The i-th MiB of a download (cheap to make, different per block)."""
    return (i.to_bytes(4, "big") * (MB // 4))


def download_sha256(mb: int) -> str:
    h = hashlib.sha256()
    for i in range(mb):
        h.update(block(i))
    return h.hexdigest()


class Upstreams:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="test-upstreams")
        self.thread.start()
        self.runners: list[web.AppRunner] = []
        self.hits: dict[str, int] = {}
        self.open: dict[str, int] = {}
        self.gone: dict[str, int] = {}

    def add(self, name: str, host: str = "127.0.0.1") -> str:
        return asyncio.run_coroutine_threadsafe(self._start(name, host), self.loop).result(10)

    async def _start(self, name: str, host: str) -> str:
        def hit() -> None:
            self.hits[name] = self.hits.get(name, 0) + 1

        async def echo(request: web.Request) -> web.Response:
            hit()
            h = hashlib.sha256()
            size = 0
            async for chunk in request.content.iter_any():
                h.update(chunk)
                size += len(chunk)
            return web.json_response({
                "served_by": name, "method": request.method, "path": request.path,
                "query": request.raw_path.partition("?")[2],
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "size": size, "sha256": h.hexdigest()})

        async def upload(request: web.Request) -> web.Response:
            hit()
            h = hashlib.sha256()
            size = 0
            async for chunk in request.content.iter_any():
                h.update(chunk)
                size += len(chunk)
            return web.json_response({"served_by": name, "size": size,
                                      "sha256": h.hexdigest()})

        async def download(request: web.Request) -> web.StreamResponse:
            hit()
            mb = int(request.query.get("mb", "1"))
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.content_length = mb * MB
            await resp.prepare(request)
            for i in range(mb):
                await resp.write(block(i))
            return resp

        async def events(request: web.Request) -> web.StreamResponse:
            hit()
            n = int(request.query.get("n", "3"))
            gap = float(request.query.get("gap", "0.5"))
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
            await resp.prepare(request)
            for i in range(n):
                await resp.write(f"data: {i} {time.time():.6f}\n\n".encode())
                if i < n - 1:
                    await asyncio.sleep(gap)
            return resp

        async def slow(request: web.Request) -> web.Response:
            hit()
            await asyncio.sleep(float(request.query.get("s", "1")))
            return web.json_response({"served_by": name})

        async def hop(request: web.Request) -> web.Response:
            hit()
            resp = web.json_response({"served_by": name})
            resp.headers["Connection"] = "X-Hop-Named"
            resp.headers["X-Hop-Named"] = "must not cross"
            resp.headers["Keep-Alive"] = "timeout=99"
            resp.headers["Proxy-Authenticate"] = "Basic"
            resp.headers["X-End-To-End"] = "crosses"
            return resp

        async def hang(request: web.Request) -> web.Response:
            hit()
            self.open[name] = self.open.get(name, 0) + 1
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.gone[name] = self.gone.get(name, 0) + 1
                raise
            finally:
                self.open[name] -= 1
            raise AssertionError("unreachable")

        async def lie(request: web.Request) -> web.Response:
            hit()
            await request.read()
            return web.json_response({"served_by": name, "processed": True}, status=503,
                                     headers={"RMA-Not-Processed": "1"})

        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/echo{tail:.*}", echo)
        app.router.add_post("/upload", upload)
        app.router.add_get("/download", download)
        app.router.add_get("/events", events)
        app.router.add_get("/slow", slow)
        app.router.add_get("/hop", hop)
        app.router.add_get("/hang", hang)
        app.router.add_post("/lie", lie)
        # handler_cancellation: /hang learns that its caller went away
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, host, 0)
        await site.start()
        self.runners.append(runner)
        server: Any = site._server
        return f"http://{host}:{server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        async def stop() -> None:
            for r in self.runners:
                await r.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
