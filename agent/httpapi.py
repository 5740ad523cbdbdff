"""The agent's HTTP endpoint (aiohttp, started with AppRunner by the lifecycle).

Core routes live here; components add theirs through ``Component.add_routes``.
Every error is JSON ``{"error": ...}`` with a 4xx status: the middleware turns
aiohttp's HTTP exceptions (404, 405, 400 ...) into JSON, and an unexpected exception in
a handler becomes a logged 500 JSON (a bug of ours, never an HTML page).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from agent.http.same_site import same_site_middleware
from agent.metrics import CONTENT_TYPE_LATEST, render

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from agent.component import Component
    from agent.config import Config

log = logging.getLogger("rma_agent.http")


class ServedAgent(Protocol):
    """What the HTTP apps need of the agent (``agent.lifecycle.Agent``), so that they do
    not import the lifecycle that starts them."""

    config: Config
    registry: CollectorRegistry
    started_at: float
    components: list[Component]

    def readiness(self) -> tuple[bool, list[str]]: ...

    def stats(self) -> dict[str, Any]: ...

    def refresh_metrics(self) -> None: ...


AGENT_KEY: web.AppKey[ServedAgent] = web.AppKey("agent")


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        reason = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 404 and reason == "Not Found":
            reason = f"no such path: {request.path}"
        elif exc.status == 405:
            reason = f"method {request.method} not allowed on {request.path}"
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return web.json_response({"error": reason}, status=exc.status, headers=headers)
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return web.json_response({"error": "internal error"}, status=500)


def _listen_host(request: web.Request) -> str:
    return request.app[AGENT_KEY].config.http.listen.host


def make_app(agent: ServedAgent) -> web.Application:
    """The admin API: core routes, the components' routes, JSON errors, and no
    state change from another site (``agent.http.same_site``)."""
    app = web.Application(middlewares=[json_errors, same_site_middleware(_listen_host)],
                          client_max_size=64 * 1024)
    app[AGENT_KEY] = agent
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/dht/stats", stats)
    for component in agent.components:
        component.add_routes(app)
    return app


async def healthz(request: web.Request) -> web.Response:
    """200 while the process and its loop live (this handler runs on the loop)."""
    agent = request.app[AGENT_KEY]
    return web.json_response({"status": "ok", "uptime_s": round(time.time() - agent.started_at, 3)})


async def readyz(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    ok, reasons = agent.readiness()
    if ok:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready", "reasons": reasons,
                              "error": "; ".join(reasons)}, status=503)


async def metrics(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    agent.refresh_metrics()
    body = render(agent.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT_KEY].stats())
