"""The shape every part of the agent takes (DHT, roles, discovery, tunnel), and how
parts find each other.

The lifecycle (``agent.lifecycle.Agent``) owns a list of components and drives them:
``add_routes`` / ``add_gateway_routes`` before the HTTP servers start, ``start`` in order,
``reload`` on SIGHUP, ``stop`` in reverse order. Components never touch signals, the loop or sd_notify.

A component sees the Agent as :class:`agent.interfaces.AgentAPI` and reaches the others
through its typed accessors (:class:`ComponentDirectory`: ``agent.dht``,
``agent.discovery``, ...), each typed by what that component offers others
(:mod:`agent.interfaces`), never by its class: so no component module imports another's
for types, and none imports the lifecycle.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from aiohttp import web

    from agent.config import Config
    from agent.interfaces import (
        AdmissionService,
        AgentAPI,
        DHTService,
        DiscoveryService,
        RegistryService,
        RouterService,
        TunnelService,
        WorkerService,
    )


class Component:
    """Base class with no-op defaults, so a component implements only what it needs."""

    name: str = "component"

    def __init__(self, agent: AgentAPI) -> None:
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


class ComponentDirectory:
    """Typed accessors over ``components``: what the Agent (and a test's stand-in agent)
    answers to ``agent.dht``, ``agent.discovery``, ...

    Each returns the component of that name typed as the protocol of what it offers
    (:mod:`agent.interfaces`), or None when this agent runs none: a coordinator has no
    worker role, an agent built for a test may have no DHT. The callers check for None
    rather than catch AttributeError, so a missing component is a decision, not a crash.
    """

    components: list[Any]

    def _named(self, name: str) -> Any:
        for comp in self.components:
            if comp.name == name:
                return comp
        return None

    @property
    def dht(self) -> DHTService | None:
        return cast("DHTService | None", self._named("dht"))

    @property
    def discovery(self) -> DiscoveryService | None:
        return cast("DiscoveryService | None", self._named("discovery"))

    @property
    def worker(self) -> WorkerService | None:
        return cast("WorkerService | None", self._named("worker"))

    @property
    def tunnel(self) -> TunnelService | None:
        return cast("TunnelService | None", self._named("tunnel"))

    @property
    def admission(self) -> AdmissionService | None:
        """The closed network's admission (component "network")."""
        return cast("AdmissionService | None", self._named("network"))

    @property
    def coordinator(self) -> RegistryService | None:
        return cast("RegistryService | None", self._named("coordinator"))

    @property
    def router(self) -> RouterService | None:
        return cast("RouterService | None", self._named("router"))


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
