"""The live dashboard (``GET /``), its event stream (``GET /api/events``) and the watches.

Component "dashboard", started last. What it keeps, always (cheap, no network):

* an **event log** (:mod:`agent.dashboard.eventlog`): workers joining, moving,
  withdrawing, expiring, failing and recovering; config reloads; readiness changes;
* a **sample ring** (15 min at ``SAMPLE_S``): lookups/s, DHT lookups/s, routed
  requests/s and errors/s (from the ``"router"`` block of ``/api/dht/stats`` when a
  router exists), lookup p50/p99 of the interval. A page opened now has the history.

While at least one page listens (and ``PAGE_LINGER_S`` after), it pins the ``"*"`` key
and up to ``MAX_SERVICES`` services in the :class:`~agent.discovery.watch.WatchHub`
(refreshed from the DHT every second; ``"*"`` less often, see ``watch.py``) and broadcasts the page's ``state`` each
``TICK_S``: the agent at a glance, and per service the explained ranking
(:mod:`agent.dashboard.view`: best first, score parts, state, why others are out).
With no page open it makes no lookups at all.

Routes: ``/`` and ``/static/{file}`` (the page, shipped in ``agent/static/``),
``/api/dashboard`` (first paint: state, samples, log), ``/api/dashboard/ring``
(the XOR ring), ``/api/events`` (SSE: ``log`` events with ids, ``state`` and
``sample`` frames) and ``/api/services/{name}/watch`` (see ``watch.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agent import events
from agent.component import Component, cancel_task
from agent.dashboard import view
from agent.dashboard.eventlog import LOG_SIZE, EventLog
from agent.dht.record import ALL_SERVICES
from agent.discovery.api import BadRequest, check_service
from agent.discovery.watch import WatchHub
from agent.ratelimit import RateLimiter

if TYPE_CHECKING:
    from agent.config import Config
    from agent.interfaces import AgentAPI

log = logging.getLogger("rma_agent.dashboard")
_LOG_LIMIT = RateLimiter(rate=1 / 60, burst=3)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_FILES = {"app.js": "application/javascript", "app.css": "text/css",
                "index.html": "text/html"}
TICK_S = 1.0
SAMPLE_S = 2.0
HISTORY_S = 15 * 60
MAX_PAGES = 32             # /api/events streams at once
MAX_SERVICES = 12          # services a page shows (and keeps refreshed)
PAGE_LINGER_S = 30.0
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 3)


class DashboardComponent(Component):
    """Component "dashboard": the page, the event log, samples, SSE streams, watches."""

    name = "dashboard"

    def __init__(self, agent: AgentAPI) -> None:
        super().__init__(agent)
        self.hub = WatchHub(agent)
        self.page_limit = events.SubscriberLimit(MAX_PAGES)
        self.channel = events.Channel(self.page_limit, history=LOG_SIZE)
        self.eventlog = EventLog(self.channel, self._watched_name)
        self.hub.on_change = self.eventlog.on_member_change
        self.samples: deque[dict[str, Any]] = deque(maxlen=int(HISTORY_S / SAMPLE_S))
        self._prev: dict[str, float] | None = None
        self._pinned: set[str] = set()
        self._page_seen = 0.0
        self._task: asyncio.Task[None] | None = None
        self._static: dict[str, bytes] = {}

    # ------------------------------------------------------------------ lifecycle
    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{file}", self._static_file)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/api/dashboard", self._dashboard)
        app.router.add_get("/api/dashboard/ring", self._ring)
        app.router.add_get("/api/services/{name}/watch", self.hub.handle)

    async def start(self) -> None:
        self.hub.start()
        self.agent.subscribe("record", self.eventlog.on_record)
        self.agent.subscribe("config", self.eventlog.on_config)
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None
        self.channel.close_all()
        await self.hub.stop()

    async def reload(self, old: Config, new: Config) -> None:
        """Nothing to re-read: the "config" bus event logs the reload."""

    def stats(self) -> dict[str, Any]:
        return {"dashboard": {"pages": self.page_limit.current,
                              "pages_refused": self.page_limit.refused,
                              "pages_dropped_slow": self.page_limit.dropped,
                              "samples": len(self.samples),
                              "events": len(self.channel.history),
                              "watch": self.hub.stats()}}

    # ------------------------------------------------------------------ event log
    def _watched_name(self, wid: bytes) -> str | None:
        for w in self.hub.watches.values():
            v = w.members.get(wid)
            if v is not None:
                return str(v["name"])
        return None

    def _check_local(self, now: float) -> None:
        """Readiness, back-offs and expiries: no network, every tick."""
        ok, reasons = self.agent.readiness()
        self.eventlog.check_ready(ok, reasons, self.agent.running)
        disc = self.agent.discovery
        if disc is not None:
            self.eventlog.check_backoffs(disc.tracker, now)
        self.eventlog.check_expiry(now, disc.max_age_s if disc is not None else 60.0)

    # ------------------------------------------------------------------ samples
    def _counters(self) -> tuple[dict[str, float], list[float]]:
        disc = self.agent.discovery
        counts = disc.counts if disc is not None else {}
        stats = self.agent.stats()
        block = stats.get("router")      # built by the router, when present
        router: dict[str, Any] = block if isinstance(block, dict) else {}
        dht_lookups = stats.get("lookups")    # the DHT's block, when present
        cur = {
            "lookups": float(counts.get("lookups", 0)),
            "dht_lookups": float(dht_lookups.get("total", 0) or 0)
            if isinstance(dht_lookups, dict) else 0.0,
            "lookup_errors": float(counts.get("dht_timeout", 0) + counts.get("dht_error", 0)),
            "routed": float(router.get("requests", 0) or 0),
            "routed_failed": float(router.get("failed", 0) or 0),
            "t": time.monotonic(),
            "has_router": 1.0 if router else 0.0,
        }
        return cur, disc.lookup_durations() if disc is not None else []

    def _sample(self) -> dict[str, Any] | None:
        cur, durations = self._counters()
        prev = self._prev
        self._prev = cur
        if prev is None:
            return None
        dt = max(cur["t"] - prev["t"], 1e-6)

        def rate(k: str) -> float:
            return round(max(0.0, cur[k] - prev[k]) / dt, 3)

        n_new = int(max(0.0, cur["lookups"] - prev["lookups"]))
        tail = durations[-n_new:] if n_new else []
        sample = {"t": round(time.time(), 3), "lookups_s": rate("lookups"),
                  "dht_lookups_s": rate("dht_lookups"), "routed_s": rate("routed"),
                  "errors_s": round(rate("routed_failed") + rate("lookup_errors"), 3),
                  "p50_ms": _pct(tail, 0.5), "p99_ms": _pct(tail, 0.99),
                  "router": bool(cur["has_router"])}
        self.samples.append(sample)
        return sample

    # ------------------------------------------------------------------ main loop
    async def _loop(self) -> None:
        next_sample = time.monotonic()
        while True:
            now = time.time()
            try:
                self._check_local(now)
                if time.monotonic() >= next_sample:
                    next_sample = max(next_sample + SAMPLE_S, time.monotonic())
                    sample = self._sample()
                    if sample is not None and self.channel.subscribers:
                        self.channel.broadcast(events.frame("sample", sample))
                if self.channel.subscribers:
                    self._page_seen = time.monotonic()
                    self._pin_services()
                    self.channel.broadcast(events.frame("state", self.state()))
                elif self._pinned and time.monotonic() - self._page_seen > PAGE_LINGER_S:
                    self._unpin_all()
            except asyncio.CancelledError:
                raise
            except Exception as exc:      # a bug here must not flood the journal
                _LOG_LIMIT.log(log, logging.ERROR, "tick", "dashboard: tick failed: %r", exc)
            await asyncio.sleep(TICK_S)

    def _pin(self, service: str) -> None:
        if service not in self._pinned and self.hub.pin(service) is not None:
            self._pinned.add(service)

    def _unpin_all(self) -> None:
        for svc in list(self._pinned):
            self.hub.unpin(svc)
        self._pinned.clear()

    def _service_names(self) -> list[str]:
        """Services seen in the "*" answer (and watched ones), at most MAX_SERVICES."""
        names: set[str] = set()
        w = self.hub.get(ALL_SERVICES)
        if w is not None:
            for rec in w.records.values():
                names.update(rec.services)
        names.update(s for s in self.hub.watches if s != ALL_SERVICES)
        return sorted(names)[:MAX_SERVICES]

    def _pin_services(self) -> None:
        self._pin(ALL_SERVICES)
        wanted = set(self._service_names())
        for svc in wanted:
            self._pin(svc)
        for svc in list(self._pinned - wanted - {ALL_SERVICES}):
            self.hub.unpin(svc)
            self._pinned.discard(svc)

    async def _activate(self) -> None:
        """Pin what a page shows and wait (bounded) for the first answers."""
        self._page_seen = time.monotonic()
        self._pin(ALL_SERVICES)
        star = self.hub.get(ALL_SERVICES)
        if star is not None:
            await star.wait_first()
        self._pin_services()
        waits = [w.wait_first() for s in self._pinned if (w := self.hub.get(s)) is not None]
        if waits:
            await asyncio.gather(*waits)

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """What a page shows now (see :mod:`agent.dashboard.view`)."""
        now = time.time()
        names = self._service_names()
        disc = self.agent.discovery
        services = []
        if disc is not None:
            for svc in names:
                st = view.service_state(disc, self.hub, svc, now)
                if st is not None:
                    services.append(st)
        has_router = bool(self.samples and self.samples[-1].get("router"))
        return {"t": round(now, 3),
                "agent": view.overview(self.agent, self.hub, names, has_router),
                "services": services, "weights": view.weights(disc)}

    def ring(self, service: str | None) -> dict[str, Any]:
        dht = self.agent.dht
        identity = dht.identity if dht is not None else None
        if dht is None or identity is None or dht.storage is None:   # no store: not started
            raise web.HTTPServiceUnavailable(text="dht: not started")
        return view.ring(dht, identity.node_id, self.hub, self.agent.config.dht.ksize,
                         service)

    # ------------------------------------------------------------------ HTTP
    def _asset(self, name: str) -> bytes:
        data = self._static.get(name)
        if data is None:
            data = (STATIC_DIR / name).read_bytes()
            self._static[name] = data
        return data

    def _asset_response(self, name: str) -> web.Response:
        try:
            body = self._asset(name)
        except OSError:
            return web.json_response({"error": f"dashboard asset {name} is missing from "
                                               "this install"}, status=404)
        return web.Response(body=body, headers={
            "Content-Type": f"{STATIC_FILES[name]}; charset=utf-8",
            "Cache-Control": "no-cache", "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    async def _index(self, request: web.Request) -> web.Response:
        return self._asset_response("index.html")

    async def _static_file(self, request: web.Request) -> web.Response:
        name = request.match_info["file"]
        if name not in STATIC_FILES or name == "index.html":
            return web.json_response({"error": f"no such path: {request.path}"}, status=404)
        return self._asset_response(name)

    async def _dashboard(self, request: web.Request) -> web.Response:
        if request.query:
            return web.json_response({"error": "this path takes no parameters"}, status=400)
        await self._activate()
        return web.json_response({"state": self.state(), "samples": list(self.samples),
                                  "log": list(self.eventlog.items),
                                  "sample_s": SAMPLE_S, "tick_s": TICK_S})

    async def _ring(self, request: web.Request) -> web.Response:
        extra = sorted(set(request.query) - {"service"})
        if extra:
            return web.json_response({"error": f"unknown parameter {extra[0]!r} "
                                               "(allowed: service)"}, status=400)
        service = request.query.get("service") or None
        if service is not None:
            try:
                service = check_service(service)     # one rule: user input is lowercased
            except BadRequest as exc:
                return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.ring(service))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        extra = sorted(set(request.query) - {"last_event_id"})
        if extra:
            return web.json_response({"error": f"unknown parameter {extra[0]!r} "
                                               "(allowed: last_event_id)"}, status=400)
        if not self.agent.running and self._task is None:
            return web.json_response({"error": "agent is not running"}, status=503)
        if not self.page_limit.try_take():
            return events.too_many("event streams", self.page_limit)
        last = events.parse_last_event_id(request)

        def first() -> list[bytes]:
            replay = self.channel.replay_after(last)
            if replay is None:
                replay = [raw for _eid, raw in self.channel.history]
            return [*replay, events.frame("state", self.state())]

        return await events.stream(request, self.channel, first, before=self._activate)
