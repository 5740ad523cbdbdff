"""Bounds on the DHT crawls that HTTP requests can cause (``/api/dht/providers``,
``Cache-Control: no-cache`` lookups, lookups and routes of never-seen service names).

A cached answer costs nothing, but each of these is a network crawl of several round trips
to up to ``alpha`` peers at a time. Without a bound, one client looping over random names
(or ``no-cache``) would turn a local HTTP loop into a stream of datagrams at every peer.

* **Coalesced:** concurrent crawls of one service share one query (discovery's
  single-flight for lookups; :class:`agent.discovery.cache.SingleFlight` around
  ``/api/dht/providers``). Joining a crawl in flight is free.
* **Rate-limited:** a crawl that would start a new query takes a token from one bucket
  per agent (``CRAWL_RATE`` per second, ``CRAWL_BURST`` banked); without a token the
  answer is ``429`` JSON with ``Retry-After``. One bucket, not one per client address: the
  admin API is loopback-only, so every client shares one address anyway, and the bound
  that matters is the load this agent puts on the network.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import Counter as PromCounter

from agent.ratelimit import TokenBucket

CRAWL_RATE = 20.0
CRAWL_BURST = 40.0


class CrawlLimiter:
    """The agent's budget for HTTP-triggered DHT crawls: ``take`` one, or answer
    ``too_many`` (429)."""

    def __init__(self, registry: Any = None, rate: float = CRAWL_RATE,
                 burst: float = CRAWL_BURST) -> None:
        self.bucket = TokenBucket(rate, burst)
        self.rate = rate
        self.limited = 0
        self._m: Any = None
        if registry is not None:
            self._m = PromCounter("rma_agent_crawls_limited",
                                  "HTTP requests refused (429) because they would start "
                                  "more DHT crawls than the agent allows", registry=registry)

    def take(self) -> bool:
        """One crawl; False (counted) when over the rate."""
        if self.bucket.take():
            return True
        self.limited += 1
        if self._m is not None:
            self._m.inc()
        return False

    def too_many(self) -> web.Response:
        retry = max(1, round(1.0 / self.rate)) if self.rate > 0 else 1
        return web.json_response(
            {"error": "too many uncached lookups (DHT crawls) from HTTP; retry shortly, or "
                      "drop Cache-Control: no-cache"},
            status=429, headers={"Retry-After": str(retry)})
