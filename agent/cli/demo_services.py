"""The demo's GPU services: one small real HTTP server per worker, standing for the model
server a real box would run behind its gateway (``[gateway.upstreams]``).

Each answers any method on any path after a delay that follows the worker's GPU class
(the class scores of :mod:`agent.discovery.gpu_classes`: an H100 answers in ~12 ms, a T4
in ~54 ms), reads the whole request body, and says who answered::

    {"worker": "worker-1", "gpu": "H100", "ms": 12, "path": "/v1/run", "bytes": 0}

They run on one event loop in a background thread of the demo process, on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web

from agent.config import DEFAULT_GPU_SCORES
from agent.discovery.gpu_classes import GpuScorer

BASE_MS = 60.0


def service_ms(gpu: str) -> float:
    """Milliseconds a request takes on this GPU class: better classes are faster."""
    score = GpuScorer(DEFAULT_GPU_SCORES).score(gpu, 0.0)
    return round(BASE_MS * max(0.1, 1.1 - score), 1)


class DemoServices:
    """The upstreams of all demo workers; ``add`` starts one and returns its URL."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="demo-services",
                                        daemon=True)
        self._thread.start()
        self._runners: list[web.AppRunner] = []
        self.served: dict[str, int] = {}

    def add(self, worker: str, gpu: str) -> str:
        fut = asyncio.run_coroutine_threadsafe(self._start(worker, gpu), self._loop)
        return fut.result(10)

    async def _start(self, worker: str, gpu: str) -> str:
        ms = service_ms(gpu)

        async def handle(request: web.Request) -> web.Response:
            size = 0
            async for chunk in request.content.iter_any():
                size += len(chunk)
            await asyncio.sleep(ms / 1000.0)
            self.served[worker] = self.served.get(worker, 0) + 1
            return web.json_response({"worker": worker, "gpu": gpu, "ms": ms,
                                      "path": request.path, "bytes": size})

        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{path:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runners.append(runner)
        server: Any = site._server
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        async def stop() -> None:
            for r in self._runners:
                await r.cleanup()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()
