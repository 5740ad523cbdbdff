"""Where a service's records come from when the cache has no fresh answer.

In order: the **DHT** (``agent.dht.find_providers``, bounded by ``DHT_TIMEOUT_S``);
the **coordinators** when the DHT yields nothing usable, fails or times out
(:mod:`agent.discovery.coordinator_client`); and, when neither has any worker, the
**last-known-good** copy on disk (:mod:`agent.discovery.lastgood`, answered with source
"stale"). Every record, whatever its source, passes the admission policy of a closed
network and the endpoint rule (:mod:`agent.discovery.endpoints`) before it becomes a
candidate: what was admitted and contactable when saved may not be now.

The cache, the single-flight and the rankings are the discovery component's business
(:mod:`agent.discovery.service`); this module only fetches and filters.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.admission.component import admitted
from agent.discovery.cache import CacheEntry
from agent.discovery.endpoints import Allowance, endpoint_refusal
from agent.discovery.select import CandidateSet, RecordLike
from agent.ratelimit import RateLimiter

if TYPE_CHECKING:
    from agent.discovery.coordinator_client import CoordinatorClient
    from agent.discovery.gpu_classes import GpuScorer
    from agent.discovery.lastgood import LastGood
    from agent.discovery.metrics import DiscoveryMetrics
    from agent.discovery.ownership import OwnershipVerifier
    from agent.interfaces import AgentAPI

log = logging.getLogger("rma_agent.discovery")
_LOG_LIMIT = RateLimiter(rate=0.2, burst=3)   # failures can repeat on every cache miss

DHT_TIMEOUT_S = 2.0           # a DHT lookup slower than this falls back to coordinators


@dataclass
class Fetched:
    """What the sources answered for one service."""

    candidates: CandidateSet
    source: str               # "dht" | "coordinator"
    answered: bool            # False: no source answered at all (all failed/timed out)
    records: list[RecordLike] = field(default_factory=list)


class Sources:
    """Fetches a service's candidates from the DHT, then the coordinators, then disk.

    ``scorer`` and ``max_age_s`` are read at each fetch: a reload replaces them.
    ``counts`` and ``metrics`` are the discovery component's (its stats read them)."""

    def __init__(self, agent: AgentAPI, *, clock: Callable[[], float],
                 scorer: Callable[[], GpuScorer], max_age_s: Callable[[], float],
                 counts: Counter[str], metrics: DiscoveryMetrics,
                 ownership: OwnershipVerifier, coordinators: CoordinatorClient,
                 lastgood: LastGood) -> None:
        self.agent = agent
        self.clock = clock
        self._scorer = scorer
        self._max_age_s = max_age_s
        self.counts = counts
        self.metrics = metrics
        self.ownership = ownership
        self.coordinators = coordinators
        self.lastgood = lastgood
        self.dht_timeout_s = DHT_TIMEOUT_S

    def _candidates(self, service: str, records: list[RecordLike], at: float) -> CandidateSet:
        return CandidateSet(service, records, self._scorer(), at, self._max_age_s())

    async def fetch(self, service: str, paced: bool = False) -> Fetched:
        """DHT first; coordinators when the DHT yields nothing usable. ``paced``: a
        periodic refresh, whose coordinator answer may be reused a few seconds."""
        records, dht_state = await self.from_dht(service)
        records = self.usable(records)
        cs = self._candidates(service, records, self.clock())
        answered = dht_state in ("hit", "miss")
        if len(cs) or not self.agent.config.discovery.coordinators:
            return Fetched(cs, "dht", answered, records)
        self.metrics.fallbacks.inc()
        self.counts["fallbacks"] += 1
        crecords, coord_answered = await self.coordinators.records(service, paced)
        crecords = self.usable(crecords)
        ccs = self._candidates(service, crecords, self.clock())
        if len(ccs) or not answered:
            return Fetched(ccs, "coordinator", coord_answered or answered, crecords)
        return Fetched(cs, "dht", True, records)

    def usable(self, records: list[RecordLike]) -> list[RecordLike]:
        """Records admitted by the network's policy whose endpoint callers may contact
        (see :mod:`agent.discovery.endpoints`); the others are never offered."""
        records = admitted(self.agent, records)
        allow = Allowance.from_config(self.agent.config.discovery)
        kept = [r for r in records if endpoint_refusal(r.endpoint, allow) is None]
        if len(kept) != len(records):
            self.ownership.count_refused(len(records) - len(kept))
        return kept

    async def from_dht(self, service: str) -> tuple[list[RecordLike], str]:
        """The DHT's records and how the query went: hit, miss, timeout, error, absent."""
        dht = self.agent.dht
        if dht is None:
            return [], "absent"
        self.counts["dht_queries"] += 1
        try:
            records: list[RecordLike] = list(
                await asyncio.wait_for(dht.find_providers(service), self.dht_timeout_s))
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

    def from_disk(self, service: str) -> CacheEntry | None:
        """The last-known-good copy of ``service``, as an entry that is never cached
        (each lookup tries the DHT and coordinators again first)."""
        got = self.lastgood.load(service)
        if got is None:
            return None
        records, saved_at = got
        # what was admitted and contactable when saved may not be now (a revocation, a
        # reload of network.admission_keys or discovery.allow_http_hosts)
        cs = self._candidates(service, self.usable(records), saved_at)
        if not len(cs):
            return None
        self.counts["disk_answers"] += 1
        return CacheEntry(candidates=cs, source="stale", fetched_at=saved_at,
                          valid_until=saved_at)
