"""The Agent: one object that owns the components, the HTTP endpoint and the STATUS line.

``run.py`` owns the event loop and signals; this module owns *what* starts and stops,
in which order, and what systemd is told. Components (DHT, tunnel, role, discovery)
are built from the config and driven through the ``Component`` interface.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from agent import __version__
from agent.component import Component, ComponentDirectory
from agent.config import Config
from agent.gateway.app import make_gateway_app
from agent.http import budget
from agent.http.connections import ListenerMetrics
from agent.http.listener import serve
from agent.httpapi import make_app
from agent.logs import set_level
from agent.metrics import CoreMetrics, kernels_implementation
from agent.ratelimit import RateLimiter
from agent.sdnotify_glue import Notifier

log = logging.getLogger("rma_agent")

STOP_TIMEOUT = 1.5      # per component; the whole shutdown stays well under 5 s
STATUS_PERIOD = 5.0     # STATUS= is refreshed at least this often (only sent when it changes)

# (module, class) per component, in start order. The role slot depends on agent.role.
_COMPONENTS: list[tuple[str, str, str | None]] = [
    ("agent.dht.component", "DHTComponent", None),
    ("agent.admission.component", "NetworkComponent", None),
    ("agent.tunnel", "TunnelComponent", None),
    # before the worker role: its first health check decides what the first announce holds
    ("agent.gateway.component", "GatewayComponent", "worker"),
    ("agent.roles.worker", "WorkerRole", "worker"),
    ("agent.roles.coordinator", "CoordinatorRole", "coordinator"),
    ("agent.discovery.service", "DiscoveryComponent", None),
    ("agent.router.component", "RouterComponent", None),
    ("agent.dashboard.component", "DashboardComponent", None),
    ("agent.versions", "VersionsComponent", None),    # the fleet's versions (records seen)
]


def build_components(agent: Agent) -> list[Component]:
    """The components this config calls for, in start order. A module that cannot be
    imported is a broken install and fails the start loudly (never a silent half-agent)."""
    comps: list[Component] = []
    for module, cls, role in _COMPONENTS:
        if role is not None and role != agent.config.agent.role:
            continue
        comps.append(getattr(importlib.import_module(module), cls)(agent))
    return comps


class Agent(ComponentDirectory):
    """A running agent. What components may use of it is :class:`agent.interfaces.AgentAPI`
    (see docs/DESIGN.md): the bus, the config, the registry, and the typed accessors to
    the other components (``self.dht``, ``self.discovery``, ...: ``ComponentDirectory``)."""

    def __init__(self, config: Config, notifier: Notifier | None = None,
                 components: list[Component] | None = None) -> None:
        self.config = config
        self.config_path: Path | None = config.source
        self.registry = CollectorRegistry()
        self.core_metrics = CoreMetrics(self.registry, config.agent.role)
        self.notifier = notifier or Notifier()
        self.started_at = time.time()
        self.http_url = ""
        self.gateway_url = ""
        self._subs: dict[str, list[Callable[[Any], Any]]] = defaultdict(list)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._gateway_runner: web.AppRunner | None = None
        self._status_event = asyncio.Event()
        self._status_task: asyncio.Task[None] | None = None
        self.running = False
        self.components = components if components is not None else build_components(self)

    # --- what components use (besides the accessors) --------------------------------
    def subscribe(self, event: str, callback: Callable[[Any], Any]) -> None:
        self._subs[event].append(callback)

    def emit(self, event: str, value: Any) -> None:
        """Call subscribers; coroutine results run as tasks whose errors are logged."""
        for cb in list(self._subs.get(event, ())):
            try:
                res = cb(value)
            except Exception:
                log.exception("subscriber of %r failed", event)
                continue
            if asyncio.iscoroutine(res):
                self.spawn(res, f"on-{event}")

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """A background task that is kept referenced and whose failure is logged."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("task %s failed: %r", name, t.exception())

        task.add_done_callback(done)
        return task

    def status_changed(self) -> None:
        self._status_event.set()

    # --- state ---------------------------------------------------------------------
    def readiness(self) -> tuple[bool, list[str]]:
        reasons = []
        if not self.running:
            reasons.append("starting")
        for comp in self.components:
            try:
                ok, why = comp.ready()
            except Exception as exc:  # a buggy component must not break /readyz
                ok, why = False, f"{comp.name}: {exc!r}"
            if not ok:
                reasons.append(why or f"{comp.name} not ready")
        return not reasons, reasons

    def status_line(self) -> str:
        cfg = self.config.agent
        ok, reasons = self.readiness()
        parts = [f"{cfg.role} {cfg.name}", "ready" if ok else "NOT READY: " + "; ".join(reasons)]
        for comp in self.components:
            try:
                frag = comp.status()
            except Exception as exc:
                frag = f"{comp.name}: {exc!r}"
            if frag:
                parts.append(frag)
        return ", ".join(parts)

    def stats(self) -> dict[str, Any]:
        ok, reasons = self.readiness()
        out: dict[str, Any] = {
            "version": __version__,
            "role": self.config.agent.role,
            "name": self.config.agent.name,
            "region": self.config.agent.region,
            "uptime_s": round(time.time() - self.started_at, 3),
            "ready": ok,
            "not_ready_reasons": reasons,
            "kernels": kernels_implementation(),
        }
        fallback = _kernels_fallback_reason()
        if fallback:
            out["kernels_fallback_reason"] = fallback
        for comp in self.components:
            try:
                out.update(comp.stats())
            except Exception as exc:
                out.setdefault("errors", []).append(f"{comp.name}: {exc!r}")
        return out

    def refresh_metrics(self) -> None:
        self.core_metrics.up.set(1 if self.readiness()[0] else 0)

    # --- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Serve HTTP, start components in order, then tell systemd READY=1."""
        # both listeners bounded (agent.http.budget): timeouts, connection caps below the
        # file limit, head memory; a caller that hangs up cancels its handler (routed and
        # proxied requests stop working for nobody and free their slots at once)
        admin_limits, public_limits = budget.listener_limits()
        metrics = ListenerMetrics(self.registry)
        self._runner, self.http_url, _ = await serve(
            make_app(self), self.config.http.listen, name="admin", limits=admin_limits,
            metrics=metrics)
        started: list[Component] = []
        try:
            # the public listener (SPEC §5): its own app, so no admin path is reachable there
            self._gateway_runner, self.gateway_url, _ = await serve(
                make_gateway_app(self), self.config.gateway.listen, name="gateway",
                limits=public_limits, metrics=metrics)
            for comp in self.components:
                await comp.start()
                started.append(comp)
        except BaseException:
            for comp in reversed(started):
                await self._stop_one(comp)
            for runner in (self._gateway_runner, self._runner):
                if runner is not None:
                    await runner.cleanup()
            raise
        self.running = True
        log.info("serving HTTP on %s, gateway on %s (role %s, kernels %s)", self.http_url,
                 self.gateway_url, self.config.agent.role, kernels_implementation())
        self._status_task = asyncio.ensure_future(self._status_loop())
        self.notifier.ready(self.status_line())

    async def _status_loop(self) -> None:
        last = ""
        last_readiness: tuple[bool, tuple[str, ...]] | None = None
        limiter = RateLimiter(rate=1 / 30, burst=3)
        while True:
            line = self.status_line()
            self.notifier.status(line)
            if line != last:
                log.debug("status: %s", line)
                last = line
            ok, reasons = self.readiness()
            if (ok, tuple(reasons)) != last_readiness:
                # the journal says what STATUS= says whenever readiness changes, so an
                # operator reading `journalctl -u rma-agent` learns what to fix
                if ok:
                    log.info("ready: %s", line)
                else:
                    limiter.log(log, logging.WARNING, "not-ready", "not ready: %s",
                                "; ".join(reasons))
                last_readiness = (ok, tuple(reasons))
            self._status_event.clear()
            try:
                await asyncio.wait_for(self._status_event.wait(), STATUS_PERIOD)
            except TimeoutError:
                pass
            await asyncio.sleep(0.1)  # coalesce bursts of changes

    async def _stop_one(self, comp: Component) -> None:
        try:
            await asyncio.wait_for(comp.stop(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("%s did not stop within %.1f s", comp.name, STOP_TIMEOUT)
        except Exception:
            log.exception("%s failed to stop cleanly", comp.name)

    async def stop(self) -> None:
        """STOPPING=1, leave the network (components reversed), close HTTP."""
        self.notifier.stopping(f"{self.config.agent.role} {self.config.agent.name}: stopping")
        self.running = False
        for comp in reversed(self.components):
            await self._stop_one(comp)
        if self._status_task is not None:
            self._status_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        for runner in (self._gateway_runner, self._runner):
            if runner is not None:
                await runner.cleanup()
        log.info("stopped")

    async def reload(self, new: Config) -> None:
        """Apply an already validated config. Some keys only apply on restart: said so."""
        old = self.config
        self.notifier.reloading()
        for key, a, b in (("agent.role", old.agent.role, new.agent.role),
                          ("http.listen", old.http.listen, new.http.listen),
                          ("gateway.listen", old.gateway.listen, new.gateway.listen),
                          ("agent.state_dir", old.agent.state_dir, new.agent.state_dir)):
            if a != b:
                log.warning("%s changed (%s -> %s): applies after a restart", key, a, b)
        self.config = new
        set_level(new.log.level)
        for comp in self.components:
            try:
                await comp.reload(old, new)
            except Exception:
                log.exception("%s failed to apply the new config", comp.name)
        self.core_metrics.reloads.labels("ok").inc()
        self.emit("config", new)
        self.notifier.ready(self.status_line())
        self.status_changed()
        log.info("configuration reloaded from %s", new.source)


def _kernels_fallback_reason() -> str | None:
    try:
        import _fast
    except Exception as exc:
        return f"_fast not importable: {exc}"
    return getattr(_fast, "FALLBACK_REASON", None)
