"""The discovery component: answers "which workers serve X, best first?" on any agent.

Lookup path (each answer says which one it came from in ``source``):

1. **cache** — a fresh per-service entry (:mod:`agent.discovery.cache`); re-ranked per call.
2. **dht** — ``agent.dht.find_providers(service)``, bounded in time.
   Concurrent lookups of one service share a single query (single-flight).
3. **coordinator** — when the DHT yields nothing usable, fails or times out: every
   ``discovery.coordinators`` URL is asked at once, and each record verified here
   (:mod:`agent.discovery.coordinator_client`).
4. **stale** — neither has a worker: the last-known-good copy saved on disk.

Steps 2-4 are :mod:`agent.discovery.sources`. If all of them fail outright (no answer
at all, as opposed to an empty answer) and an older cache entry exists, that entry
answers (source ``cache``): stale workers are still filtered out at ranking time, so
this can only return workers that are still in date.

Selection (:mod:`agent.discovery.select`), the rendered ranking
(:mod:`agent.discovery.ranking`), latency and failure tracking
(:mod:`agent.discovery.latency`) and the HTTP API (:mod:`agent.discovery.api`) are
separate modules; this one wires them to the agent, its config and its metrics. What
other components may use of it is :class:`agent.interfaces.DiscoveryService`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from agent.component import Component
from agent.concurrency import SingleFlight
from agent.config import SERVICE_RE, Config
from agent.dht.record import ALL_SERVICES
from agent.discovery.cache import CacheEntry, ServiceCache
from agent.discovery.coordinator_client import CoordinatorClient
from agent.discovery.crawl_limit import CrawlLimiter
from agent.discovery.endpoints import Allowance, GuardedConnector
from agent.discovery.gpu_classes import GpuScorer
from agent.discovery.lastgood import LastGood
from agent.discovery.latency import LatencyTracker, Prober
from agent.discovery.metrics import SOURCES, DiscoveryMetrics, counts_summary
from agent.discovery.ownership import OwnershipVerifier
from agent.discovery.ranking import LookupResult, RankedAnswer, RankMemo
from agent.discovery.select import DEFAULT_WEIGHTS, CandidateSet, Query, RecordLike, pick_first
from agent.discovery.sources import Sources

if TYPE_CHECKING:
    from aiohttp import web

    from agent.interfaces import AgentAPI

log = logging.getLogger("rma_agent.discovery")

RESERVOIR = 1024              # lookup durations kept for p50/p99 in stats()
# GET /api/services reads every service-index shard (32 crawls): concurrent calls share
# one read and its answer is reused this long, so a client polling it is no crawl loop
SERVICES_TTL_S = 2.0
_SERVICES_FLIGHT = "\0services"       # never a service name (single-flight key)


class DiscoveryComponent(Component):
    """Component "discovery": lookup, ranking, latency tracking, the /api/services API."""

    name = "discovery"

    def __init__(self, agent: AgentAPI, *, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(agent)
        self.rng = rng if rng is not None else random.Random()
        self.clock = clock
        self.weights = DEFAULT_WEIGHTS
        cfg = agent.config
        self.scorer = GpuScorer(cfg.discovery.gpu_scores)
        self.cache = ServiceCache(cfg.discovery.cache_ttl)
        self.lastgood = LastGood(cfg.agent.state_dir)
        self.flight = SingleFlight()
        self.tracker = LatencyTracker()
        self.ownership = OwnershipVerifier(registry=agent.registry)
        self.crawl_limit = CrawlLimiter(agent.registry)
        # hosts that caller-side sessions asked to connect to (endpoints.GuardedConnector)
        self.contacts: Counter[str] = Counter()
        self._session: aiohttp.ClientSession | None = None
        self._probe_session: aiohttp.ClientSession | None = None
        self.prober = Prober(self.tracker, lambda: self._probe_session, verifier=self.ownership,
                             on_failure=self._worker_failed, on_result=self._probe_result)
        self.metrics = DiscoveryMetrics(
            agent.registry, failing=lambda: len(self.tracker.current_bans(self.clock())),
            cached=lambda: len(self.cache))
        self._m_source = {s: self.metrics.lookups.labels(s) for s in SOURCES}
        self._m_seconds = self.metrics.seconds
        # plain counters for stats() (prometheus objects are awkward to read back)
        self.counts: Counter[str] = Counter()
        self._durations: deque[float] = deque(maxlen=RESERVOIR)
        self._ranks = RankMemo()
        self._services_memo: tuple[float, dict[str, Any]] | None = None
        self.coordinators = CoordinatorClient(
            lambda: list(self.agent.config.discovery.coordinators), self._ensure_session,
            self.clock, self.counts, agent.registry)
        self.sources = Sources(
            agent, clock=self.clock, scorer=lambda: self.scorer,
            max_age_s=lambda: self.max_age_s, counts=self.counts, metrics=self.metrics,
            ownership=self.ownership, coordinators=self.coordinators, lastgood=self.lastgood)

    @property
    def dht_timeout_s(self) -> float:
        """A DHT lookup slower than this falls back to coordinators (a test shortens it)."""
        return self.sources.dht_timeout_s

    @dht_timeout_s.setter
    def dht_timeout_s(self, value: float) -> None:
        self.sources.dht_timeout_s = value

    @property
    def coordinator_timeout_s(self) -> float:
        """Per coordinator request (a test shortens it)."""
        return self.coordinators.timeout_s

    @coordinator_timeout_s.setter
    def coordinator_timeout_s(self, value: float) -> None:
        self.coordinators.timeout_s = value

    # ------------------------------------------------------------------ config
    @property
    def max_age_s(self) -> float:
        """Staleness bound for records that carry no ``refresh`` (format 1 and foreign
        record-likes): two of this agent's republish intervals. Records that carry one
        are judged by it (``select.record_max_age``)."""
        return 2.0 * float(self.agent.config.dht.republish_interval)

    @property
    def max_results(self) -> int:
        return max(1, int(self.agent.config.discovery.max_results))

    # ------------------------------------------------------------------ lifecycle
    def add_routes(self, app: web.Application) -> None:
        from agent.discovery.api import add_routes
        add_routes(app, self)

    async def start(self) -> None:
        self._ensure_session()
        self._peer_session()
        # records the local DHT node stores (if it emits them) keep cached answers honest:
        # a withdrawal or a moved endpoint invalidates at once
        self.agent.subscribe("record", self.observe_record)

    def observe_record(self, record: RecordLike) -> None:
        """A record seen outside a lookup (e.g. stored by the local DHT node)."""
        try:
            n = self.cache.observe([record])
        except Exception as exc:  # never let a bus event break the emitter
            log.debug("discovery: observe_record failed: %r", exc)
            return
        self.counts["record_invalidations"] += n

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=32, limit_per_host=4),
                headers={"User-Agent": "rma-agent-discovery"})
        return self._session

    def _peer_session(self) -> aiohttp.ClientSession:
        """The session for workers' endpoints (probes): every connection passes the
        endpoint rule (:class:`GuardedConnector`). Coordinators, which the operator
        configured, use ``_session``."""
        if self._probe_session is None or self._probe_session.closed:
            self._probe_session = aiohttp.ClientSession(
                connector=GuardedConnector(lambda: _allow_http(self.agent.config),
                                           self.contacts, limit=32, limit_per_host=4),
                headers={"User-Agent": "rma-agent-discovery"})
        return self._probe_session

    async def stop(self) -> None:
        await self.prober.close()
        await self.ownership.close()
        await self.flight.cancel_all()
        for session in (self._session, self._probe_session):
            if session is not None:
                await session.close()
        self._session = self._probe_session = None

    async def reload(self, old: Config, new: Config) -> None:
        self.cache.set_ttl(new.discovery.cache_ttl)
        if (dict(old.discovery.gpu_scores) != dict(new.discovery.gpu_scores)
                or old.dht.republish_interval != new.dht.republish_interval
                or _allow_http(old) != _allow_http(new)):
            # GPU scores and staleness are baked into cached candidate sets
            self.scorer = GpuScorer(new.discovery.gpu_scores)
            self.cache.clear()

    # ------------------------------------------------------------------ lookups
    async def lookup(self, service: str, query: Query | None = None, *,
                     fresh: bool = False) -> LookupResult:
        """Ranked workers for ``service`` (name already validated by the caller).

        ``fresh`` skips the cache (HTTP ``Cache-Control: no-cache``); the query itself
        is still shared with concurrent ones and its answer refreshes the cache.
        """
        t0 = time.perf_counter()
        q = query or Query(limit=self.max_results)
        if q.limit > self.max_results:
            q = Query(self.max_results, q.region, q.gpu, q.min_gpu_memory_gb, q.caller_region)
        entry, source, answer, order = await self._draw(service, q, fresh, as_saved=True)
        self._count_lookup(source, t0)
        now = self.clock()
        return LookupResult(service, source, [answer.views[i] for i in order],
                            len(entry.candidates), [answer.fragments[i] for i in order],
                            age_s=max(0.0, now - entry.fetched_at) if source == "stale"
                            else None)

    async def route_candidates(self, service: str,
                               query: Query) -> tuple[list[RecordLike], str]:
        """The router's view of a lookup: the ranked *records* (best first, after the
        top-3 draw, at most ``query.limit``) and the answer's source. Same cache, DHT and
        coordinator path, ranking and metrics as :meth:`lookup`; records rather than
        JSON views because the router needs each worker's public key."""
        t0 = time.perf_counter()
        _entry, source, answer, order = await self._draw(service, query, False, as_saved=False)
        cs = answer.cs
        records = [cs.records[cs.index[answer.ids[i]]] for i in order]
        self._count_lookup(source, t0)
        return records, source

    async def _draw(self, service: str, q: Query, fresh: bool, *, as_saved: bool
                    ) -> tuple[CacheEntry, str, RankedAnswer, list[int]]:
        """The entry, its source, its ranking for ``q`` and the order of this answer (the
        top-3 draw on top of the memoised ranking, cut to ``q.limit``). ``as_saved``: a
        last-known-good copy from disk is ranked as of when it was saved (a lookup shows
        it, saying how old it is); the router ranks everything as of now, so it never
        sends a request to a worker whose record has expired since."""
        if not q.caller_region and self.agent.config.agent.region:
            q = Query(q.limit, q.region, q.gpu, q.min_gpu_memory_gb,
                      self.agent.config.agent.region)
        entry, source = await self.answer(service, fresh)
        rank_at = entry.fetched_at if as_saved and source == "stale" else self.clock()
        answer = self._ranks.ranked(entry.candidates, q, rank_at, self.tracker, self.weights)
        order = pick_first(list(range(len(answer.views))), self.rng)[:q.limit]
        if answer.probe:
            self.prober.consider(answer.probe)
        return entry, source, answer, order

    def _count_lookup(self, source: str, t0: float) -> None:
        dt = time.perf_counter() - t0
        self._m_source[source].inc()
        self._m_seconds.observe(dt)
        self.counts["lookups"] += 1
        self.counts[f"source_{source}"] += 1
        self._durations.append(dt)

    async def answer(self, service: str, fresh: bool = False, *,
                     paced: bool = False) -> tuple[CacheEntry, str]:
        """A cache entry for ``service`` (fresh, or fetched now) and the answer's source.
        ``paced``: a periodic refresh (watches), whose coordinator fallback may reuse an
        answer a few seconds old (:mod:`agent.discovery.coordinator_client`)."""
        entry = None if fresh else self.cache.get(service, self.clock())
        if entry is not None:
            self.metrics.cache.labels("hit").inc()
            self.counts["cache_hits"] += 1
            return entry, "cache"
        self.metrics.cache.labels("miss").inc()
        self.counts["cache_misses"] += 1
        if service in self.flight:
            self.counts["single_flight_joined"] += 1
        return await self.flight.run(service, lambda: self._refresh(service, paced))

    async def _refresh(self, service: str, paced: bool = False) -> tuple[CacheEntry, str]:
        self.cache.begin(service)       # records stored while we ask are checked at put()
        try:
            fetched = await self.sources.fetch(service, paced)
        except BaseException:
            self.cache.end(service)
            raise
        old = self.cache.get_any(service)
        if not fetched.answered and old is not None and len(old.candidates):
            self.cache.end(service)
            self.counts["stale_answers"] += 1
            return old, "cache"
        now = self.clock()
        if not len(fetched.candidates) and (old is None or not len(old.candidates)):
            disk = self.sources.from_disk(service)
            if disk is not None:
                return disk, "stale"
        elif len(fetched.candidates) and fetched.records and service != ALL_SERVICES:
            self.lastgood.save(service, fetched.records, now)
        if old is not None:
            self._forgive_moved(old.candidates, fetched.candidates)
        entry = self.cache.put(service, fetched.candidates, fetched.source, now)
        if fetched.records:
            self.cache.observe(fetched.records, except_service=service)
        return entry, fetched.source

    def _forgive_moved(self, old: CandidateSet, new: CandidateSet) -> None:
        """A failing worker that now announces a different endpoint gets a fresh chance
        (its tunnel URL changed: the failure was about the old address)."""
        bans = self.tracker.current_bans(self.clock())
        for wid in list(bans):
            i, j = old.index.get(wid), new.index.get(wid)
            if i is not None and j is not None and \
                    old.records[i].endpoint != new.records[j].endpoint:
                self.tracker.forgive(wid)

    # ------------------------------------------------------------------ service list
    async def services(self) -> dict[str, Any]:
        """Known services with live worker counts (``_services``), read at most once per
        ``SERVICES_TTL_S`` however many callers ask."""
        hit = self._services_memo
        if hit is not None and 0.0 <= self.clock() - hit[0] < SERVICES_TTL_S:
            return hit[1]
        out = await self.flight.run(_SERVICES_FLIGHT, self._services)
        self._services_memo = (self.clock(), out)
        return out

    async def _services(self) -> dict[str, Any]:
        """Known services with live worker counts.

        From the DHT's sharded service index when the node offers it (``service_counts``:
        every service, exact counts, a few small lookups whatever the number of workers);
        otherwise from the "*" answer (a lower bound on a large network). A service
        looked up recently counts at least what its own (fresh) cached answer holds."""
        now = self.clock()
        counts: dict[str, int] = {}
        source = ""
        dht = self.agent.dht
        if dht is not None:
            try:
                got = await asyncio.wait_for(dht.service_counts(), self.dht_timeout_s)
            except TimeoutError:
                got = {}
            counts = {s: int(n) for s, n in got.items() if SERVICE_RE.fullmatch(s) and n > 0}
            source = "dht" if counts else ""
        if not source:
            entry, source = await self.answer(ALL_SERVICES)
            cs = entry.candidates
            for i in _live_indices(cs, now, self.tracker):
                for svc in cs.records[i].services:
                    if SERVICE_RE.fullmatch(svc):
                        counts[svc] = counts.get(svc, 0) + 1
        for svc, e in self.cache.items():
            if svc == ALL_SERVICES or not e.fresh(now):
                continue
            live = len(_live_indices(e.candidates, now, self.tracker))
            if live:          # a looked-up name nobody serves (a typo) is no service
                counts[svc] = max(counts.get(svc, 0), live)
        return {"source": source,
                "services": [{"name": s, "workers": counts[s]} for s in sorted(counts)]}

    # ------------------------------------------------------------------ for other components
    def cached(self, service: str) -> CacheEntry | None:
        """The cached entry for ``service`` whatever its age (the dashboard shows it)."""
        return self.cache.get_any(service)

    def forget_answers(self) -> None:
        """Drop every cached answer: the admission policy changed, and they may name a
        worker no longer admitted."""
        self.cache.clear()

    def forget_worker(self, worker_id: bytes) -> int:
        """Drop cached answers naming ``worker_id`` (its endpoint failed a proof)."""
        return self.cache.invalidate_worker(worker_id)

    def allow_lookup(self, service: str, fresh: bool) -> bool:
        """Whether an HTTP lookup of ``service`` may go ahead: always when it is answered
        from the cache or joins a query in flight, else when the crawl budget
        (:class:`~agent.discovery.crawl_limit.CrawlLimiter`) has a token left."""
        if not fresh and self.cache.get(service, self.clock()) is not None:
            return True
        if service in self.flight:
            return True
        return self.crawl_limit.take()

    def lookup_durations(self) -> list[float]:
        """The last ``RESERVOIR`` lookup durations (s), oldest first."""
        return list(self._durations)

    # ------------------------------------------------------------------ reports
    def report(self, service: str, worker_id: bytes, ok: bool,
               latency_ms: float | None) -> dict[str, Any]:
        """A caller's outcome with a worker: feeds the EWMA or demotes it at once."""
        now = self.clock()
        if ok:
            st = self.tracker.record_success(worker_id, latency_ms)
        else:
            if self.tracker.record_failure(worker_id, now):
                self._worker_failed(worker_id)
            st = self.tracker.get(worker_id)
            assert st is not None
        self.metrics.reports.labels("ok" if ok else "failed").inc()
        self.counts["reports_ok" if ok else "reports_failed"] += 1
        return {
            "service": service,
            "worker_id": worker_id.hex(),
            "healthy": st.banned_until <= now,
            "latency_ms": round(st.ewma_ms, 3) if st.ewma_ms >= 0 else None,
            "failures": st.failures,
            "retry_in_s": round(max(0.0, st.banned_until - now), 1),
        }

    def _worker_failed(self, worker_id: bytes) -> None:
        """A cached worker failed: those entries are refreshed at the next lookup (the
        DHT may hold a newer record, e.g. a new tunnel URL)."""
        n = self.cache.invalidate_worker(worker_id)
        self.counts["failure_invalidations"] += n

    def _probe_result(self, ok: bool) -> None:
        self.metrics.probes.labels("ok" if ok else "failed").inc()

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        return {"discovery": {
            **counts_summary(self.counts, self._durations),
            "cached_services": len(self.cache),
            "probes": dict(self.prober.counts),
            **self.tracker.stats(self.clock()),
        }}


def _allow_http(cfg: Config) -> Allowance:
    return Allowance.from_config(cfg.discovery)


def _live_indices(cs: CandidateSet, now: float, tracker: LatencyTracker) -> list[int]:
    bans = tracker.current_bans(now)
    return [i for i in range(len(cs)) if cs.is_fresh(i, now) and cs.ids[i] not in bans]

