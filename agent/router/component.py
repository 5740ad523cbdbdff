"""Component "router": ``ANY /route/{service}/{path}`` on the admin API (SPEC §5).

One routed request:

1. **Pick.** Discovery's ranked records for the service (cache -> DHT -> coordinators,
   the same ranking and top-3 draw as ``/api/services/{name}``), filtered by the
   ``RMA-Region``, ``RMA-GPU`` and ``RMA-Min-GPU-Memory-GB`` request headers. Records
   whose endpoint callers may not contact were already left out by discovery
   (:mod:`agent.discovery.endpoints`); workers that said "full" in the last second go last.
2. **Own.** Before the first request to an endpoint (and again every few minutes) its
   ownership proof is checked (:mod:`agent.discovery.ownership`); a failed proof holds
   the worker out of every answer and the request moves to the next worker.
3. **Forward.** ``{endpoint}/{service}/{path}?{query}`` with the caller's method, headers
   (hop-by-hop removed) and body; the answer streams back as it arrives (no buffering,
   no decompression, redirects passed on, never followed) with ``RMA-Worker: <id hex>``
   and ``RMA-Attempts: <n>``.
4. **Retry** (rules in :mod:`agent.router.proxy`) on the next-ranked worker, at most
   ``discovery.max_attempts`` tries, within the retry budget (:mod:`agent.router.budget`).
5. **Learn.** Each outcome feeds the latency tracker ranking uses: time to response
   headers on success, an immediate back-off on a refused connection, a timeout or a
   502/503/504 (callers no longer need to ``POST .../report``).

Errors of the router itself are JSON: 400 (bad service name, bad filter header, a
``.``/``..`` path segment), 404 (nobody serves the service), 429 (too many uncached
lookups), 502 (no worker could serve: every try failed), 503 (not started).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from multidict import MultiDict
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram
from yarl import URL

from agent.component import Component
from agent.discovery.api import BadRequest, check_service, parse_query, wants_fresh
from agent.discovery.endpoints import (
    Allowance,
    EndpointRefused,
    GuardedConnector,
    endpoint_refusal,
)
from agent.discovery.select import Query
from agent.discovery.service import SOURCES
from agent.http.forwarding import path_refusal
from agent.ratelimit import RateLimiter
from agent.router.budget import RetryBudget
from agent.router.proxy import (
    FILTER_HEADERS,
    IDEMPOTENT,
    RETRY_STATUSES,
    Body,
    read_body,
    request_headers,
    response_headers,
)

if TYPE_CHECKING:
    from agent.config import Config
    from agent.interfaces import DiscoveryService
    from agent.lifecycle import Agent

log = logging.getLogger("rma_agent.router")
_LOG_LIMIT = RateLimiter(rate=0.2, burst=5)

CONNECT_TIMEOUT_S = 5.0
BUSY_HOLD_S = 1.0             # a worker that said "full" goes last for this long
MAX_BUSY = 4096
READ_BUFSIZE = 1 << 18
SMALL_ANSWER_BYTES = 64 * 1024   # answers up to this size (with a length) are relayed whole
OUTCOMES = ("ok", "upstream_error", "no_workers", "failed", "bad_request", "aborted",
            "limited")
RETRY_REASONS = ("connect", "proof", "not_processed", "status", "timeout", "disconnect")
ATTEMPT_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10)
UPSTREAM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class _Metrics:
    def __init__(self, registry: Any, router: RouterComponent) -> None:
        kw: dict[str, Any] = {"registry": registry}
        self.requests = PromCounter("rma_agent_routed_requests",
                                    "Requests through /route/, by outcome", ["outcome"], **kw)
        self.attempts = Histogram("rma_agent_route_attempts",
                                  "Workers tried per routed request",
                                  buckets=ATTEMPT_BUCKETS, **kw)
        self.retries = PromCounter("rma_agent_route_retries",
                                   "Routed requests tried again on another worker, by reason",
                                   ["reason"], **kw)
        self.budget_refused = PromCounter("rma_agent_route_retry_budget_exhausted",
                                          "Retries not made because the retry budget was "
                                          "spent", **kw)
        self.upstream = Histogram("rma_agent_route_upstream_seconds",
                                  "Time from sending to a worker to its response headers",
                                  buckets=UPSTREAM_BUCKETS, **kw)
        self.lookups = PromCounter("rma_agent_route_lookups",
                                   "Router lookups by source (cache, dht, coordinator, "
                                   "stale: the last-known-good copy on disk)",
                                   ["source"], **kw)
        Gauge("rma_agent_route_dht_hit_ratio", "Of the router's lookups that reached past "
              "the cache, the share the DHT answered", **kw).set_function(
            lambda: router.rates()[0])
        Gauge("rma_agent_route_fallback_ratio", "Of the router's lookups that reached past "
              "the cache, the share coordinators answered", **kw).set_function(
            lambda: router.rates()[1])
        for o in OUTCOMES:
            self.requests.labels(o)
        for r in RETRY_REASONS:
            self.retries.labels(r)
        for s in SOURCES:
            self.lookups.labels(s)


class _Failed(Exception):
    """One attempt failed in a way that may allow a retry."""

    def __init__(self, reason: str, detail: str, *, sent: bool, charged: bool) -> None:
        super().__init__(detail)
        self.reason = reason        # a RETRY_REASONS label
        self.sent = sent            # the request (or part of it) may have reached the worker
        self.charged = charged      # a retry after this costs retry budget


class RouterComponent(Component):
    """Component "router" (any role)."""

    name = "router"

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent)
        self.budget = RetryBudget()
        self.metrics = _Metrics(agent.registry, self)
        self._m_out = {o: self.metrics.requests.labels(o) for o in OUTCOMES}
        self._m_retry = {r: self.metrics.retries.labels(r) for r in RETRY_REASONS}
        self._m_lookup = {s: self.metrics.lookups.labels(s)
                          for s in SOURCES}
        self.counts: Counter[str] = Counter()
        self._busy: OrderedDict[bytes, float] = OrderedDict()
        self._inflight: dict[bytes, int] = {}      # requests this router has at each worker
        self._session: aiohttp.ClientSession | None = None
        self._refusals: dict[str, str | None] = {}

    # ------------------------------------------------------------------ config
    @property
    def max_attempts(self) -> int:
        return max(1, int(self.agent.config.discovery.max_attempts))

    @property
    def upstream_timeout_s(self) -> float:
        return float(self.agent.config.gateway.upstream_timeout)

    def _allow_http(self) -> Allowance:
        return Allowance.from_config(self.agent.config.discovery)

    # ------------------------------------------------------------------ lifecycle
    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/route/{service}/{path:.*}", self.handle)
        app.router.add_route("*", "/route/{service}", self.handle)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=GuardedConnector(self._allow_http, self._contacts(), limit=512,
                                           limit_per_host=0),
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding",
                                   "Content-Type"),
                read_bufsize=READ_BUFSIZE)
        return self._session

    def _contacts(self) -> Counter[str]:
        disc = self.agent.discovery
        return disc.contacts if disc is not None else Counter()

    async def start(self) -> None:
        self.session()

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def reload(self, old: Config, new: Config) -> None:
        self._refusals.clear()

    # ------------------------------------------------------------------ stats
    def rates(self) -> tuple[float, float]:
        """(DHT hit ratio, coordinator fallback ratio) of lookups past the cache."""
        c = self.counts
        past = c["lookup_dht"] + c["lookup_coordinator"]
        if not past:
            return 0.0, 0.0
        return c["lookup_dht"] / past, c["lookup_coordinator"] / past

    def stats(self) -> dict[str, Any]:
        c = self.counts
        dht_rate, fallback_rate = self.rates()
        past = c["lookup_dht"] + c["lookup_coordinator"]
        return {
            "router": {"requests": c["requests"], "ok": c["ok"], "failed": c["failed"],
                       "retries": c["retries"], "attempts": c["attempts"]},
            "router_detail": {
                "outcomes": {o: c[f"outcome_{o}"] for o in OUTCOMES},
                "retries_by_reason": {r: c[f"retry_{r}"] for r in RETRY_REASONS},
                "retry_budget_exhausted": self.budget.refused,
                "retry_budget_tokens": round(self.budget.tokens, 2),
                "lookups_by_source": {s: c[f"lookup_{s}"]
                                      for s in SOURCES},
                "dht_hit_rate": round(dht_rate, 4) if past else None,
                "fallback_rate": round(fallback_rate, 4) if past else None,
                "max_attempts": self.max_attempts,
                "contacted_hosts": dict(self._contacts()),
            },
        }

    def _finish(self, outcome: str, attempts: int) -> None:
        c = self.counts
        c[f"outcome_{outcome}"] += 1
        self._m_out[outcome].inc()
        if outcome == "bad_request":
            return
        c["requests"] += 1
        c["attempts"] += attempts
        if outcome == "ok":
            c["ok"] += 1
        else:
            c["failed"] += 1
        if attempts:
            self.metrics.attempts.observe(attempts)

    # ------------------------------------------------------------------ the handler
    async def handle(self, request: web.Request) -> web.StreamResponse:
        disc = self.agent.discovery
        if disc is None:
            return _error(503, "router: discovery is not running on this agent")
        raw_service = request.match_info["service"]
        try:
            service = check_service(raw_service.lower())
            query = self._query(request, disc)
        except BadRequest as exc:
            self._finish("bad_request", 0)
            return _error(400, str(exc))
        raw = request.raw_path
        raw_path, _, raw_query = raw.partition("?")
        prefix = "/route/" + raw_service
        rest = raw_path[len(prefix):] if raw_path.startswith(prefix) else "/" + \
            request.match_info.get("path", "")
        refusal = path_refusal(rest)
        if refusal is not None:
            self._finish("bad_request", 0)
            return _error(400, f"not routed: {refusal}")
        if not disc.allow_lookup(service, wants_fresh(request)):
            self._finish("limited", 0)
            return disc.crawl_limit.too_many()
        records, source = await disc.route_candidates(service, query)
        self.counts[f"lookup_{source}"] += 1
        self._m_lookup[source].inc()
        if not records:
            self._finish("no_workers", 0)
            return _error(404, f"no workers serve {service!r} right now "
                               f"(source: {source})")
        self.budget.deposit()
        body = await read_body(request.method, request.content, request.content_length,
                               request.body_exists)
        return await self._attempts(request, disc, service, rest, raw_query, records, body)

    def _query(self, request: web.Request, disc: DiscoveryService) -> Query:
        limit = min(disc.max_results, 2 * self.max_attempts + 2)
        headers = request.headers
        if not any(h in headers for h in FILTER_HEADERS):
            return Query(limit=limit)
        params: MultiDict[str] = MultiDict()
        names = {"RMA-Region": "region", "RMA-GPU": "gpu",
                 "RMA-Min-GPU-Memory-GB": "min_gpu_memory_gb"}
        for header in FILTER_HEADERS:
            for value in request.headers.getall(header, ()):
                params.add(names[header], value)
        try:
            q = parse_query(params, disc.max_results)
        except BadRequest as exc:
            msg = str(exc)
            for header, param in sorted(names.items(), key=lambda hp: -len(hp[1])):
                msg = msg.replace(f"parameter {param!r}", f"header {header}")
                msg = msg.replace(param, header)
            raise BadRequest(msg) from None
        # a few more candidates than tries: some may fail their proof or be skipped
        return Query(limit=limit, region=q.region, gpu=q.gpu,
                     min_gpu_memory_gb=q.min_gpu_memory_gb)

    def _order(self, records: list[Any]) -> list[Any]:
        """Workers likely to be full go last (ranking order otherwise kept): those that
        answered "full" within BUSY_HOLD_S, and those this router already has as many
        requests at as their announced capacity (least-outstanding-requests: it spreads
        a burst by capacity instead of collecting 503s from small workers)."""
        busy, inflight = self._busy, self._inflight
        if busy:
            now = time.monotonic()
            for wid in [w for w, until in busy.items() if until <= now]:
                del busy[wid]
        if not busy and not inflight:
            return records
        return sorted(records, key=lambda r: r.worker_id in busy or (
            r.capacity > 0 and inflight.get(r.worker_id, 0) >= r.capacity))

    def _refused(self, endpoint: str) -> str | None:
        cached = self._refusals.get(endpoint, ...)
        if cached is ...:
            cached = endpoint_refusal(endpoint, self._allow_http())
            if len(self._refusals) > 4096:
                self._refusals.clear()
            self._refusals[endpoint] = cached
        return cached  # type: ignore[return-value]

    async def _attempts(self, request: web.Request, disc: DiscoveryService, service: str,
                        rest: str, raw_query: str, records: list[Any],
                        body: Body) -> web.StreamResponse:
        method = request.method
        idempotent = method in IDEMPOTENT
        session = self.session()
        candidates = [r for r in self._order(records) if self._refused(r.endpoint) is None]
        attempts = 0
        last = "no usable worker"
        headers = request_headers(request.headers, body.length)
        limits = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S,
                                        sock_read=self.upstream_timeout_s)
        n = 0
        while n < len(candidates) and attempts < self.max_attempts:
            rec = candidates[n]
            n += 1
            attempts += 1
            wid = rec.worker_id
            proof = await disc.ownership.check(session, wid, rec.endpoint, rec.public_key)
            if not proof.ok:
                self._proof_failed(disc, service, rec, proof.kind, proof.reason)
                last = f"worker {wid.hex()[:12]}: ownership proof {proof.kind}: {proof.reason}"
                if not self._may_retry(n, candidates, attempts, charged=False,
                                       reason="proof"):
                    break
                continue
            url = URL(f"{rec.endpoint.rstrip('/')}/{service}{rest}"
                      + (f"?{raw_query}" if raw_query else ""), encoded=True)
            self._inflight[wid] = self._inflight.get(wid, 0) + 1
            try:
                t0 = time.perf_counter()
                try:
                    resp = await self._send(session, method, url, headers, body, limits)
                except asyncio.CancelledError:
                    # the caller went away (aiohttp cancels its handler): nobody's failure
                    self._finish("aborted", attempts)
                    raise
                except _Failed as exc:
                    if body.caller_failed:
                        # the caller's upload broke off: nobody's failure but the caller's
                        self._finish("aborted", attempts)
                        return _error(400, "the request body ended before it was complete",
                                      attempts=attempts)
                    disc.report(service, wid, False, None)
                    last = f"worker {wid.hex()[:12]}: {exc}"
                    retry_ok = body.replayable and (not exc.sent or idempotent)
                    if not (retry_ok and self._may_retry(n, candidates, attempts,
                                                          charged=exc.charged,
                                                          reason=exc.reason)):
                        break
                    continue
                dt = time.perf_counter() - t0
                self.metrics.upstream.observe(dt)
                not_processed = resp.headers.get("RMA-Not-Processed", "").strip() == "1"
                retry_reason = ""
                if not_processed:
                    retry_reason = "not_processed"
                    self._mark_busy(wid)
                elif idempotent and resp.status in RETRY_STATUSES:
                    retry_reason = "status"
                if retry_reason:
                    if not not_processed:
                        disc.report(service, wid, False, None)
                    if body.replayable and self._may_retry(n, candidates, attempts, charged=True,
                                                           reason=retry_reason):
                        last = f"worker {wid.hex()[:12]}: HTTP {resp.status}"
                        resp.release()
                        continue
                elif resp.status >= 500:
                    disc.report(service, wid, False, None)
                else:
                    # straight to the tracker: report()'s answer dict is not needed here
                    disc.tracker.record_success(wid, dt * 1000.0)
                return await self._relay(request, resp, wid, attempts)
            finally:
                left = self._inflight.get(wid, 1) - 1
                if left > 0:
                    self._inflight[wid] = left
                else:
                    self._inflight.pop(wid, None)
        self._finish("failed" if attempts else "no_workers", attempts)
        return _error(502, f"no worker could serve {service!r}: {last}",
                      attempts=attempts, extra={"RMA-Attempts": str(attempts)})

    def _may_retry(self, n: int, candidates: list[Any], attempts: int, *, charged: bool,
                   reason: str) -> bool:
        """Whether one more try is allowed; counts it when it is."""
        if n >= len(candidates) or attempts >= self.max_attempts:
            return False
        if charged and not self.budget.withdraw():
            self.metrics.budget_refused.inc()
            return False
        self.counts["retries"] += 1
        self.counts[f"retry_{reason}"] += 1
        self._m_retry[reason].inc()
        return True

    def _mark_busy(self, wid: bytes) -> None:
        self._busy[wid] = time.monotonic() + BUSY_HOLD_S
        self._busy.move_to_end(wid)
        while len(self._busy) > MAX_BUSY:
            self._busy.popitem(last=False)

    def _proof_failed(self, disc: DiscoveryService, service: str, rec: Any, kind: str,
                      reason: str) -> None:
        if kind == "bad":
            now = disc.clock()
            if disc.tracker.record_proof(rec.worker_id, False, now, disc.ownership.reverify_s):
                disc.forget_worker(rec.worker_id)
            _LOG_LIMIT.log(log, logging.WARNING, "proof",
                           "router: worker %s failed its ownership proof at %s: %s; not "
                           "offered or routed to", rec.worker_id.hex()[:12], rec.endpoint,
                           reason)
        else:
            disc.report(service, rec.worker_id, False, None)

    async def _send(self, session: aiohttp.ClientSession, method: str, url: URL,
                    headers: Any, body: Body,
                    limits: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        """One attempt up to the response headers; failures as :class:`_Failed`."""
        try:
            return await session.request(method, url, headers=headers, data=body.payload(),
                                         allow_redirects=False, timeout=limits,
                                         compress=None, chunked=None)
        except asyncio.CancelledError:
            raise
        except EndpointRefused as exc:
            raise _Failed("connect", str(exc), sent=False, charged=False) from None
        except aiohttp.ClientConnectorError as exc:
            raise _Failed("connect", f"cannot connect: {exc.os_error or exc}",
                          sent=False, charged=False) from None
        except (aiohttp.ServerTimeoutError, TimeoutError):
            raise _Failed("timeout", "no response headers in time", sent=True,
                          charged=True) from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise _Failed("disconnect", f"connection failed: {exc or type(exc).__name__}",
                          sent=True, charged=True) from None

    async def _relay(self, request: web.Request, resp: aiohttp.ClientResponse, wid: bytes,
                     attempts: int) -> web.StreamResponse:
        """Stream the worker's answer to the caller as it arrives."""
        headers = response_headers(resp.headers)
        headers["RMA-Worker"] = wid.hex()
        headers["RMA-Attempts"] = str(attempts)
        outcome = "ok" if resp.status < 500 else "upstream_error"
        length = resp.content_length
        if length is not None and length <= SMALL_ANSWER_BYTES and request.method != "HEAD":
            # a small answer of known length: one read and one write (the common case;
            # memory is bounded by SMALL_ANSWER_BYTES per request)
            try:
                body = await resp.content.readexactly(length)
            except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
                resp.release()
                self._finish("aborted", attempts)
                return _error(502, f"worker {wid.hex()[:12]} cut its answer short: "
                                   f"{str(exc) or type(exc).__name__}",
                              extra={"RMA-Worker": wid.hex(),
                                     "RMA-Attempts": str(attempts)})
            resp.release()
            self._finish(outcome, attempts)
            return web.Response(status=resp.status, reason=resp.reason, body=body,
                                headers=headers)
        out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
        if length is not None:
            out.content_length = length
        try:
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # the worker or the caller went away mid-answer: nothing sensible can be sent
            # any more; closing the connection tells the caller the answer is incomplete
            outcome = "aborted"
            _LOG_LIMIT.log(log, logging.INFO, "abort",
                           "router: answer from worker %s cut short: %s", wid.hex()[:12],
                           str(exc) or type(exc).__name__)
            if request.transport is not None:
                request.transport.close()
        finally:
            resp.release()
        self._finish(outcome, attempts)
        return out


def _error(status: int, message: str, *, attempts: int | None = None,
           extra: dict[str, str] | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if attempts is not None:
        body["attempts"] = attempts
    return web.json_response(body, status=status, headers=extra)
