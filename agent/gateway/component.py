"""GatewayComponent: a worker's public face — the service proxy and the ownership proof.

It owns what ``gateway.listen`` serves on a worker (the listener itself is started by the
lifecycle next to the admin API, see ``agent.gateway.app``):

- ``ANY /{service}/{path}`` -> ``gateway.upstreams[service]`` (``agent.gateway.proxy``),
  counted against ``worker.max_concurrency``: when that many requests are in flight the
  next one is answered ``503`` + ``Retry-After`` + ``RMA-Not-Processed: 1`` at once, without
  touching the upstream, so a router can send it to another worker.
- ``GET /.well-known/rma-agent/proof?nonce=HEX`` -> ``agent.proof.make_proof`` over the
  endpoint the worker announces (``worker.endpoint`` or the tunnel's URL).
- The in-flight count is the record's load: pushed to the worker role at most every
  ``LOAD_MIN_INTERVAL`` seconds, which re-announces only on a material change.
- Upstream health (``agent.gateway.health``): a service whose upstream is down is left
  out of the record (withdrawn from the DHT) and announced again once it answers;
  ``/readyz``, ``STATUS=`` and the journal name it. A known kind's own health endpoint
  decides (llama.cpp loading a model is down).
- The upstream's own signal (``agent.gateway.upstream_load``): for upstreams of a known
  kind the server's own load is polled (1 s while requests are in flight, 5 s idle) and
  merged with the in-flight count into ``load()`` — the ``RMA-Load`` header and the
  record's load.

It starts before the worker role (see ``agent.lifecycle._COMPONENTS``) so the first
health check decides what the first announce contains, and stops after it, so the
withdrawal goes out while requests still drain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from prometheus_client import Counter, Gauge

from agent.component import Component, cancel_task
from agent.gateway import health as health_mod
from agent.gateway import upstream_load as ul
from agent.gateway.kinds import Reading
from agent.gateway.proxy import error, new_session, proxy
from agent.gateway.upstream import Origin, Pool
from agent.http.load_header import HEADER as LOAD_HEADER
from agent.http.load_header import Load, format_load
from agent.proof import PROOF_PATH, ProofError, make_proof, parse_nonce

if TYPE_CHECKING:
    from agent.config import Config
    from agent.interfaces import AgentAPI, WorkerService

log = logging.getLogger("rma_agent.gateway")

LOAD_MIN_INTERVAL = 5.0      # seconds between two load reports to the worker role (and so
                             # at most one load-triggered re-announce per 5 s)
FIRST_CHECK_BUDGET = 2.0     # start() waits at most this long for the first health round
RETRY_AFTER = "1"            # seconds a caller should wait when this worker is full
POLL_ENV = "RMA_AGENT_UPSTREAM_POLL_S"   # "BUSY,IDLE" seconds: tests and tuning only


def poll_intervals() -> tuple[float, float]:
    """The upstream-load poll intervals (busy, idle): ``upstream_load``'s defaults, or
    ``$RMA_AGENT_UPSTREAM_POLL_S`` ("0.2,30") when it holds two positive numbers."""
    try:
        busy, idle = (float(x) for x in os.environ.get(POLL_ENV, "").split(","))
        if 0.05 <= busy <= idle <= 3600:
            return busy, idle
    except ValueError:
        pass
    return ul.BUSY_INTERVAL, ul.IDLE_INTERVAL


class GatewayComponent(Component):
    """Component "gateway" (workers only)."""

    name = "gateway"

    def __init__(self, agent: AgentAPI) -> None:
        super().__init__(agent)
        self.inflight = 0
        self.requests: dict[str, int] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.states: dict[str, health_mod.UpstreamState] = {}
        self.watches: dict[str, ul.LoadWatch] = {}      # upstreams of a known kind
        self._poll_task: asyncio.Task[None] | None = None
        self._burst = asyncio.Event()       # set when a request arrives at an idle gateway
        self._last_poll = -1e9
        self._intervals = poll_intervals()
        self._merged: tuple[tuple[Any, ...], Load] | None = None    # load() memo
        self._session: aiohttp.ClientSession | None = None
        self._pools: dict[str, Pool | None] = {}    # upstream URL -> lean pool (http only)
        self._hsession: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._load_handle: asyncio.TimerHandle | None = None
        self._last_push = -LOAD_MIN_INTERVAL
        self._load_value: tuple[Load, str] | None = None   # the last header, memoised
        reg = agent.registry
        self._m_requests = Counter("rma_agent_gateway_requests", "Requests to the gateway's "
                                   "service proxy, by outcome", ["outcome"], registry=reg)
        self._m_bytes = Counter("rma_agent_gateway_bytes", "Body bytes through the gateway "
                                "(in: caller -> upstream, out: upstream -> caller)",
                                ["direction"], registry=reg)
        inflight = Gauge("rma_agent_gateway_inflight", "Proxied requests in flight",
                         registry=reg)
        inflight.set_function(lambda: self.inflight)
        # children resolved once: a labels() lookup per request is measurable CPU
        self._m_outcome: dict[str, Any] = {}
        self._m_in = self._m_bytes.labels("in")
        self._m_out = self._m_bytes.labels("out")
        self._m_up = Gauge("rma_agent_gateway_upstream_up", "1 when the service's upstream "
                           "passes its health check", ["service"], registry=reg)
        self._m_queue = Gauge("rma_agent_gateway_upstream_queue", "Requests waiting in the "
                              "upstream server's own queue (its last fresh reading)",
                              ["service"], registry=reg)
        self._m_running = Gauge("rma_agent_gateway_upstream_running", "Requests the "
                                "upstream server says it is processing (last fresh reading)",
                                ["service"], registry=reg)

    # ------------------------------------------------------------------ helpers
    def _worker(self) -> WorkerService | None:
        return self.agent.worker

    def _capacity(self) -> int:
        return max(1, int(self.agent.config.worker.max_concurrency))

    def down(self) -> list[str]:
        return sorted(s for s, st in self.states.items() if st.state == "down")

    def _count(self, outcome: str) -> None:
        self.requests[outcome] = self.requests.get(outcome, 0) + 1
        child = self._m_outcome.get(outcome)
        if child is None:
            child = self._m_outcome[outcome] = self._m_requests.labels(outcome)
        child.inc()

    def _pool(self, url: str) -> Pool | None:
        """The lean connection pool for an upstream URL (None: not plain HTTP)."""
        try:
            return self._pools[url]
        except KeyError:
            origin = Origin.parse(url)
            pool = self._pools[url] = Pool(origin) if origin is not None else None
            return pool

    def _close_pools(self, keep: frozenset[str] | set[str] = frozenset()) -> None:
        """Close the pools of upstream URLs not in ``keep`` (all by default)."""
        for url in [u for u in self._pools if u not in keep]:
            pool = self._pools.pop(url)
            if pool is not None:
                pool.close()

    def load(self) -> Load:
        """This worker's load now: the gateway's in-flight requests (it never queues:
        it refuses when full) against ``worker.max_concurrency``, merged with what the
        upstream servers of a known kind say of themselves (``upstream_load.merge_load``:
        their queue, running requests and slots, from readings that are still fresh)."""
        cap = self._capacity()
        if not self.watches:
            return Load(self.inflight, 0, cap)
        now = time.monotonic()
        interval = self._interval()
        readings: list[Reading] = []
        key: list[Any] = [self.inflight, cap]
        full = False
        for w in self.watches.values():
            r = w.fresh(now, interval)
            if r is not None:
                readings.append(r)
                key.append(w.at)            # a new reading, a new time
            full = full or w.full(now)
        if not readings and not full:
            return Load(self.inflight, 0, cap)
        # every answer asks; the readings change once a poll: merge once per change
        key.append(full)
        k = tuple(key)
        memo = self._merged
        if memo is None or memo[0] != k:
            memo = self._merged = (k, ul.merge_load(
                self.inflight, cap, readings, full=full,
                upstreams=len(self.agent.config.gateway.upstreams)))
        return memo[1]

    async def _stamp_load(self, request: web.Request, response: web.StreamResponse) -> None:
        """``on_response_prepare``: every answer of this gateway — proxied, its own
        errors and 503s, the proof, a 404 — carries ``RMA-Load`` as of now (an
        upstream's own ``RMA-Load`` is replaced: only the gateway says it)."""
        load = self.load()
        memo = self._load_value
        if memo is None or memo[0] != load:
            memo = self._load_value = (load, format_load(load))
        response.headers[LOAD_HEADER] = memo[1]

    # ------------------------------------------------------------------ routes
    def add_gateway_routes(self, app: web.Application) -> None:
        app.on_response_prepare.append(self._stamp_load)
        app.router.add_get(PROOF_PATH, self._proof)
        # the common shape first: the router tries dynamic routes in order
        app.router.add_route("*", "/{service}/{path:.*}", self._proxy)
        app.router.add_route("*", "/{service}", self._proxy)

    async def _proof(self, request: web.Request) -> web.Response:
        try:
            nonce = parse_nonce(request.query.get("nonce", ""))
        except ProofError as exc:
            return error(400, f"{exc}: GET {PROOF_PATH}?nonce=<hex>")
        worker = self._worker()
        endpoint = worker.endpoint if worker is not None else ""
        dht = self.agent.dht
        identity = dht.identity if dht is not None else None
        if not endpoint or identity is None:
            return error(503, "this worker has no public endpoint yet", not_processed=True)
        return web.json_response(make_proof(identity, nonce, endpoint),
                                 headers={"Cache-Control": "no-store"})

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        cfg = self.agent.config
        service = request.match_info["service"].lower()
        if service not in cfg.worker.services:
            self._count("unknown_service")
            return error(404, f"no service {service!r} on this worker (it serves: "
                              f"{', '.join(cfg.worker.services) or 'nothing'})")
        upstream = cfg.gateway.upstreams.get(service)
        if upstream is None:
            self._count("no_upstream")
            return error(502, f"service {service!r} has no upstream on this worker "
                              "(gateway.upstreams)", not_processed=True)
        if self._session is None:
            self._count("not_started")
            return error(503, "the gateway is starting", not_processed=True,
                         headers={"Retry-After": RETRY_AFTER})
        cap = self._capacity()
        if self.inflight >= cap:
            self._count("full")
            return error(503, f"worker is full: {self.inflight} requests in flight "
                              f"(worker.max_concurrency = {cap})", not_processed=True,
                         headers={"Retry-After": RETRY_AFTER})
        self.inflight += 1
        if self.inflight == 1 and self.watches:
            self._burst.set()               # poll the servers' load at the busy pace now
        self._load_changed()
        try:
            resp, outcome, n_in, n_out = await proxy(request, self._session, upstream,
                                                     cfg.gateway, self._pool(upstream.url))
        finally:
            self.inflight -= 1
            self._load_changed()
        if resp.status == 503 and outcome == "ok" and service in self.watches:
            self.watches[service].saw_status(503, time.monotonic())   # e.g. Ollama full
        self._count(outcome)
        self.bytes_in += n_in
        self.bytes_out += n_out
        if n_in:
            self._m_in.inc(n_in)
        if n_out:
            self._m_out.inc(n_out)
        return resp

    # ------------------------------------------------------------------ load
    def _load_changed(self) -> None:
        """Schedule a load report: at once if the last one is old enough, else when it is."""
        if not self.agent.config.gateway.upstreams or self._load_handle is not None:
            return
        loop = asyncio.get_running_loop()
        wait = self._last_push + LOAD_MIN_INTERVAL - loop.time()
        if wait <= 0:
            self._push_load()
        else:
            self._load_handle = loop.call_later(wait, self._push_load)

    def _push_load(self) -> None:
        self._load_handle = None
        self._last_push = asyncio.get_running_loop().time()
        worker = self._worker()
        if worker is not None:
            worker.set_inflight(float(self.load().busy))

    # ------------------------------------------------------------------ health
    def _sync_states(self, cfg: Config) -> None:
        """Upstream states for the configured upstreams (kept for unchanged entries)."""
        new: dict[str, health_mod.UpstreamState] = {}
        for service, up in cfg.gateway.upstreams.items():
            old = self.states.get(service)
            new[service] = old if old is not None and old.upstream == up else \
                health_mod.UpstreamState(service, up)
        for gone in set(self.states) - set(new):
            for gauge in (self._m_up, self._m_queue, self._m_running):
                try:
                    gauge.remove(gone)
                except KeyError:
                    pass
        self.states = new
        watches: dict[str, ul.LoadWatch] = {}
        for service, up in cfg.gateway.upstreams.items():
            if up.kind == "generic":
                continue
            old_w = self.watches.get(service)
            watches[service] = old_w if old_w is not None and old_w.upstream == up else \
                ul.LoadWatch(service, up)
        self.watches = watches

    # ------------------------------------------------------------------ upstream load
    def _interval(self) -> float:
        """The poll interval now: busy while requests are in flight, else idle."""
        return self._intervals[0] if self.inflight else self._intervals[1]

    async def _poll_loop(self) -> None:
        """Read the known-kind servers' own load: every ``busy`` seconds while requests
        are in flight, every ``idle`` seconds otherwise, and at once (but never sooner
        than ``busy`` after the last read) when a request reaches an idle gateway."""
        loop = asyncio.get_running_loop()
        while True:
            due = self._last_poll + self._interval()
            now = loop.time()
            if now < due:
                if self.inflight:
                    await asyncio.sleep(due - now)
                else:
                    self._burst.clear()
                    try:
                        await asyncio.wait_for(self._burst.wait(), due - now)
                    except TimeoutError:
                        pass
                continue
            self._last_poll = now
            try:
                await self._poll_round(self._interval())
            except asyncio.CancelledError:
                raise
            except Exception as exc:     # never let the poller die
                log.warning("gateway: upstream load poll failed: %r", exc)

    async def _poll_round(self, interval: float) -> None:
        if not self.watches or self._hsession is None:
            return
        watches = list(self.watches.values())
        await asyncio.gather(*(w.poll(self._hsession, interval) for w in watches))
        now = time.monotonic()
        for w in watches:
            r = w.fresh(now, interval)
            for gauge, value in ((self._m_queue, r.waiting if r else None),
                                 (self._m_running, r.running if r else None)):
                if value is not None:
                    gauge.labels(w.service).set(value)
                else:
                    try:
                        gauge.remove(w.service)
                    except KeyError:
                        pass
        self._load_changed()

    async def _check_round(self, *, first: bool = False) -> None:
        assert self._hsession is not None
        states = list(self.states.values())
        results = await asyncio.gather(*(health_mod.check(self._hsession, st.upstream)
                                         for st in states))
        changed = False
        for st, why in zip(states, results, strict=True):
            was = st.state
            if health_mod.record(st, why, first=first or was == "unknown"):
                changed = True
                self._log_change(st, was)
            self._m_up.labels(st.service).set(1 if st.state == "up" else 0)
        if changed:
            self._apply()

    def _log_change(self, st: health_mod.UpstreamState, was: str) -> None:
        if st.state == "down":
            log.warning("gateway: upstream of %s is down (%s): %s", st.service, st.error,
                        "withdrawing it from the DHT" if was == "up" else "not announcing it")
        elif was == "down":
            log.info("gateway: upstream of %s is back (%s): announcing it again", st.service,
                     st.upstream.health_url)
        else:
            log.info("gateway: upstream of %s is up (%s)", st.service, st.upstream.health_url)

    def _apply(self) -> None:
        """Tell the worker role which services to leave out, and STATUS= to refresh."""
        worker = self._worker()
        if worker is not None:
            worker.set_down(frozenset(self.down()))
        self.agent.status_changed()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(health_mod.INTERVAL)
            for pool in self._pools.values():
                if pool is not None:
                    pool.sweep()
            try:
                await self._check_round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:     # never let the checker die
                log.warning("gateway: health check round failed: %r", exc)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._session = new_session(limit=0)
        self._hsession = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        self._sync_states(self.agent.config)
        if self.states:
            try:
                await asyncio.wait_for(self._check_round(first=True), FIRST_CHECK_BUDGET)
            except TimeoutError:
                log.info("gateway: first upstream health check still running; announcing "
                         "what is known")
            self._push_load()
        self._health_task = asyncio.create_task(self._health_loop(), name="gateway-health")
        self._poll_task = asyncio.create_task(self._poll_loop(), name="gateway-upstream-load")
        services = set(self.agent.config.worker.services)
        missing = sorted(services - set(self.agent.config.gateway.upstreams))
        if missing:
            log.warning("gateway: no upstream for %s (gateway.upstreams): requests for it "
                        "are answered 502", ",".join(missing))

    async def reload(self, old: Config, new: Config) -> None:
        if old.gateway.upstreams != new.gateway.upstreams:
            self._close_pools({up.url for up in new.gateway.upstreams.values()})
            self._sync_states(new)
            if self._hsession is not None and self.states:
                self.agent.spawn(self._check_round(), "gateway-health-reload")
            self._apply()

    async def stop(self) -> None:
        await cancel_task(self._health_task)
        await cancel_task(self._poll_task)
        self._health_task = self._poll_task = None
        if self._load_handle is not None:
            self._load_handle.cancel()
            self._load_handle = None
        self._close_pools()
        for sess in (self._session, self._hsession):
            if sess is not None:
                await sess.close()
        self._session = self._hsession = None

    # ------------------------------------------------------------------ readiness/status
    def ready(self) -> tuple[bool, str]:
        down = [self.states[s] for s in self.down()]
        if down:
            return False, "gateway: upstream down: " + "; ".join(
                f"{st.service} ({st.error})" for st in down)
        return True, ""

    def status(self) -> str:
        frag = f"inflight {self.inflight}/{self._capacity()}"
        down = self.down()
        if down:
            frag += ", upstream down: " + ",".join(down)
        return frag

    def _upstream_json(self, service: str, st: health_mod.UpstreamState,
                       now: float) -> dict[str, Any]:
        """Health state, and for a known kind its last reading, the reading's age and
        the poll counts."""
        out = st.to_json()
        watch = self.watches.get(service)
        if watch is not None:
            out.update(watch.to_json(now))
        return out

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"gateway": {
            "listen": str(self.agent.config.gateway.listen),
            "inflight": self.inflight,
            "capacity": self._capacity(),
            "requests": dict(self.requests),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "upstreams": {s: self._upstream_json(s, st, now)
                          for s, st in self.states.items()},
            "load": dataclasses.asdict(self.load()),
            "down": self.down(),
        }}
