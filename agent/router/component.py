"""Component "router": ``ANY /route/{service}/{path}`` on the admin API (SPEC §5).

One routed request:

1. **Pick.** Discovery's ranked records for the service (cache -> DHT -> coordinators,
   the same ranking and top-3 draw as ``/api/services/{name}``), filtered by the
   ``RMA-Region``, ``RMA-GPU`` and ``RMA-Min-GPU-Memory-GB`` request headers. Records
   whose endpoint callers may not contact were already left out by discovery
   (:mod:`agent.discovery.endpoints`). The order to try them in is the selection policy's
   (:mod:`agent.router.policy`: power of two choices on fresh load and peak-EWMA latency;
   full workers after those with room, failing ones banned, ``Retry-After`` honoured).
   Discovery is reached only through :class:`agent.interfaces.RouterDiscovery`
   (:class:`agent.discovery.router_view.RouterView` over ``agent.discovery``).
2. **Share.** A worker that holds its whole share of this router's connections, or hangs,
   is skipped (:mod:`agent.router.slots`); when every candidate is skipped the answer is a
   ``503`` at once.
3. **Own.** Before the first request to an endpoint (and again every few minutes) its
   ownership proof is checked (:mod:`agent.discovery.ownership`); a failed proof holds
   the worker out of every answer and the request moves to the next worker.
4. **Forward.** ``{endpoint}/{service}/{path}?{query}`` with the caller's method, headers
   (hop-by-hop removed) and body; the answer streams back as it arrives (no buffering,
   no decompression, redirects passed on, never followed) with ``RMA-Worker: <id hex>``
   and ``RMA-Attempts: <n>``. Timeouts bound silence, never length (an LLM answer or a
   big upload may take as long as it keeps moving): the answer's head must come within
   ``gateway.upstream_timeout`` of silence after the request went out, and within
   ``CONNECT_TIMEOUT_S + gateway.upstream_timeout`` in all counted from the last body
   byte forwarded (every chunk of a streamed body starts that budget again), so a worker
   cannot trickle its head forever; after the head, a silence longer than
   ``gateway.upstream_timeout`` between two chunks ends the answer (cut: the caller's
   connection is closed, never ended cleanly). A caller that hangs up — while its body
   uploads, while the head is awaited or mid-answer — cancels the handler (the admin app
   runs with ``handler_cancellation``): the connection to the worker is closed at once,
   so the worker's gateway and its upstream see the caller go, and the slot is free.
5. **Retry** (rules in :mod:`agent.router.proxy`) on the next-ranked worker, at most
   ``discovery.max_attempts`` tries, within the retry budget (:mod:`agent.router.budget`).
   ``RMA-Not-Processed: 1`` is believed only on a ``502``/``503`` answer — the statuses a
   worker's gateway gives when it refused the request *before* passing it on (full,
   starting, upstream unreachable). On any other status the work may have been done, so
   the answer goes back to the caller as it is: a worker cannot get a processed ``POST``
   sent to a second worker by adding the header to a ``200`` or a ``500``.
6. **Learn.** Each outcome feeds the latency tracker ranking uses: time to response
   headers on success, an immediate back-off on a refused connection, a timeout or a
   502/503/504, or when the worker hangs (callers no longer need to ``POST .../report``).

Errors of the router itself are JSON: 400 (bad service name, bad filter header, a
``.``/``..`` path segment), 404 (nobody serves the service), 429 (too many uncached
lookups), 502 (no worker could serve: every try failed), 503 (not started, or every
worker at its share of the router's connections).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from agent.component import Component, cancel_task
from agent.discovery.api import BadRequest, check_service
from agent.discovery.metrics import SOURCES
from agent.discovery.router_view import RouterView
from agent.http.forwarding import ProxyResponse, path_refusal
from agent.http.load_header import HEADER as LOAD_HEADER
from agent.ratelimit import RateLimiter
from agent.router.attempt import AttemptFailed, send
from agent.router.budget import RetryBudget
from agent.router.filters import filter_query
from agent.router.freshload import FreshLoads
from agent.router.metrics import OUTCOMES, RETRY_REASONS, RouterMetrics, policy_hooks
from agent.router.policy import RoutePolicy
from agent.router.proxy import (
    IDEMPOTENT,
    RETRY_STATUSES,
    Body,
    read_body,
    request_headers,
)
from agent.router.relay import error, relay
from agent.router.slots import POOL, WorkerSlots

if TYPE_CHECKING:
    from agent.interfaces import AgentAPI, RoutedRecord, RouterDiscovery

log = logging.getLogger("rma_agent.router")
_LOG_LIMIT = RateLimiter(rate=0.2, burst=5)

CONNECT_TIMEOUT_S = 5.0
READ_BUFSIZE = 1 << 18
SWEEP_S = 1.0                 # how often waiting attempts are checked for hanging workers
# statuses on which a worker's RMA-Not-Processed is believed (its gateway's refusals)
NOT_PROCESSED_STATUSES = frozenset({502, 503})


@dataclass
class _Call:
    """One routed request while its attempts run."""

    request: web.Request
    disc: RouterDiscovery
    service: str
    path: str                 # after /route/{service}: what follows the worker's /{service}
    query: str
    body: Body
    headers: CIMultiDict[str]
    candidates: list[Any]
    n: int = 0                # candidates looked at
    attempts: int = 0         # workers actually tried
    skipped: int = 0          # candidates skipped: at their share, or hanging
    stop: bool = False        # no further try is allowed
    last: str = "no usable worker"

    @property
    def idempotent(self) -> bool:
        return self.request.method in IDEMPOTENT


class RouterComponent(Component):
    """Component "router" (any role)."""

    name = "router"

    def __init__(self, agent: AgentAPI) -> None:
        super().__init__(agent)
        self.budget = RetryBudget()
        self.metrics = RouterMetrics(agent.registry, SOURCES, self.rates)
        self._m_out = {o: self.metrics.requests.labels(o) for o in OUTCOMES}
        self._m_retry = {r: self.metrics.retries.labels(r) for r in RETRY_REASONS}
        self._m_lookup = {s: self.metrics.lookups.labels(s) for s in SOURCES}
        self.counts: Counter[str] = Counter()
        self.slots = WorkerSlots()
        self.loads = FreshLoads()
        self.policy = RoutePolicy(**policy_hooks(agent.registry))
        self._session: aiohttp.ClientSession | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.connect_timeout_s = CONNECT_TIMEOUT_S
        self._view: RouterDiscovery | None = None
        self._view_of: object = None

    # ------------------------------------------------------------------ config
    @property
    def max_attempts(self) -> int:
        return max(1, int(self.agent.config.discovery.max_attempts))

    @property
    def upstream_timeout_s(self) -> float:
        return float(self.agent.config.gateway.upstream_timeout)

    @property
    def attempt_budget_s(self) -> float:
        """The most one attempt may take from its last request body byte up to the
        worker's response headers."""
        return self.connect_timeout_s + self.upstream_timeout_s

    # ------------------------------------------------------------------ lifecycle
    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/route/{service}/{path:.*}", self.handle)
        app.router.add_route("*", "/route/{service}", self.handle)

    def _discovery(self) -> RouterDiscovery | None:
        """The router's view of this agent's discovery (None: it runs none)."""
        disc = self.agent.discovery
        if disc is None:
            return None
        if self._view is None or self._view_of is not disc:
            self._view, self._view_of = RouterView(disc), disc
        return self._view

    def session(self, disc: RouterDiscovery) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=disc.caller_connector(limit=POOL, limit_per_host=0),
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                response_class=ProxyResponse,      # a dropped exchange aborts its connection
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding",
                                   "Content-Type"),
                read_bufsize=READ_BUFSIZE)
        return self._session

    async def start(self) -> None:
        disc = self._discovery()
        if disc is not None:
            self.session(disc)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def stop(self) -> None:
        await cancel_task(self._sweeper)
        self._sweeper = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _sweep_loop(self) -> None:
        """Once a second, while attempts wait for headers: back off hanging workers."""
        while True:
            await asyncio.sleep(SWEEP_S)
            if self.slots.busy():
                self.sweep(time.monotonic())

    def sweep(self, now: float) -> int:
        """Report the workers :meth:`WorkerSlots.sweep` finds hanging; how many."""
        found = self.slots.sweep(now)
        disc = self._discovery() if found else None
        for wid, overdue in found:
            self.metrics.suspects.inc()
            if disc is not None:
                disc.worker_outcome(wid, False)
            _LOG_LIMIT.log(log, logging.WARNING, "hanging",
                           "router: worker %s holds %d requests that waited over %.0f s "
                           "for an answer (more than it may have in flight): backed off",
                           wid.hex()[:12], overdue, self.slots.overdue_after(wid))
        return len(found)

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
        disc = self._discovery()
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
                "attempt_budget_s": self.attempt_budget_s,
                "contacted_hosts": disc.contacted_hosts() if disc is not None else {},
                "workers": self.slots.stats(time.monotonic()),
                "loads": self.loads.stats(time.time()),
                "policy": self.policy.stats(),
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
        disc = self._discovery()
        if disc is None:
            return error(503, "router: discovery is not running on this agent")
        raw_service = request.match_info["service"]
        try:
            service = check_service(raw_service.lower())
            query = filter_query(request.headers, disc.max_results,
                                 2 * self.max_attempts + 2)
        except BadRequest as exc:
            self._finish("bad_request", 0)
            return error(400, str(exc))
        raw = request.raw_path
        raw_path, _, raw_query = raw.partition("?")
        prefix = "/route/" + raw_service
        rest = raw_path[len(prefix):] if raw_path.startswith(prefix) else "/" + \
            request.match_info.get("path", "")
        refusal = path_refusal(rest)
        if refusal is not None:
            self._finish("bad_request", 0)
            return error(400, f"not routed: {refusal}")
        too_many = disc.lookup_refusal(service, request)
        if too_many is not None:
            self._finish("limited", 0)
            return too_many
        records, source = await disc.route_candidates(service, query)
        self.counts[f"lookup_{source}"] += 1
        self._m_lookup[source].inc()
        if not records:
            self._finish("no_workers", 0)
            return error(404, f"no workers serve {service!r} right now "
                               f"(source: {source})")
        self.budget.deposit()
        body = await read_body(request.method, request.content, request.content_length,
                               request.body_exists)
        candidates = self._order(service, records)
        if not candidates:
            return self._held(service, records)
        return await self._attempts(_Call(
            request, disc, service, rest, raw_query, body,
            request_headers(request.headers, body.length), candidates))

    def _order(self, service: str, records: list[Any]) -> list[Any]:
        """The order to try ``records`` in: :mod:`agent.router.policy` (power of two
        choices on cost from this router's outstanding requests, the freshest of record
        and ``RMA-Load`` (:mod:`agent.router.freshload`) and a peak-EWMA of latency;
        hot, banned and ``Retry-After``-held workers handled there)."""
        loads = self.loads
        for rec in records:
            loads.record(rec)
        return self.policy.order(service, records, self.slots.inflight, loads.get)

    def _held(self, service: str, records: list[Any]) -> web.StreamResponse:
        """Every candidate asked for time (``Retry-After``): 503, the shortest wait."""
        self._finish("shed", 0)
        wait = max(1, math.ceil(self.policy.held_for(records)))
        return error(503, f"every worker of {service!r} asked to be left alone for now "
                          "(Retry-After); try again shortly", attempts=0,
                     extra={"Retry-After": str(wait), "RMA-Attempts": "0"})

    def route_costs(self, service: str, workers: Iterable[tuple[bytes, float]]
                    ) -> dict[bytes, dict[str, Any]]:
        """Per (worker, record capacity): the policy's cost parts for ``service`` now."""
        workers = list(workers)
        costs = self.policy.costs(service, workers, self.slots.inflight, self.loads.get)
        return {wid: parts for (wid, _cap), parts in zip(workers, costs, strict=True)}

    async def _attempts(self, call: _Call) -> web.StreamResponse:
        while call.n < len(call.candidates) and call.attempts < self.max_attempts:
            rec = call.candidates[call.n]
            call.n += 1
            if not self._room(call, rec):
                continue
            call.attempts += 1
            answer = await self._try(call, rec)
            if answer is not None:
                return answer
            if call.stop:
                break
        if not call.attempts and call.skipped:
            self._finish("shed", 0)
            return error(503, f"every worker of {call.service!r} this agent may use holds "
                               f"its share of the router's connections "
                               f"({self.slots.share} requests) or is not answering; try "
                               "again shortly", attempts=0,
                          extra={"Retry-After": "1", "RMA-Attempts": "0"})
        self._finish("failed" if call.attempts else "no_workers", call.attempts)
        return error(502, f"no worker could serve {call.service!r}: {call.last}",
                      attempts=call.attempts, extra={"RMA-Attempts": str(call.attempts)})

    def _room(self, call: _Call, rec: RoutedRecord) -> bool:
        """Whether ``rec``'s worker may take one more request; a skip is counted."""
        if self.slots.has_room(rec.worker_id, time.monotonic()):
            return True
        call.skipped += 1
        self.slots.shed += 1
        self.metrics.shed.inc()
        call.last = (f"worker {rec.worker_id.hex()[:12]} holds its share of this router's "
                     "connections or is not answering")
        return False

    async def _try(self, call: _Call, rec: RoutedRecord) -> web.StreamResponse | None:
        """One attempt at ``rec``: the answer to send, or None to go on (``call.stop``
        says whether another try is allowed)."""
        wid = rec.worker_id
        session = self.session(call.disc)
        proof = await call.disc.check_proof(session, rec)
        if not proof.ok:
            call.disc.proof_failed(rec, proof)
            call.last = f"worker {wid.hex()[:12]}: ownership proof {proof.kind}: {proof.reason}"
            call.stop = not self._may_retry(call, charged=False, reason="proof")
            return None
        if not self._room(call, rec):       # filled up while the proof was fetched
            call.attempts -= 1
            return None
        url = URL(f"{rec.endpoint.rstrip('/')}/{call.service}{call.path}"
                  + (f"?{call.query}" if call.query else ""), encoded=True)
        self.slots.acquire(wid, rec.capacity)
        try:
            t0 = time.perf_counter()
            token = self.slots.sent(wid, time.monotonic())
            got = False
            try:
                resp = await send(session, call.request.method, url, call.headers,
                                  call.body, connect_timeout_s=self.connect_timeout_s,
                                  upstream_timeout_s=self.upstream_timeout_s)
                got = True
            except asyncio.CancelledError:
                # the caller went away (aiohttp cancels its handler): nobody's failure;
                # aiohttp closed the connection, so the worker sees it go too
                self._finish("aborted", call.attempts)
                raise
            except AttemptFailed as exc:
                return self._failed(call, wid, exc)
            finally:
                self.slots.answered(wid, token, time.monotonic(), got)
            self.loads.header(wid, resp.headers.get(LOAD_HEADER), time.time())
            dt = time.perf_counter() - t0
            self.policy.answered(wid, call.service, resp.status,
                                 resp.headers.get("Retry-After"), dt)
            self.metrics.upstream.observe(dt)
            verdict = self._retry_answer(call, wid, resp)
            if verdict == "retry":
                resp.release()
                return None
            if not verdict:
                call.disc.worker_outcome(wid, resp.status < 500, dt * 1000.0)
            try:
                out, outcome = await relay(call.request, resp, wid, call.attempts)
            except asyncio.CancelledError:
                self._finish("aborted", call.attempts)
                raise
            self._finish(outcome, call.attempts)
            return out
        finally:
            self.slots.release(wid)

    def _failed(self, call: _Call, wid: bytes, exc: AttemptFailed) -> web.StreamResponse | None:
        if call.body.caller_failed:
            # the caller's upload broke off: nobody's failure but the caller's
            self._finish("aborted", call.attempts)
            return error(400, "the request body ended before it was complete",
                          attempts=call.attempts)
        call.disc.worker_outcome(wid, False)
        self.policy.failure(wid, call.service)
        call.last = f"worker {wid.hex()[:12]}: {exc}"
        retry_ok = call.body.replayable and (not exc.sent or call.idempotent)
        call.stop = not (retry_ok and self._may_retry(call, charged=exc.charged,
                                                      reason=exc.reason))
        return None

    def _retry_answer(self, call: _Call, wid: bytes, resp: aiohttp.ClientResponse) -> str:
        """"retry": try the next worker instead of relaying ``resp``; "judged": relay it,
        its outcome is already recorded; "": relay it. A worker's ``RMA-Not-Processed``
        is believed only on the statuses its gateway gives when it refused before passing
        the request on (``NOT_PROCESSED_STATUSES``)."""
        not_processed = resp.status in NOT_PROCESSED_STATUSES and \
            resp.headers.get("RMA-Not-Processed", "").strip() == "1"
        if not_processed:
            reason = "not_processed"
            self._mark_busy(wid)
        elif call.idempotent and resp.status in RETRY_STATUSES:
            reason = "status"
            call.disc.worker_outcome(wid, False)
        else:
            return ""
        # a refusal before any work is not charged (see agent.router.budget): the worker
        # is held for its Retry-After, so each call meets each full worker at most once
        if call.body.replayable and self._may_retry(call, charged=not not_processed,
                                                    reason=reason):
            call.last = f"worker {wid.hex()[:12]}: HTTP {resp.status}"
            return "retry"
        return "judged"

    def _may_retry(self, call: _Call, *, charged: bool, reason: str) -> bool:
        """Whether one more try is allowed; counts it when it is."""
        if call.n >= len(call.candidates) or call.attempts >= self.max_attempts:
            return False
        if charged and not self.budget.withdraw():
            self.metrics.budget_refused.inc()
            return False
        self.counts["retries"] += 1
        self.counts[f"retry_{reason}"] += 1
        self._m_retry[reason].inc()
        return True

    def _mark_busy(self, wid: bytes) -> None:
        self.policy.busy(wid)
