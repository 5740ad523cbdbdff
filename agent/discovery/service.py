"""The discovery component: answers "which workers serve X, best first?" on any agent.

Lookup path (each answer says which one it came from in ``source``):

1. **cache** — a fresh per-service entry (:mod:`agent.discovery.cache`); re-ranked per call.
2. **dht** — ``agent.get("dht").find_providers(service)``, bounded by ``DHT_TIMEOUT_S``.
   Concurrent lookups of one service share a single query (single-flight).
3. **coordinator** — when the DHT yields nothing usable, fails or times out: every
   ``discovery.coordinators`` URL is asked ``GET {url}/api/registry/{service}`` at once
   (bounded time and size); each record is decoded and verified *here* (signature, id,
   times) — a coordinator is a convenience, not a trusted party.

If all of them fail outright (no answer at all, as opposed to an empty answer) and an
older cache entry exists, that entry answers (source ``cache``): stale workers are still
filtered out at ranking time, so this can only return workers that are still in date.

Selection (:mod:`agent.discovery.select`), latency and failure tracking
(:mod:`agent.discovery.latency`) and the HTTP API (:mod:`agent.discovery.api`) are
separate modules; this one wires them to the agent, its config and its metrics.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import random
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram

from agent.admission.component import admitted
from agent.component import Component
from agent.config import SERVICE_RE, Config
from agent.dht.record import ALL_SERVICES, RecordError, decode_verified
from agent.discovery.cache import CacheEntry, ServiceCache, SingleFlight
from agent.discovery.endpoints import GuardedConnector, endpoint_refusal
from agent.discovery.gpu_classes import GpuScorer
from agent.discovery.guard import CrawlGuard
from agent.discovery.lastgood import LastGood
from agent.discovery.latency import LatencyTracker, Prober
from agent.discovery.ownership import OwnershipVerifier
from agent.discovery.select import (
    DEFAULT_WEIGHTS,
    TOP_RANDOM,
    CandidateSet,
    Query,
    RecordLike,
    pick_first,
)
from agent.ratelimit import RateLimiter

if TYPE_CHECKING:
    from aiohttp import web

    from agent.lifecycle import Agent

log = logging.getLogger("rma_agent.discovery")
_LOG_LIMIT = RateLimiter(rate=0.2, burst=3)   # failures can repeat on every cache miss

DHT_TIMEOUT_S = 2.0           # a DHT lookup slower than this falls back to coordinators
COORDINATOR_TIMEOUT_S = 2.0   # per coordinator request (all asked in parallel)
MAX_COORDINATORS = 8          # asked at once; more are ignored (config is operator-set)
MAX_REGISTRY_BYTES = 2 * 1024 * 1024
MAX_REGISTRY_RECORDS = 5000
REGISTRY_LIMIT = 1000         # records asked of a coordinator (its own cap is 1000)
RESERVOIR = 1024              # lookup durations kept for p50/p99 in stats()
LOOKUP_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                  0.5, 1.0, 2.5, 5.0)
SOURCES = ("cache", "dht", "coordinator", "stale")
# GET /api/services reads every service-index shard (32 crawls): concurrent calls share
# one read and its answer is reused this long, so a client polling it is no crawl loop
SERVICES_TTL_S = 2.0
_SERVICES_FLIGHT = "\0services"       # never a service name (single-flight key)
COORDINATOR_REUSE_S = 5.0    # a coordinator fallback's answer is reused this long
COORDINATOR_REUSE_MAX = 1024
RANK_MEMO_S = 0.1             # a rendered ranking is reused this long at most (see lookup)
RANK_MEMO_MAX = 256           # (service, query) rankings remembered, LRU


@dataclass
class LookupResult:
    """One answer: the ranked workers (API JSON objects) and where they came from."""

    service: str
    source: str
    workers: list[dict[str, Any]]
    candidates: int = 0       # usable records before filters, limit and health
    fragments: list[bytes] | None = None   # ``workers`` already JSON-encoded, same order

    age_s: float | None = None   # source "stale": how old the last-known-good copy is

    def to_json(self) -> dict[str, Any]:
        out = {"service": self.service, "source": self.source, "workers": self.workers}
        if self.age_s is not None:
            out["age_s"] = round(self.age_s, 3)
        return out

    def body(self) -> bytes:
        """``to_json()`` serialised (joins the pre-encoded workers when available)."""
        if self.fragments is None or self.age_s is not None:
            return _dumps(self.to_json()).encode()
        return b"".join((b'{"service": ', _dumps(self.service).encode(), b', "source": ',
                         _dumps(self.source).encode(), b', "workers": [',
                         b", ".join(self.fragments), b"]}"))


@dataclass
class _Ranked:
    """A rendered deterministic ranking (see ``DiscoveryComponent._ranked_answer``)."""

    cs: CandidateSet                  # what it was computed from (entries get replaced)
    since: float
    until: float
    version: int
    views: list[dict[str, Any]]
    ids: list[bytes]                  # worker id of each view
    fragments: list[bytes]            # each view as JSON, so answers are joined, not dumped
    probe: list[tuple[bytes, str, bytes]]


@dataclass
class _Fetched:
    candidates: CandidateSet
    source: str
    answered: bool            # False: no source answered at all (all failed/timed out)
    records: list[RecordLike] = field(default_factory=list)


class _Metrics:
    """Prometheus objects on the agent's own registry (several agents per test process)."""

    def __init__(self, registry: Any, comp: DiscoveryComponent) -> None:
        kw: dict[str, Any] = {"registry": registry}
        self.lookups = PromCounter("rma_agent_lookups", "Service lookups answered, by source",
                                   ["source"], **kw)
        self.seconds = Histogram("rma_agent_lookup_seconds",
                                 "Time to answer a service lookup (including ranking)",
                                 buckets=LOOKUP_BUCKETS, **kw)
        self.cache = PromCounter("rma_agent_lookup_cache", "Lookup cache hits and misses",
                                 ["result"], **kw)
        self.dht = PromCounter("rma_agent_lookup_dht",
                               "DHT queries made by discovery, by outcome", ["result"], **kw)
        self.fallbacks = PromCounter("rma_agent_lookup_fallbacks",
                                     "Lookups that fell back to coordinators' registries", **kw)
        self.coordinator = PromCounter("rma_agent_lookup_coordinator",
                                       "Coordinator registry requests, by outcome",
                                       ["result"], **kw)
        self.bad_records = PromCounter("rma_agent_lookup_bad_records",
                                       "Records from coordinators that failed verification", **kw)
        self.reports = PromCounter("rma_agent_worker_reports",
                                   "Caller reports about workers, by outcome", ["outcome"], **kw)
        self.probes = PromCounter("rma_agent_worker_probes", "Health probes, by outcome",
                                  ["outcome"], **kw)
        self.failing = Gauge("rma_agent_failing_workers",
                             "Workers currently demoted after a failure", **kw)
        self.failing.set_function(lambda: len(comp.tracker.current_bans(comp.clock())))
        self.cached = Gauge("rma_agent_lookup_cached_services", "Services in the lookup cache",
                            **kw)
        self.cached.set_function(lambda: len(comp.cache))
        for s in SOURCES:
            self.lookups.labels(s)
        for r in ("hit", "miss"):
            self.cache.labels(r)
        for r in ("hit", "miss", "timeout", "error"):
            self.dht.labels(r)


