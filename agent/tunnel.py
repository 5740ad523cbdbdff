"""Watches cloudflared (``rma-tunnel.service``) and learns this worker's public URL.

Why a watcher and not a child process: cloudflared runs as its own systemd unit so it
can restart, be upgraded or be swapped for a named tunnel without touching the agent;
the agent only *reads* cloudflared's metrics server (``--metrics``, SPEC §7):

* ``GET /ready`` -> 200 while at least one connection to Cloudflare's edge is up, 503
  otherwise (JSON ``{"status":..,"readyConnections":..,"connectorId":..}``);
* ``GET /quicktunnel`` -> ``{"hostname": "abc-def.trycloudflare.com"}`` for a quick
  tunnel. Named tunnels answer 404 or an empty hostname; their public name comes from
  ``tunnel.hostname`` in our config instead.

A quick tunnel's hostname changes whenever cloudflared restarts, so the watcher keeps
polling and, when the URL changes, emits ``"endpoint"`` on the agent bus (the worker
role re-announces) and asks for a STATUS= refresh. Polling is every 2 s until the
tunnel is fully up, then every 10 s; while cloudflared's metrics server is unreachable
the interval backs off exponentially up to 30 s. Every state change is logged once,
never per poll.

What the tunnel publishes is the gateway (``gateway.listen``; ``systemd/rma-tunnel`` gives
it to cloudflared as ``--url`` for quick and named tunnels alike), never the admin API, so
the endpoint learned here is the gateway's public URL: the one the worker announces and
its ownership proof signs (``agent.gateway.component``).

The ``endpoint`` attribute keeps the last known URL while cloudflared is down (the
worker decides what to do with a down tunnel through ``ready()``/``up``); it is
``None`` until a URL was ever learned, and always ``None`` with ``tunnel.mode = "off"``
(a reload to "off" emits ``"endpoint"`` with ``""``: the tunnel URL is gone).
The event is held back until ``agent.running`` (see ``_flush_endpoint``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from typing import TYPE_CHECKING, Any

import aiohttp
from prometheus_client import Counter, Gauge

from agent.component import Component
from agent.config import check_host

if TYPE_CHECKING:
    from agent.config import Config, TunnelSection
    from agent.interfaces import AgentAPI

log = logging.getLogger("rma_agent.tunnel")

MAX_BODY = 64 * 1024          # cloudflared's answers are tiny; never buffer more


class TunnelComponent(Component):
    """Component "tunnel": cloudflared's public URL and health, for the worker role."""

    name = "tunnel"

    # Timings (seconds); instance attributes so tests can shorten them.
    request_timeout = 2.0     # per HTTP request to the metrics server
    poll_fast = 2.0           # until ready (and, for quick tunnels, a hostname is known)
    poll_slow = 10.0          # once everything is up
    backoff_max = 30.0        # cap of the backoff while cloudflared is unreachable

    def __init__(self, agent: AgentAPI) -> None:
        super().__init__(agent)
        self.cfg: TunnelSection = agent.config.tunnel
        self.endpoint: str | None = None
        self.hostname: str | None = None      # quick: learned; named: configured
        self.reachable = False                # metrics server answered last time
        self.up = False                       # /ready said 200 last time
        self.misconfigured = False            # named mode, but cloudflared runs a quick tunnel
        self.ready_connections = 0
        self.connector_id = ""
        self.last_error = ""
        self.endpoint_changes = 0
        self._failures = 0
        self._logged_state = ""
        self._pending_emit = False
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._wake: asyncio.Event | None = None
        registry = agent.registry
        self._m_up = Gauge("rma_agent_tunnel_up",
                           "1 when cloudflared is connected to the edge and the public URL "
                           "is known (always 1 with tunnel.mode off)", registry=registry)
        self._m_conns = Gauge("rma_agent_tunnel_ready_connections",
                              "Edge connections cloudflared reports on /ready", registry=registry)
        self._m_changes = Counter("rma_agent_tunnel_endpoint_changes",
                                  "Times the public endpoint changed", registry=registry)
        self._m_errors = Counter("rma_agent_tunnel_poll_errors",
                                 "Polls of cloudflared's metrics server that failed",
                                 registry=registry)
        self._m_up.set(1 if self.cfg.mode == "off" else 0)

    # --- Component interface -------------------------------------------------------
    @property
    def metrics_url(self) -> str:
        return f"http://{self.cfg.metrics}"

    async def start(self) -> None:
        """Named tunnels know their URL at once; quick tunnels learn it in the background."""
        self._wake = asyncio.Event()
        if self.cfg.mode == "off":
            log.debug("tunnel.mode is off: not watching cloudflared")
            return
        if self.cfg.mode == "named":
            self.hostname = self.cfg.hostname
            self._set_endpoint(f"https://{self.cfg.hostname}")
        log.info("watching cloudflared (%s tunnel) at %s; it publishes the gateway %s",
                 self.cfg.mode, self.metrics_url, self.agent.config.gateway.listen)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.request_timeout),
            connector=aiohttp.TCPConnector(limit=2, force_close=True),
            trust_env=False,          # never send loopback polls through an HTTP proxy
        )
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def reload(self, old: Config, new: Config) -> None:
        """A changed [tunnel] section restarts the watcher with the new settings."""
        if old.tunnel == new.tunnel:
            return
        log.info("tunnel settings changed (mode %s -> %s): restarting the watcher",
                 old.tunnel.mode, new.tunnel.mode)
        await self.stop()
        self.cfg = new.tunnel
        self.hostname = None
        self.reachable = self.up = self.misconfigured = False
        self.ready_connections, self.connector_id, self.last_error = 0, "", ""
        self._failures, self._logged_state = 0, ""
        if new.tunnel.mode == "off" and self.endpoint is not None:
            # "" tells subscribers the tunnel URL is gone (the worker falls back to
            # worker.endpoint) instead of leaving them announcing a dead quick-tunnel URL.
            self.endpoint = None
            self.agent.emit("endpoint", "")
        self._m_up.set(1 if new.tunnel.mode == "off" else 0)
        await self.start()
        self.agent.status_changed()

    def ready(self) -> tuple[bool, str]:
        if self.cfg.mode == "off" or self._fully_up():
            return True, ""
        return False, f"tunnel: waiting for cloudflared at {self.metrics_url}: {self._why_not()}"

    def status(self) -> str:
        if self.cfg.mode == "off":
            return ""
        return "tunnel=up" if self._fully_up() else "tunnel=down"

    def stats(self) -> dict[str, Any]:
        return {"tunnel": {
            "mode": self.cfg.mode,
            "endpoint": self.endpoint,
            "ready": self.ready()[0],
            "last_error": self.last_error or None,
            "metrics": str(self.cfg.metrics),
            # what rma-tunnel makes cloudflared publish: the gateway, never the admin API
            "origin": str(self.agent.config.gateway.listen),
            "ready_connections": self.ready_connections,
            "endpoint_changes": self.endpoint_changes,
        }}

    def poll_now(self) -> None:
        """Cut the current wait short (used by tests and after a reload)."""
        if self._wake is not None:
            self._wake.set()

    # --- internals -----------------------------------------------------------------
    def _fully_up(self) -> bool:
        if not (self.reachable and self.up and self.endpoint is not None):
            return False
        if self.cfg.mode == "named":
            return not self.misconfigured
        return self.hostname is not None

    def _why_not(self) -> str:
        if not self.reachable:
            return (f"{self.last_error or 'not polled yet'} "
                    "(is rma-tunnel.service running? systemctl status rma-tunnel)")
        if self.last_error:
            return self.last_error
        if not self.up:
            return "cloudflared has no connection to the Cloudflare edge yet"
        if self.cfg.mode == "quick" and self.hostname is None:
            return "cloudflared reports no quick-tunnel hostname yet"
        return "starting"

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await self._poll_once()
                self._failures = 0
                delay = self.poll_slow if self._fully_up() else self.poll_fast
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self._failures += 1
                self._m_errors.inc()
                self._unreachable(_describe(exc))
                delay = min(self.backoff_max, self.poll_fast * 2 ** (self._failures - 1))
            self._after_poll()
            await self._sleep(delay)

    async def _sleep(self, delay: float) -> None:
        """Wait ``delay`` s or until ``poll_now()``; meanwhile deliver a deferred endpoint."""
        assert self._wake is not None
        self._wake.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while True:
            self._flush_endpoint()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            step = min(remaining, 0.1) if self._pending_emit else remaining
            try:
                await asyncio.wait_for(self._wake.wait(), step)
                return
            except TimeoutError:
                continue

    async def _get(self, path: str) -> tuple[int, Any]:
        """(status, parsed JSON or None) of one GET to the metrics server."""
        assert self._session is not None
        async with self._session.get(self.metrics_url + path, allow_redirects=False) as resp:
            body = await resp.content.read(MAX_BODY)
            try:
                data = json.loads(body) if body else None
            except ValueError:
                data = None
            return resp.status, data

    async def _poll_once(self) -> None:
        """Ask /ready (and /quicktunnel), then update the state in one step: nothing reads
        a half-updated state (e.g. "up" with the previous poll's error) across an await."""
        ready_status, ready = await self._get("/ready")
        quick_status, quick = await self._get("/quicktunnel")
        errors: list[str] = []
        up = ready_status == 200
        conns = ready.get("readyConnections") if isinstance(ready, dict) else None
        cid = ready.get("connectorId") if isinstance(ready, dict) else None
        if ready_status not in (200, 503):
            errors.append(f"unexpected HTTP {ready_status} from /ready")
        elif not up:
            errors.append("cloudflared has no connection to the Cloudflare edge yet")

        host = quick.get("hostname") if quick_status == 200 and isinstance(quick, dict) else None
        new_host: str | None = None
        misconfigured = False
        if self.cfg.mode == "quick":
            if quick_status == 404 or host == "":
                errors.append("cloudflared runs no quick tunnel (a named tunnel? then set "
                              'tunnel.mode = "named" and tunnel.hostname)')
            elif quick_status != 200 or not isinstance(host, str):
                errors.append(f"unexpected answer from /quicktunnel (HTTP {quick_status})")
            else:
                host = host.strip().lower().removeprefix("https://").removeprefix("http://")
                host = host.rstrip("/")
                why = check_host(host)
                if why:
                    errors.append(f"/quicktunnel gave an unusable hostname: {why}")
                else:
                    new_host = host
        else:
            # A quick tunnel where a named one is expected: tunnel.hostname is not routed
            # to this cloudflared, so announcing it would publish a dead URL.
            misconfigured = isinstance(host, str) and bool(host.strip())
            if misconfigured:
                errors.append(f"cloudflared runs a quick tunnel ({str(host)[:80]}), not the "
                              f"named tunnel for {self.cfg.hostname}: fix rma-tunnel.service "
                              'or set tunnel.mode = "quick"')

        self.reachable = True
        self.up = up
        self.ready_connections = (conns if isinstance(conns, int) and not isinstance(conns, bool)
                                  else (1 if up else 0))
        self.connector_id = cid if isinstance(cid, str) else ""
        self.misconfigured = misconfigured
        self.last_error = "; ".join(errors)
        if new_host is not None:
            self.hostname = new_host
            self._set_endpoint(f"https://{new_host}")

    def _unreachable(self, reason: str) -> None:
        self.reachable = False
        self.up = False
        self.ready_connections = 0
        self.last_error = f"metrics server unreachable: {reason}"

    def _set_endpoint(self, url: str) -> None:
        if url == self.endpoint:
            return
        old, self.endpoint = self.endpoint, url
        if old is not None:
            self.endpoint_changes += 1
            self._m_changes.inc()
            log.info("public endpoint changed: %s -> %s", old, url)
        else:
            log.info("public endpoint is %s", url)
        self._pending_emit = True
        self._flush_endpoint()

    def _flush_endpoint(self) -> None:
        """Emit "endpoint" once the agent runs.

        Why deferred: components start in order (dht, tunnel, worker, ...) and the worker
        subscribes in its own start(), after ours; an event sent while the agent is still
        starting would be lost. ``agent.running`` turns True once every start() returned.
        """
        if not self._pending_emit or not self.agent.running:
            return
        self._pending_emit = False
        if self.endpoint is not None:
            self.agent.emit("endpoint", self.endpoint)
        self.agent.status_changed()

    def _after_poll(self) -> None:
        """Metrics every poll; a log line and a STATUS= refresh only when state changes."""
        up = self._fully_up()
        self._m_up.set(1 if up else 0)
        self._m_conns.set(self.ready_connections)
        if up:
            state = "up"
        elif not self.reachable:
            state = "unreachable"
        else:
            state = "down: " + (self.last_error or self._why_not())
        if state == self._logged_state:
            return
        previous, self._logged_state = self._logged_state, state
        if up:
            log.info("tunnel up: %s (%d edge connections)", self.endpoint, self.ready_connections)
        elif state == "unreachable":
            log.warning("cannot reach cloudflared's metrics server at %s (%s); retrying with "
                        "backoff up to %g s", self.metrics_url, self.last_error,
                        self.backoff_max)
        else:
            log.warning("tunnel not ready: %s", state[len("down: "):])
        if previous or not up:
            self.agent.status_changed()


def _describe(exc: BaseException) -> str:
    """Short, stable text for a poll failure (stable so state changes log once)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        err = exc.os_error
        if err is not None and err.errno:
            return os.strerror(err.errno)        # "Connection refused", stable across polls
        return str(err) if err is not None else "cannot connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection closed by cloudflared"
    if isinstance(exc, aiohttp.ClientError):
        return type(exc).__name__
    return str(exc) or type(exc).__name__
