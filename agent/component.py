"""The shape every part of the agent takes (DHT, roles, discovery, tunnel).

The lifecycle (``agent.lifecycle.Agent``) owns a list of components and drives them:
``add_routes`` / ``add_gateway_routes`` before the HTTP servers start, ``start`` in order,
``reload`` on SIGHUP, ``stop`` in reverse order. Components never touch signals, the loop or sd_notify.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

    from agent.config import Config
    from agent.lifecycle import Agent


class Component:
    """Base class with no-op defaults, so a component implements only what it needs."""

    name: str = "component"

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def add_routes(self, app: web.Application) -> None:
        """Register HTTP routes; called once, before the server starts."""

    def add_gateway_routes(self, app: web.Application) -> None:
        """Register routes on the public gateway listener (``gateway.listen``); only what
        SPEC §5 lists for it belongs there. Called once, before the server starts."""

    async def start(self) -> None:
        """Start background work. Must not block on the network for long: the HTTP
        endpoint and READY=1 wait for every start() to return."""

    async def stop(self) -> None:
        """Leave cleanly (withdraw records, close sockets). Bounded in time."""

    async def reload(self, old: Config, new: Config) -> None:
        """Apply a new, already validated config (``self.agent.config`` is ``new``)."""

    def ready(self) -> tuple[bool, str]:
        """(ready, reason) for /readyz; reason is shown when not ready."""
        return True, ""

    def status(self) -> str:
        """A short fragment for systemd's STATUS= line, e.g. ``peers=12``; "" for none."""
        return ""

    def stats(self) -> dict[str, Any]:
        """Entries merged into ``GET /api/dht/stats``."""
        return {}


async def cancel_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a component's background task and wait for it to end; its own failure
    does not matter any more at stop time (it was logged when it happened)."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
