"""What the components of an agent offer each other: the typed seams of ``Agent``.

A component reaches another only through the Agent's accessors (``agent.dht``,
``agent.discovery``, ...; see :class:`agent.component.ComponentDirectory`), and each
accessor returns one of the protocols below, or None when this agent runs no such
component (a coordinator has no worker role, a test agent may have no DHT). A protocol
lists what *others* may use; everything else on a component is its own business and may
change without notice.

Why protocols in a module of their own: the component classes import the Agent (for
``self.agent``) and the Agent must name what its accessors return. If the accessors named
the classes, every component module would sit in an import cycle with the lifecycle, type
checking only or not. This module imports nothing of ``agent`` at run time, and at type
checking time only modules that are themselves low (records, identities, config, the
discovery's data structures), so anything may import it.

To offer something new to other components: add it here first, then to the component.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web
    from prometheus_client import CollectorRegistry

    from agent.config import Config
    from agent.dht.identity import Identity
    from agent.dht.record import WorkerRecord
    from agent.discovery.cache import CacheEntry
    from agent.discovery.gpu_classes import GpuScorer
    from agent.discovery.latency import LatencyTracker
    from agent.discovery.ownership import OwnershipVerifier, ProofOutcome
    from agent.discovery.ranking import LookupResult
    from agent.discovery.select import Query, RecordLike


# --------------------------------------------------------------------------- the DHT
@dataclass(frozen=True)
class RoutingContact:
    """One contact of the routing table, as the dashboard's ring draws it."""

    node_id: bytes
    ip: str
    port: int
    bucket: int | None        # index of its k-bucket (None: not known)


@dataclass(frozen=True)
class Topology:
    """The routing table at a glance: how many k-buckets, and who is in them."""

    buckets: int
    contacts: list[RoutingContact]


class RecordStore(Protocol):
    """The records this node stores for the network (``agent.dht.storage``)."""

    def snapshot(self, key: bytes, now: float | None = None) -> list[WorkerRecord]:
        """The records stored under ``key`` (withdrawals included)."""
        ...

    def drop_where(self, pred: Callable[[WorkerRecord], bool]) -> int:
        """Forget every stored record ``pred`` refuses; how many."""
        ...


class DHTService(Protocol):
    """What ``agent.dht`` (:class:`agent.dht.component.DHTComponent`) offers."""

    @property
    def identity(self) -> Identity | None:
        """This node's key pair (None: the state dir could not hold one)."""
        ...

    @property
    def mode(self) -> str:
        """"server" or "client": the mode in force."""
        ...

    @property
    def storage(self) -> RecordStore | None:
        """The local record store (None before start)."""
        ...

    @property
    def joined(self) -> bool:
        """True once this node has a peer (a worker waits for it before announcing)."""
        ...

    def peers(self) -> int: ...

    def contacts(self) -> list[tuple[str, str, int]]:
        """(node id hex, ip, port) of every routing contact."""
        ...

    def topology(self) -> Topology: ...

    async def announce(self, record: WorkerRecord) -> int:
        """Store ``record`` on the network; how many nodes stored it (0: not joined)."""
        ...

    async def find_providers(self, service: str,
                             limit: int | None = None) -> list[WorkerRecord]: ...

    async def service_counts(self) -> dict[str, int]: ...


# --------------------------------------------------------------------------- discovery
class CrawlBudget(Protocol):
    """The agent's bound on HTTP-triggered DHT crawls (``agent.discovery.crawl_limit``)."""

    def take(self) -> bool: ...

    def too_many(self) -> web.Response: ...


class DiscoveryService(Protocol):
    """What ``agent.discovery`` (:class:`agent.discovery.service.DiscoveryComponent`)
    offers: lookups, the cached answers, the health of workers and the crawl budget."""

    # read-only to others (properties: a protocol's plain attribute would also promise
    # that callers may assign it)
    @property
    def agent(self) -> AgentAPI: ...

    @property
    def clock(self) -> Callable[[], float]: ...

    @property
    def crawl_limit(self) -> CrawlBudget: ...

    @property
    def contacts(self) -> Counter[str]:
        """Hosts that guarded sessions connected to."""
        ...

    @property
    def counts(self) -> Counter[str]:
        """The plain counters behind ``stats()``."""
        ...

    @property
    def tracker(self) -> LatencyTracker: ...

    @property
    def ownership(self) -> OwnershipVerifier: ...

    @property
    def scorer(self) -> GpuScorer: ...

    @property
    def weights(self) -> tuple[float, ...]: ...

    @property
    def max_results(self) -> int: ...

    @property
    def max_age_s(self) -> float: ...

    async def lookup(self, service: str, query: Query | None = None, *,
                     fresh: bool = False) -> LookupResult:
        """Ranked workers for ``service`` (the answer of ``GET /api/services/{name}``)."""
        ...

    async def services(self) -> dict[str, Any]:
        """Known services with live worker counts (``GET /api/services``)."""
        ...

    async def answer(self, service: str, fresh: bool = False, *,
                     paced: bool = False) -> tuple[CacheEntry, str]:
        """A cache entry for ``service`` (cached, or fetched now) and its source."""
        ...

    def cached(self, service: str) -> CacheEntry | None:
        """The cached entry for ``service`` whatever its age (None: never looked up)."""
        ...

    def forget_answers(self) -> None:
        """Drop every cached answer (they may name a worker no longer admitted)."""
        ...

    def forget_worker(self, worker_id: bytes) -> int:
        """Drop cached answers that name ``worker_id``; how many."""
        ...

    def allow_lookup(self, service: str, fresh: bool) -> bool:
        """Whether an HTTP lookup may go ahead (cached, in flight, or within budget)."""
        ...

    def lookup_durations(self) -> list[float]:
        """The recent lookup durations (s), oldest first."""
        ...

    async def route_candidates(self, service: str,
                               query: Query) -> tuple[list[RecordLike], str]: ...

    def report(self, service: str, worker_id: bytes, ok: bool,
               latency_ms: float | None) -> dict[str, Any]: ...


