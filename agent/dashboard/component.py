"""The live dashboard (``GET /``), its event stream (``GET /api/events``) and the watches.

Component "dashboard", started last. What it keeps, always (cheap, no network):

* an **event log** (last ``LOG_SIZE``): workers joining, moving, withdrawing, expiring,
  failing and recovering; config reloads; readiness changes. Sources: records the local
  DHT node stores (the ``"record"`` bus event), the latency tracker's back-offs, the
  ``"config"`` bus event, ``Agent.readiness()``, and — while a page is open — the
  membership diffs of the services it shows;
* a **sample ring** (15 min at ``SAMPLE_S``): lookups/s, DHT lookups/s, routed
  requests/s and errors/s (from the ``"router"`` block of ``/api/dht/stats`` when a
  router exists), lookup p50/p99 of the interval. A page opened now has the history.

While at least one page listens (and ``PAGE_LINGER_S`` after), it pins the ``"*"`` key
and up to ``MAX_SERVICES`` services in the :class:`~agent.discovery.watch.WatchHub`
(refreshed from the DHT every second; ``"*"`` less often, see ``watch.py``) and broadcasts the page's ``state`` each
``TICK_S``: the agent at a glance, and per service the explained ranking
(:mod:`agent.discovery.explain`: best first, score parts, state, why others are out).
With no page open it makes no lookups at all.

Routes: ``/`` and ``/static/{file}`` (the page, shipped in ``agent/static/``),
``/api/dashboard`` (first paint: state, samples, log), ``/api/dashboard/ring``
(the XOR ring), ``/api/events`` (SSE: ``log`` events with ids, ``state`` and
``sample`` frames) and ``/api/services/{name}/watch`` (see ``watch.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, OrderedDict, deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agent import __version__, events
from agent.component import Component, cancel_task
from agent.dht.record import ALL_SERVICES, service_key
from agent.discovery.api import BadRequest, check_service
from agent.discovery.explain import explain_set, worker_state
from agent.discovery.select import Query, record_max_age
from agent.discovery.watch import WatchHub
from agent.ratelimit import RateLimiter

if TYPE_CHECKING:
    from agent.config import Config
    from agent.lifecycle import Agent

log = logging.getLogger("rma_agent.dashboard")
_LOG_LIMIT = RateLimiter(rate=1 / 60, burst=3)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_FILES = {"app.js": "application/javascript", "app.css": "text/css",
                "index.html": "text/html"}
TICK_S = 1.0
SAMPLE_S = 2.0
HISTORY_S = 15 * 60
LOG_SIZE = 200
MAX_PAGES = 32             # /api/events streams at once
MAX_SERVICES = 12          # services a page shows (and keeps refreshed)
MAX_ROWS = 50              # workers (and excluded ones) per service in a page's state
PAGE_LINGER_S = 30.0
MAX_PRESENT = 10_000
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _num(x: Any, nd: int = 4) -> Any:
    """JSON-safe rounded number (non-finite -> None)."""
    if x is None or isinstance(x, bool):
        return x
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return round(v, nd) if math.isfinite(v) else None


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 3)


class DashboardComponent(Component):
    """Component "dashboard": the page, the event log, samples, SSE streams, watches."""

    name = "dashboard"

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent)
        self.hub = WatchHub(agent)
        self.hub.on_change = self._on_member_change
        self.page_limit = events.SubscriberLimit(MAX_PAGES)
        self.channel = events.Channel(self.page_limit, history=LOG_SIZE)
        self.samples: deque[dict[str, Any]] = deque(maxlen=int(HISTORY_S / SAMPLE_S))
        self._prev: dict[str, float] | None = None
        self._present: OrderedDict[tuple[str, bytes], Any] = OrderedDict()
        self._bans: set[bytes] = set()
        self._ready: tuple[bool, tuple[str, ...]] | None = None
        self._pinned: set[str] = set()
        self._page_seen = 0.0
        self._task: asyncio.Task[None] | None = None
        self._static: dict[str, bytes] = {}
        self._log: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)
        # worker id -> last name seen: a back-off can outlast the worker's record (it went
        # stale and was forgotten), and its "recovered" line should still name it
        self._names: OrderedDict[bytes, str] = OrderedDict()

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
        self.agent.subscribe("record", self._on_record)
        self.agent.subscribe("config", self._on_config)
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
    def log_event(self, kind: str, text: str, **extra: Any) -> None:
        item = {"t": round(time.time(), 3), "kind": kind, "text": text, **extra}
        eid = self.channel.publish("log", item)
        self._log.append({**item, "event_id": eid})

    def _remember_name(self, wid: bytes, name: Any) -> None:
        if isinstance(name, str) and name:
            self._names[wid] = name
            self._names.move_to_end(wid)
            while len(self._names) > MAX_PRESENT:
                self._names.popitem(last=False)

    def _mark(self, service: str, wid: bytes, rec: Any) -> bool:
        """Remember (service, worker) as present; True if it was not."""
        if rec is not None:
            self._remember_name(wid, getattr(rec, "name", ""))
        key = (service, wid)
        new = key not in self._present
        self._present[key] = rec
        self._present.move_to_end(key)
        while len(self._present) > MAX_PRESENT:
            self._present.popitem(last=False)
        return new

    def _unmark(self, service: str, wid: bytes) -> bool:
        """Forget (service, worker); True if it was present (its value may be None)."""
        key = (service, wid)
        if key not in self._present:
            return False
        del self._present[key]
        return True

    def _on_record(self, rec: Any) -> None:
        """A record stored locally: joins, moves and withdrawals as they arrive."""
        try:
            wid, services, withdrawn = rec.worker_id, tuple(rec.services), bool(rec.withdrawn)
            name = rec.name
        except AttributeError:
            return
        for svc in services:
            if withdrawn:
                if self._unmark(svc, wid):
                    self.log_event("withdrew", f"{name} withdrew from {svc}", service=svc,
                                   worker=name, worker_id=wid.hex())
                continue
            old = self._present.get((svc, wid))
            if self._mark(svc, wid, rec):
                self.log_event("joined", f"{name} joined {svc} ({rec.gpu or 'no GPU'}, "
                               f"{rec.region or 'no region'})", service=svc, worker=name,
                               worker_id=wid.hex())
            elif old is not None and getattr(old, "endpoint", rec.endpoint) != rec.endpoint:
                self.log_event("moved", f"{name} moved to {rec.endpoint}", service=svc,
                               worker=name, worker_id=wid.hex())

    def _on_member_change(self, service: str, kind: str, view: dict[str, Any],
                          reason: str) -> None:
        """Membership diffs of watched services (the DHT's view, not only local)."""
        if service == ALL_SERVICES:
            return
        wid = bytes.fromhex(view["id"])
        name = view.get("name", "")
        self._remember_name(wid, name)
        if kind == "added":
            if (service, wid) not in self._present and self._mark(service, wid, None):
                self.log_event("joined", f"{name} joined {service}", service=service,
                               worker=name, worker_id=view["id"])
        elif kind == "removed":
            if self._unmark(service, wid):
                verb = {"withdrawn": "withdrew from", "expired": "expired from",
                        "stale": "went stale in"}.get(reason, "left")
                kind_ = {"withdrawn": "withdrew", "expired": "expired",
                         "stale": "expired"}.get(reason, "left")
                self.log_event(kind_, f"{name} {verb} {service}"
                               + (f" ({reason})" if verb == "left" else ""),
                               service=service, worker=name, worker_id=view["id"])

    def _on_config(self, cfg: Any) -> None:
        self.log_event("reload", f"configuration reloaded from {getattr(cfg, 'source', '?')}")

    def _check_local(self, now: float) -> None:
        """Readiness, back-offs and expiries: no network, every tick."""
        ok, reasons = self.agent.readiness()
        cur = (ok, tuple(reasons))
        if cur != self._ready and self.agent.running:   # not while the agent still starts
            if self._ready is not None or not ok:
                self.log_event("ready" if ok else "not-ready",
                               "ready" if ok else "not ready: " + "; ".join(reasons))
            self._ready = cur
        disc = self.agent.get("discovery")
        tracker = getattr(disc, "tracker", None)
        if tracker is not None:
            bans = set(tracker.current_bans(now))
            for wid in bans - self._bans:
                st = tracker.get(wid)
                n = st.failures if st is not None else 0
                self.log_event("failing", f"worker {self._name_of(wid)} failed "
                               f"({n} in a row): backed off", worker_id=wid.hex())
            for wid in self._bans - bans:
                self.log_event("recovered", f"worker {self._name_of(wid)}: back-off over",
                               worker_id=wid.hex())
            self._bans = bans
        max_age = getattr(disc, "max_age_s", 60.0)
        for (svc, wid), rec in list(self._present.items()):
            if rec is None:
                continue          # known through a watch: the watch reports its removal
            # stale by the record's own refresh, the rule lookups apply (select.py)
            if rec.expires_at <= now or now - rec.issued_at > record_max_age(rec, max_age):
                self._unmark(svc, wid)
                self.log_event("expired", f"{rec.name} expired from {svc} (no refresh for "
                               f"{now - rec.issued_at:.0f} s)", service=svc, worker=rec.name,
                               worker_id=wid.hex())

    def _name_of(self, wid: bytes) -> str:
        for (_svc, w), rec in self._present.items():
            if w == wid and rec is not None:
                return str(rec.name)
        for w in self.hub.watches.values():
            view = w.members.get(wid)
            if view is not None:
                return str(view["name"])
        return self._names.get(wid) or wid.hex()[:12]

    # ------------------------------------------------------------------ samples
    def _counters(self) -> tuple[dict[str, float], list[float]]:
        disc = self.agent.get("discovery")
        dht = self.agent.get("dht")
        counts = getattr(disc, "counts", {})
        block = self.agent.stats().get("router")      # built by the router, when present
        router: dict[str, Any] = block if isinstance(block, dict) else {}
        cur = {
            "lookups": float(counts.get("lookups", 0)),
            "dht_lookups": float(getattr(dht, "_lookups", 0)),
            "lookup_errors": float(counts.get("dht_timeout", 0) + counts.get("dht_error", 0)),
            "routed": float(router.get("requests", 0) or 0),
            "routed_failed": float(router.get("failed", 0) or 0),
            "t": time.monotonic(),
            "has_router": 1.0 if router else 0.0,
        }
        durations = list(getattr(disc, "_durations", ()))
        return cur, durations

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
    def _overview(self) -> dict[str, Any]:
        a = self.agent
        dht = a.get("dht")
        ok, reasons = a.readiness()
        node_id = dht.identity.node_id if dht is not None and dht.identity is not None else b""
        contacts = {bytes.fromhex(c[0]) for c in dht.contacts()} if dht is not None else set()
        star = self.hub.get(ALL_SERVICES)
        workers = set(star.records) if star is not None else set()
        services = set(self._service_names())
        servers = contacts | ({node_id} if node_id and getattr(dht, "mode", "") == "server"
                              else set())
        nodes = servers | workers | ({node_id} if node_id else set())
        coordinators = servers - workers
        if a.config.agent.role == "coordinator" and node_id:
            coordinators.add(node_id)
        return {
            "name": a.config.agent.name, "role": a.config.agent.role,
            "region": a.config.agent.region, "version": __version__,
            "node_id": node_id.hex(), "mode": getattr(dht, "mode", None),
            "peers": dht.peers() if dht is not None else 0,
            "ready": ok, "reasons": reasons,
            "uptime_s": round(time.time() - a.started_at, 1),
            "nodes": len(nodes), "coordinators": len(coordinators),
            "workers": len(workers), "services": len(services),
            "router": bool(self.samples and self.samples[-1].get("router")),
            # the fleet's versions (record format 2's agent_version; "" = a v1 record)
            "versions": dict(sorted(Counter(
                str(getattr(r, "agent_version", "") or "") for r in
                (star.records.values() if star is not None else ())).items())),
        }

    def _service_state(self, service: str, now: float) -> dict[str, Any] | None:
        disc = self.agent.get("discovery")
        w = self.hub.get(service)
        if disc is None or w is None:
            return None
        entry = disc.cache.get_any(service)
        if entry is None:
            return {"name": service, "source": w.source, "workers": [], "excluded": []}
        q = Query(limit=min(MAX_ROWS, disc.max_results),
                  caller_region=self.agent.config.agent.region)
        out = explain_set(entry.candidates, q, now, disc.tracker, disc.scorer, disc.weights,
                          max_excluded=MAX_ROWS)
        # members of the watch that a newer answer dropped are gone: not shown
        workers = []
        cs = entry.candidates
        for v in out["workers"]:
            rec = cs.records[cs.index[bytes.fromhex(v["id"])]]
            workers.append({
                "id": v["id"], "name": v["name"], "endpoint": v["endpoint"], "gpu": v["gpu"],
                "version": str(getattr(rec, "agent_version", "") or ""),
                "gpu_memory_gb": _num(v["gpu_memory_gb"], 1), "load": _num(v["load"], 2),
                "capacity": _num(v["capacity"], 2), "region": v["region"],
                "age_s": _num(v["age_s"], 1), "latency_ms": _num(v["latency_ms"], 1),
                "score": _num(v["score"]), "state": v["state"], "rank": v["rank"],
                "components": {k: _num(x) for k, x in v["components"].items()}})
        excluded = [{"id": x["id"], "name": x["name"], "gpu": x["gpu"],
                     "region": x["region"], "load": _num(x["load"], 2),
                     "capacity": _num(x["capacity"], 2),
                     "state": worker_state(disc.tracker, bytes.fromhex(x["id"]), now)
                     if x["state"] != "-" else "-", "reason": x["reason"]}
                    for x in out["excluded"]]
        return {"name": service, "source": w.source, "workers": workers, "excluded": excluded,
                "excluded_total": out["excluded_total"]}

    def state(self) -> dict[str, Any]:
        now = time.time()
        services = []
        for svc in self._service_names():
            st = self._service_state(svc, now)
            if st is not None:
                services.append(st)
        return {"t": round(now, 3), "agent": self._overview(), "services": services,
                "weights": dict(zip(("free", "gpu", "region", "latency", "age"),
                                    getattr(self.agent.get("discovery"), "weights", ()),
                                    strict=False))}

    def ring(self, service: str | None) -> dict[str, Any]:
        dht = self.agent.get("dht")
        node = getattr(dht, "node", None)
        if dht is None or node is None or dht.identity is None:
            raise web.HTTPServiceUnavailable(text="dht: not started")
        me = dht.identity.node_id
        me_int = int.from_bytes(me, "big")
        router = getattr(getattr(node, "protocol", None), "router", None)
        star = self.hub.get(ALL_SERVICES)
        workers = set(star.records) if star is not None else set()
        contacts = []
        for cid_hex, ip, port in dht.contacts():
            cid = bytes.fromhex(cid_hex)
            bucket = None
            if router is not None:
                with contextlib.suppress(Exception):
                    from kademlia.node import Node
                    bucket = int(router.get_bucket_for(Node(cid)))
            dist = me_int ^ int.from_bytes(cid, "big")
            contacts.append({"id": cid_hex, "ip": ip, "port": port, "bucket": bucket,
                             "prefix": 160 - dist.bit_length(), "worker": cid in workers})
        out: dict[str, Any] = {"self": me.hex(), "mode": dht.mode,
                               "k": self.agent.config.dht.ksize,
                               "buckets": len(getattr(router, "buckets", ()) or ()),
                               "contacts": contacts, "workers_known": len(workers),
                               # workers that are no routing contact (DHT clients behind
                               # NAT): nodes of the network all the same
                               "others": [{"id": wid.hex(), "name": star.records[wid].name}
                                          for wid in sorted(workers - {me} - {
                                              bytes.fromhex(c["id"]) for c in contacts})
                                          ][:500] if star is not None else [],
                               "service": service, "key": None, "closest": []}
        if service:
            key = service_key(service)
            kint = int.from_bytes(key, "big")
            # the k closest *routing* nodes (servers): where the service's records live
            ids = ([me] if dht.mode == "server" else []) + [bytes.fromhex(c["id"])
                                                            for c in contacts]
            ids.sort(key=lambda b: kint ^ int.from_bytes(b, "big"))
            out["key"] = key.hex()
            out["closest"] = [b.hex() for b in ids[:self.agent.config.dht.ksize]]
        return out

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
                                  "log": list(self._log),
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