class DiscoveryComponent(Component):
    """Component "discovery": lookup, ranking, latency tracking, the /api/services API."""

    name = "discovery"

    def __init__(self, agent: Agent, *, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(agent)
        self.rng = rng if rng is not None else random.Random()
        self.clock = clock
        self.weights = DEFAULT_WEIGHTS
        self.dht_timeout_s = DHT_TIMEOUT_S
        self.coordinator_timeout_s = COORDINATOR_TIMEOUT_S
        cfg = agent.config
        self.scorer = GpuScorer(cfg.discovery.gpu_scores)
        self.cache = ServiceCache(cfg.discovery.cache_ttl)
        self.lastgood = LastGood(getattr(cfg.agent, "state_dir", None))
        self.flight = SingleFlight()
        self.tracker = LatencyTracker()
        self.ownership = OwnershipVerifier(registry=agent.registry)
        self.guard = CrawlGuard(agent.registry)
        # hosts that caller-side sessions asked to connect to (endpoints.GuardedConnector)
        self.contacts: Counter[str] = Counter()
        self._session: aiohttp.ClientSession | None = None
        self._probe_session: aiohttp.ClientSession | None = None
        self.prober = Prober(self.tracker, lambda: self._probe_session, verifier=self.ownership,
                             on_failure=self._worker_failed, on_result=self._probe_result)
        self.metrics = _Metrics(agent.registry, self)
        self._m_source = {s: self.metrics.lookups.labels(s) for s in SOURCES}
        self._m_seconds = self.metrics.seconds
        # plain counters for stats() (prometheus objects are awkward to read back)
        self.counts: Counter[str] = Counter()
        self._durations: deque[float] = deque(maxlen=RESERVOIR)
        self._memo: OrderedDict[tuple[str, Query], _Ranked] = OrderedDict()
        self._services_memo: tuple[float, dict[str, Any]] | None = None
        # service -> (asked at, records, answered): coordinators' last answers (reused)
        self._coord_answers: OrderedDict[str, tuple[float, list[RecordLike], bool]] = \
            OrderedDict()

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
        if not q.caller_region and self.agent.config.agent.region:
            q = Query(q.limit, q.region, q.gpu, q.min_gpu_memory_gb,
                      self.agent.config.agent.region)
        if q.limit > self.max_results:
            q = Query(self.max_results, q.region, q.gpu, q.min_gpu_memory_gb, q.caller_region)
        entry, source = await self._entry(service, fresh)
        now = self.clock()
        # a last-known-good copy from disk is ranked as of when it was saved (its records
        # may have expired since); the answer says how old it is
        rank_at = entry.fetched_at if source == "stale" else now
        answer = self._ranked_answer(entry.candidates, q, rank_at)
        # the top-3 draw happens on every call, on top of the (memoised) ranking
        order = pick_first(list(range(len(answer.views))), self.rng)[:q.limit]
        if answer.probe:
            self.prober.consider(answer.probe)
        dt = time.perf_counter() - t0
        self._m_source[source].inc()
        self._m_seconds.observe(dt)
        self.counts["lookups"] += 1
        self.counts[f"source_{source}"] += 1
        self._durations.append(dt)
        return LookupResult(service, source, [answer.views[i] for i in order],
                            len(entry.candidates), [answer.fragments[i] for i in order],
                            age_s=max(0.0, now - entry.fetched_at) if source == "stale"
                            else None)

    async def route_candidates(self, service: str, query: Query) -> tuple[list[Any], str]:
        """The router's view of a lookup: the ranked *records* (best first, after the
        top-3 draw, at most ``query.limit``) and the answer's source. Same cache, DHT and
        coordinator path, ranking and metrics as :meth:`lookup`; records rather than
        JSON views because the router needs each worker's public key."""
        t0 = time.perf_counter()
        q = query
        if not q.caller_region and self.agent.config.agent.region:
            q = Query(q.limit, q.region, q.gpu, q.min_gpu_memory_gb,
                      self.agent.config.agent.region)
        entry, source = await self._entry(service)
        answer = self._ranked_answer(entry.candidates, q, self.clock())
        cs = answer.cs
        order = pick_first(list(range(len(answer.views))), self.rng)[:q.limit]
        if answer.probe:
            self.prober.consider(answer.probe)
        records = [cs.records[cs.index[answer.ids[i]]] for i in order]
        dt = time.perf_counter() - t0
        self._m_source[source].inc()
        self._m_seconds.observe(dt)
        self.counts["lookups"] += 1
        self.counts[f"source_{source}"] += 1
        self._durations.append(dt)
        return records, source

    def _ranked_answer(self, cs: CandidateSet, q: Query, now: float) -> _Ranked:
        """The deterministic ranking of ``cs`` for ``q``, rendered; reused for up to
        ``RANK_MEMO_S`` while nothing that affects it changed.

        Why: at thousands of lookups a second on one service, re-scoring and re-rendering
        50 workers per call would be most of the cost, yet the result only changes when
        the latency tracker does (reports, probes, bans — its version), when a record
        reaches expiry or staleness (``fresh_until``), or as ages drift (hence the short
        window: ages and scores shown are at most ``RANK_MEMO_S`` old).
        """
        tracker = self.tracker
        tracker.current_bans(now)            # ends finished back-offs (bumps the version)
        key = (cs.service, q)
        memo = self._memo.get(key)
        if memo is not None and memo.cs is cs and memo.version == tracker.version \
                and memo.since <= now < memo.until:
            return memo
        pairs = cs.ranked(now, q, tracker, self.weights)
        views = [cs.view(i, now, score) for i, score in pairs]
        memo = _Ranked(
            cs=cs, since=now, until=min(now + RANK_MEMO_S, cs.fresh_until),
            version=tracker.version, views=views, ids=[cs.ids[i] for i, _ in pairs],
            fragments=[_dumps(v).encode() for v in views],
            probe=[(cs.ids[i], cs.records[i].endpoint, cs.records[i].public_key)
                   for i, _ in pairs[:TOP_RANDOM]])
        self._memo[key] = memo
        self._memo.move_to_end(key)
        while len(self._memo) > RANK_MEMO_MAX:
            self._memo.popitem(last=False)
        return memo

    async def _entry(self, service: str, fresh: bool = False, *,
                     paced: bool = False) -> tuple[CacheEntry, str]:
        """A cache entry for ``service`` (fresh, or fetched now) and the answer's source.
        ``paced``: a periodic refresh (watches), whose coordinator fallback may reuse an
        answer up to ``COORDINATOR_REUSE_S`` old (see ``_from_coordinators``)."""
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
            fetched = await self._fetch(service, paced)
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
            disk = self._from_disk(service)
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

    def _from_disk(self, service: str) -> CacheEntry | None:
        """The last-known-good copy of ``service`` (``lastgood``), as an entry that is
        never cached (each lookup tries the DHT and coordinators again first)."""
        got = self.lastgood.load(service)
        if got is None:
            return None
        records, saved_at = got
        # what was admitted and contactable when saved may not be now (a revocation, a
        # reload of network.admission_keys or discovery.allow_http_hosts)
        records = self._contactable(admitted(self.agent, records))
        cs = CandidateSet(service, records, self.scorer, saved_at, self.max_age_s)
        if not len(cs):
            return None
        self.counts["disk_answers"] += 1
        return CacheEntry(candidates=cs, source="stale", fetched_at=saved_at,
                          valid_until=saved_at)

    def _forgive_moved(self, old: CandidateSet, new: CandidateSet) -> None:
        """A failing worker that now announces a different endpoint gets a fresh chance
        (its tunnel URL changed: the failure was about the old address)."""
        bans = self.tracker.current_bans(self.clock())
        for wid in list(bans):
            i, j = old.index.get(wid), new.index.get(wid)
            if i is not None and j is not None and \
                    old.records[i].endpoint != new.records[j].endpoint:
                self.tracker.forgive(wid)

    async def _fetch(self, service: str, paced: bool = False) -> _Fetched:
        """DHT first; coordinators when the DHT yields nothing usable."""
        records, dht_state = await self._from_dht(service)
        records = self._contactable(admitted(self.agent, records))
        now = self.clock()
        cs = CandidateSet(service, records, self.scorer, now, self.max_age_s)
        answered = dht_state in ("hit", "miss")
        if len(cs) or not self.agent.config.discovery.coordinators:
            return _Fetched(cs, "dht", answered, records)
        self.metrics.fallbacks.inc()
        self.counts["fallbacks"] += 1
        crecords, coord_answered = await self._from_coordinators(service, paced)
        crecords = self._contactable(admitted(self.agent, crecords))
        now = self.clock()
        ccs = CandidateSet(service, crecords, self.scorer, now, self.max_age_s)
        if len(ccs) or not answered:
            return _Fetched(ccs, "coordinator", coord_answered or answered, crecords)
        return _Fetched(cs, "dht", True, records)

    def _contactable(self, records: list[RecordLike]) -> list[RecordLike]:
        """Records whose endpoint callers may contact (see
        :mod:`agent.discovery.endpoints`); the others are never offered."""
        allow = _allow_http(self.agent.config)
        kept = [r for r in records if endpoint_refusal(r.endpoint, allow) is None]
        if len(kept) != len(records):
            self.ownership.count_refused(len(records) - len(kept))
        return kept

    async def _from_dht(self, service: str) -> tuple[list[RecordLike], str]:
        dht = self.agent.get("dht")
        if dht is None or not hasattr(dht, "find_providers"):
            return [], "absent"
        self.counts["dht_queries"] += 1
        try:
            records = list(await asyncio.wait_for(dht.find_providers(service),
                                                  self.dht_timeout_s))
        except TimeoutError:
            state = "timeout"
            records = []
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _LOG_LIMIT.log(log, logging.WARNING, "dht-error",
                           "discovery: DHT lookup of %r failed: %s", service, exc)
            state = "error"
            records = []
        else:
            state = "hit" if records else "miss"
        self.metrics.dht.labels(state).inc()
        self.counts[f"dht_{state}"] += 1
        return records, state

    async def _from_coordinators(self, service: str,
                                 paced: bool = False) -> tuple[list[RecordLike], bool]:
        """Records from every configured coordinator, verified; (records, any answered).

        ``paced`` (a watch's refresh): reuse the last answer when it is less than
        ``COORDINATOR_REUSE_S`` old. A watch (or the dashboard) refreshes its services
        from the DHT every second, and for a service the DHT has no workers of each
        refresh fell back to every coordinator over HTTP. The reused answer is signed
        records, re-judged (expiry, staleness) by the caller."""
        now = self.clock()
        last = self._coord_answers.get(service) if paced else None
        if last is not None and 0.0 <= now - last[0] < COORDINATOR_REUSE_S:
            self.counts["coordinator_reused"] += 1
            return list(last[1]), last[2]
        records, answered = await self._ask_coordinators(service)
        self._coord_answers[service] = (now, records, answered)
        self._coord_answers.move_to_end(service)
        while len(self._coord_answers) > COORDINATOR_REUSE_MAX:
            self._coord_answers.popitem(last=False)
        return records, answered

    async def _ask_coordinators(self, service: str) -> tuple[list[RecordLike], bool]:
        urls = list(self.agent.config.discovery.coordinators)[:MAX_COORDINATORS]
        if not urls:
            return [], False
        session = self._ensure_session()
        results = await asyncio.gather(*(self._ask_coordinator(session, u, service)
                                         for u in urls))
        records: list[RecordLike] = []
        answered = False
        for recs in results:
            if recs is not None:
                answered = True
                records.extend(recs)
        return records, answered

    async def _ask_coordinator(self, session: aiohttp.ClientSession, base: str,
                               service: str) -> list[RecordLike] | None:
        url = f"{base.rstrip('/')}/api/registry/{service}?limit={REGISTRY_LIMIT}"
        try:
            async with session.get(
                    url, timeout=aiohttp.ClientTimeout(total=self.coordinator_timeout_s),
                    allow_redirects=False) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                if (resp.content_length or 0) > MAX_REGISTRY_BYTES:
                    raise ValueError("answer too large")
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > MAX_REGISTRY_BYTES:
                        raise ValueError("answer too large")
                    chunks.append(chunk)
                data = _json_loads(b"".join(chunks))
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            self.metrics.coordinator.labels("error").inc()
            self.counts["coordinator_errors"] += 1
            _LOG_LIMIT.log(log, logging.WARNING, f"coord:{base}",
                           "discovery: coordinator %s did not answer for %r: %s", base,
                           service, str(exc) or type(exc).__name__)
            return None
        raw = data.get("records") if isinstance(data, dict) else None
        if not isinstance(raw, list):
            self.metrics.coordinator.labels("error").inc()
            self.counts["coordinator_errors"] += 1
            return None
        now = self.clock()
        out: list[RecordLike] = []
        bad = 0
        for item in raw[:MAX_REGISTRY_RECORDS]:
            try:
                if not isinstance(item, str):
                    raise RecordError("record is not a base64 string")
                rec = decode_verified(base64.b64decode(item, validate=True), now)
            except (RecordError, binascii.Error, ValueError):
                bad += 1
                continue
            out.append(rec)
        if bad:
            self.metrics.bad_records.inc(bad)
            self.counts["bad_records"] += bad
        result = "hit" if out else "miss"
        self.metrics.coordinator.labels(result).inc()
        self.counts[f"coordinator_{result}"] += 1
        return out

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
        dht = self.agent.get("dht")
        if dht is not None and hasattr(dht, "service_counts"):
            try:
                got = await asyncio.wait_for(dht.service_counts(), self.dht_timeout_s)
            except TimeoutError:
                got = {}
            counts = {s: int(n) for s, n in got.items() if SERVICE_RE.fullmatch(s) and n > 0}
            source = "dht" if counts else ""
        if not source:
            entry, source = await self._entry(ALL_SERVICES)
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
        c = self.counts
        hits, misses = c["cache_hits"], c["cache_misses"]
        dht_q = c["dht_queries"]
        xs = sorted(self._durations)

        def pct(q: float) -> float | None:
            return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 3) if xs else None

        return {"discovery": {
            "lookups": c["lookups"],
            "by_source": {s: c[f"source_{s}"] for s in SOURCES},
            "cache_hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
            "dht_queries": dht_q,
            "dht_hit_rate": round(c["dht_hit"] / dht_q, 4) if dht_q else None,
            "dht_timeouts": c["dht_timeout"],
            "dht_errors": c["dht_error"],
            "fallbacks": c["fallbacks"],
            "fallback_rate": round(c["fallbacks"] / misses, 4) if misses else None,
            "stale_answers": c["stale_answers"],
            "single_flight_joined": c["single_flight_joined"],
            "lookup_p50_ms": pct(0.50),
            "lookup_p99_ms": pct(0.99),
            "cached_services": len(self.cache),
            "reports": {"ok": c["reports_ok"], "failed": c["reports_failed"]},
            "probes": dict(self.prober.counts),
            "bad_records": c["bad_records"],
            **self.tracker.stats(self.clock()),
        }}


def _allow_http(cfg: Config) -> tuple[str, ...]:
    return tuple(cfg.discovery.allow_http_hosts)


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": ")).encode


def _live_indices(cs: CandidateSet, now: float, tracker: LatencyTracker) -> list[int]:
    bans = tracker.current_bans(now)
    return [i for i in range(len(cs)) if cs.is_fresh(i, now) and cs.ids[i] not in bans]


def _json_loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
