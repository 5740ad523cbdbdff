"""What discovery counts: its Prometheus objects and the ``discovery`` block of stats.

Two views of the same events: Prometheus objects on the agent's own registry (several
agents share a test process, so never the global one), and plain counters that
``GET /api/dht/stats`` reads back (Prometheus objects are awkward to read).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram

LOOKUP_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                  0.5, 1.0, 2.5, 5.0)
SOURCES = ("cache", "dht", "coordinator", "stale")


class DiscoveryMetrics:
    """Prometheus objects of discovery; ``failing`` and ``cached`` are read at scrape."""

    def __init__(self, registry: Any, *, failing: Callable[[], int],
                 cached: Callable[[], int]) -> None:
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
        self.reports = PromCounter("rma_agent_worker_reports",
                                   "Caller reports about workers, by outcome", ["outcome"], **kw)
        self.probes = PromCounter("rma_agent_worker_probes", "Health probes, by outcome",
                                  ["outcome"], **kw)
        self.failing = Gauge("rma_agent_failing_workers",
                             "Workers currently demoted after a failure", **kw)
        self.failing.set_function(failing)
        self.cached = Gauge("rma_agent_lookup_cached_services", "Services in the lookup cache",
                            **kw)
        self.cached.set_function(cached)
        for s in SOURCES:
            self.lookups.labels(s)
        for r in ("hit", "miss"):
            self.cache.labels(r)
        for r in ("hit", "miss", "timeout", "error"):
            self.dht.labels(r)


def counts_summary(c: Counter[str], durations: Iterable[float]) -> dict[str, Any]:
    """The counter-derived part of the ``discovery`` stats block (rates, percentiles)."""
    hits, misses = c["cache_hits"], c["cache_misses"]
    dht_q = c["dht_queries"]
    xs = sorted(durations)

    def pct(q: float) -> float | None:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 3) if xs else None

    return {
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
        "reports": {"ok": c["reports_ok"], "failed": c["reports_failed"]},
        "bad_records": c["bad_records"],
    }
