"""Discovery as the router sees it: ask for candidates, report outcomes, check proofs.

The router used to reach into seven of discovery's internals (its tracker, cache, clock,
ownership verifier, contacts counter, crawl guard by ``getattr`` ...). Now it holds one
:class:`RouterView` over ``agent.discovery`` — the implementation of
:class:`agent.interfaces.RouterDiscovery` — and uses nothing else of discovery. What a routed
outcome *means* to discovery (a failed proof holds the worker out of answers and drops the
cached answers naming it; a failure backs it off) is decided here, next to discovery,
not in the router.

It reads discovery only through :class:`agent.interfaces.DiscoveryService` (no import of
the component: no cycle, not even a type-only one).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from agent.discovery.api import wants_fresh
from agent.discovery.endpoints import Allowance, GuardedConnector
from agent.ratelimit import RateLimiter

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web

    from agent.discovery.ownership import ProofOutcome
    from agent.discovery.select import Query
    from agent.interfaces import DiscoveryService, RoutedRecord

log = logging.getLogger("rma_agent.discovery")
_LOG_LIMIT = RateLimiter(rate=0.2, burst=3)


class RouterView:
    """Implements :class:`agent.interfaces.RouterDiscovery` over one discovery."""

    def __init__(self, disc: DiscoveryService) -> None:
        self._disc = disc

    @property
    def max_results(self) -> int:
        return self._disc.max_results

    def lookup_refusal(self, service: str, request: web.Request) -> web.Response | None:
        """None when the crawl limit lets a lookup of ``service`` go ahead, else its 429."""
        if self._disc.allow_lookup(service, wants_fresh(request)):
            return None
        return self._disc.crawl_limit.too_many()

    async def route_candidates(self, service: str, query: Query) -> tuple[list[Any], str]:
        return await self._disc.route_candidates(service, query)

    async def check_proof(self, session: aiohttp.ClientSession,
                          record: RoutedRecord) -> ProofOutcome:
        """``record``'s endpoint ownership: remembered, or one request through
        ``session`` (the router's pool, so a routed request's proof shares its limits)."""
        return await self._disc.ownership.check(session, record.worker_id, record.endpoint,
                                                record.public_key)

    def proof_failed(self, record: RoutedRecord, outcome: ProofOutcome) -> None:
        """"bad" holds the worker out of answers until a later check succeeds (cached
        answers naming it are dropped); "down" is an ordinary failure back-off."""
        disc, wid = self._disc, record.worker_id
        if outcome.kind != "bad":
            self.worker_outcome(wid, False)
            return
        if disc.tracker.record_proof(wid, False, disc.clock(), disc.ownership.reverify_s):
            disc.forget_worker(wid)
        _LOG_LIMIT.log(log, logging.WARNING, "proof",
                       "router: worker %s failed its ownership proof at %s: %s; not "
                       "offered or routed to", wid.hex()[:12], record.endpoint,
                       outcome.reason)

    def worker_outcome(self, worker_id: bytes, ok: bool,
                       latency_ms: float | None = None) -> None:
        """Success feeds the latency estimate (straight to the tracker, no answer built:
        thousands a second); failure backs the worker off at once."""
        if ok:
            self._disc.tracker.record_success(worker_id, latency_ms)
        else:
            self._disc.report("", worker_id, False, None)

    def caller_connector(self, **kw: Any) -> aiohttp.TCPConnector:
        """Every connection passes the endpoint rule (:class:`GuardedConnector`) and is
        counted in discovery's ``contacts``."""
        agent = self._disc.agent
        return GuardedConnector(lambda: Allowance.from_config(agent.config.discovery),
                                self._disc.contacts, **kw)

    def contacted_hosts(self) -> dict[str, int]:
        return dict(self._disc.contacts)
