"""The router's Prometheus metrics (on the agent's own registry: several agents may share
a test process) and the labels they are pre-created with, so every series exists at 0."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram

OUTCOMES = ("ok", "upstream_error", "no_workers", "failed", "bad_request", "aborted",
            "limited", "shed")
RETRY_REASONS = ("connect", "proof", "not_processed", "status", "timeout", "disconnect")
ATTEMPT_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10)
UPSTREAM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class RouterMetrics:
    def __init__(self, registry: Any, sources: tuple[str, ...],
                 rates: Callable[[], tuple[float, float]]) -> None:
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
        self.shed = PromCounter("rma_agent_route_worker_share_full",
                                "Times a worker was skipped because it held its whole share "
                                "of the router's connections, or was hanging", **kw)
        self.suspects = PromCounter("rma_agent_route_hanging_workers",
                                    "Times a worker was backed off because more of this "
                                    "router's requests waited at it than it may hold", **kw)
        Gauge("rma_agent_route_dht_hit_ratio", "Of the router's lookups that reached past "
              "the cache, the share the DHT answered", **kw).set_function(
            lambda: rates()[0])
        Gauge("rma_agent_route_fallback_ratio", "Of the router's lookups that reached past "
              "the cache, the share coordinators answered", **kw).set_function(
            lambda: rates()[1])
        for o in OUTCOMES:
            self.requests.labels(o)
        for r in RETRY_REASONS:
            self.retries.labels(r)
        for s in sources:
            self.lookups.labels(s)


PICKS = ("p2c", "only", "hot", "banned")
PENALTIES = ("failure", "retry_after", "busy")


def policy_hooks(registry: Any) -> dict[str, Callable[[str], None]]:
    """The selection policy's counters (:mod:`agent.router.policy`) as its ``on_pick``
    and ``on_penalty`` hooks: ``rma_agent_router_picks_total{how}`` (how the first worker
    was chosen: two choices, the only one with room, a hot one, a banned one) and
    ``rma_agent_router_penalties_total{kind}`` (failure bans, Retry-After holds, "full")."""
    picks = PromCounter("rma_agent_router_picks", "Routed requests by how the first worker "
                        "was chosen", ["how"], registry=registry)
    penalties = PromCounter("rma_agent_router_penalties", "Workers penalised by the "
                            "router's selection, by kind", ["kind"], registry=registry)
    pick = {h: picks.labels(h) for h in PICKS}
    pen = {k: penalties.labels(k) for k in PENALTIES}
    return {"on_pick": lambda how: pick[how].inc(), "on_penalty": lambda k: pen[k].inc()}