class RoutedRecord(Protocol):
    """The fields of a worker record the router reads."""

    worker_id: bytes
    endpoint: str
    public_key: bytes
    capacity: float


class RouterDiscovery(Protocol):
    """Discovery as the router sees it, and all it sees (issue 19: it used to reach into
    seven internals): ask for candidates, report outcomes, check proofs. Implemented by
    :class:`agent.discovery.router_view.RouterView` over a :class:`DiscoveryService`."""

    @property
    def max_results(self) -> int: ...

    def lookup_refusal(self, service: str, request: web.Request) -> web.Response | None:
        """None when a lookup of ``service`` may go ahead for ``request``; else the answer
        to send instead (429: too many uncached lookups, i.e. DHT crawls)."""
        ...

    async def route_candidates(self, service: str, query: Query) -> tuple[list[Any], str]:
        """Ranked records (best first, after the top-3 draw) and the answer's source."""
        ...

    async def check_proof(self, session: aiohttp.ClientSession,
                          record: RoutedRecord) -> ProofOutcome:
        """The record's endpoint ownership proof (remembered, or fetched through
        ``session``, the router's own pool)."""
        ...

    def proof_failed(self, record: RoutedRecord, outcome: ProofOutcome) -> None:
        """A failed check: "bad" holds the worker out of answers, "down" backs it off."""
        ...

    def worker_outcome(self, worker_id: bytes, ok: bool,
                       latency_ms: float | None = None) -> None:
        """A routed request's outcome: a latency sample, or an immediate back-off."""
        ...

    def caller_connector(self, **kw: Any) -> aiohttp.TCPConnector:
        """A connector for sessions that contact workers' endpoints: the endpoint rule
        checked on every connection, the hosts asked for counted."""
        ...

    def contacted_hosts(self) -> dict[str, int]:
        """Hosts that caller-side sessions asked to connect to, with counts."""
        ...


# --------------------------------------------------------------------------- the others
class WorkerService(Protocol):
    """What ``agent.worker`` (:class:`agent.roles.worker.WorkerRole`) offers."""

    @property
    def endpoint(self) -> str:
        """The public URL this worker announces ("" while none is known)."""
        ...

    def wake(self) -> None:
        """Re-announce as soon as possible."""
        ...

    def set_down(self, services: frozenset[str]) -> None: ...

    def set_inflight(self, n: float | None) -> None: ...

    def renewal_state(self) -> dict[str, Any] | None:
        """The admission certificate's expiry and renewal state (None: nothing to renew)."""
        ...


class TunnelService(Protocol):
    """What ``agent.tunnel`` (:class:`agent.tunnel.TunnelComponent`) offers."""

    @property
    def endpoint(self) -> str | None:
        """The tunnel's public URL (None: not known yet, or no tunnel)."""
        ...


class AdmissionService(Protocol):
    """What ``agent.admission`` (the closed network's admission, component "network")
    offers."""

    def admitted(self, records: Iterable[Any], now: float | None = None) -> list[Any]: ...

    def check(self, record: Any, now: float | None = None) -> str | None:
        """Why the policy refuses ``record``; None when admitted."""
        ...

    def storage_hook(self, record: Any, now: float) -> str | None: ...

    def check_cert(self, blob: bytes, public_key: bytes, services: Iterable[str],
                   now: float | None = None) -> str | None:
        """Why the policy refuses a certificate for this key and services; None when
        it admits them (renewals at the enrollment endpoint)."""
        ...

    def certificate_blob(self) -> bytes:
        """What the worker puts in its record's ``cert`` field (b"" = none)."""
        ...

    def reload_certificate(self) -> bool:
        """Re-read the certificate file after a renewal; True when it changed."""
        ...


class RouterService(Protocol):
    """What ``agent.router`` (:class:`agent.router.component.RouterComponent`) offers
    others: its selection policy's view of workers (``?explain=1``, the dashboard)."""

    def route_costs(self, service: str, workers: Iterable[tuple[bytes, float]]
                    ) -> dict[bytes, dict[str, Any]]:
        """Per (worker id, record capacity), the router's cost parts for ``service``."""
        ...


class RegistryService(Protocol):
    """What ``agent.coordinator`` (:class:`agent.roles.coordinator.CoordinatorRole`)
    offers: its fallback registry."""

    def drop_where(self, pred: Callable[[WorkerRecord], bool]) -> int: ...


# --------------------------------------------------------------------------- the agent
class AgentAPI(Protocol):
    """What components may use of the Agent (:class:`agent.lifecycle.Agent`)."""

    config: Config
    config_path: Path | None
    registry: CollectorRegistry
    started_at: float
    running: bool
    http_url: str
    gateway_url: str

    def subscribe(self, event: str, callback: Callable[[Any], Any]) -> None: ...

    def emit(self, event: str, value: Any) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]: ...

    def status_changed(self) -> None: ...

    def readiness(self) -> tuple[bool, list[str]]: ...

    def stats(self) -> dict[str, Any]: ...

    @property
    def dht(self) -> DHTService | None: ...

    @property
    def discovery(self) -> DiscoveryService | None: ...

    @property
    def worker(self) -> WorkerService | None: ...

    @property
    def tunnel(self) -> TunnelService | None: ...

    @property
    def admission(self) -> AdmissionService | None: ...

    @property
    def coordinator(self) -> RegistryService | None: ...

    @property
    def router(self) -> RouterService | None: ...
