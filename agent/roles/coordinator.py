"""CoordinatorRole: the stable seed and the HTTP fallback registry.

Why each part exists:
- **Routing-table snapshot** (``state_dir/routing.json``, every 60 s and on stop, written
  atomically): a restarted coordinator has no peers in memory and, being the network's
  seed, often no seeds in its config. ``DHTComponent`` reads the snapshot at start and
  uses it as extra seeds, so the restart rejoins on its own.
- **``POST /api/services/register``** (``{"record": base64}``): workers whose UDP is blocked
  cannot announce; they send their signed record here. It is verified exactly like a DHT
  record (signature, fields, expiry, skew), kept in a bounded local registry (newest
  sequence per worker), and republished into the DHT on the worker's behalf — the
  signature travels with it, so no one can alter it on the way. Abuse bounds
  (:mod:`agent.roles.registry`): in a closed network only admitted records
  (``agent.admission``, 403 otherwise); token buckets per source IP and per /24 (/64),
  429 beyond; at most ``MAX_PER_IP`` workers per IP and ``MAX_PER_PREFIX`` per /24;
  the last places kept for newcomers from small networks; a record kept at most
  ``dht.record_ttl`` seconds past its registration whatever lifetime it claims, and
  republished into the DHT only when it expires within that window (so the DHT never
  holds it longer than the registry); a full registry refuses newcomers (503) instead
  of evicting a live record. The source IP is the peer's, or what a forwarding header
  says when the peer is listed in ``http.trusted_proxies`` (:mod:`agent.forwarded`).
  The body is read to its end (it may arrive in several TCP segments) and its JSON
  nesting bounded before parsing.
- **``GET /api/registry/{service}``** -> ``{"records": [base64, ...]}``: what discovery's
  coordinator fallback reads when the DHT cannot answer. Clients verify each record again.
- **``POST /api/network/enroll``** on the gateway: enrollment tokens and renewals in,
  short-lived certificates signed with this coordinator's issuer key out
  (:mod:`agent.admission.enroll_service`; mounted here, nothing else of it lives here).
- **``GET /api/dht/bootstrap``** on the gateway: the public seed list — our own address,
  then routing-table contacts chosen by :mod:`agent.roles.seeds` (long-lived first, at
  most two per /16 and one per /24), so sybils that rent many /24s cannot fill it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from prometheus_client import Counter, Gauge

from agent.admission.component import admitted, admitted_reason
from agent.admission.enroll_service import EnrollService
from agent.component import Component, cancel_task
from agent.dht import bootstrap as seeds_mod
from agent.dht.record import (
    ALL_SERVICES,
    RecordError,
    WorkerRecord,
    normalize_service,
    valid_service_name,
)
from agent.forwarded import client_ip
from agent.http.body import BodyTooLarge, read_bounded
from agent.netgroups import network_of
from agent.roles import registry as reg_mod
from agent.roles.registry import Registry
from agent.roles.seeds import OBSERVE_INTERVAL, SeedBook

if TYPE_CHECKING:
    from agent.dht.component import DHTComponent
    from agent.interfaces import AgentAPI

log = logging.getLogger("rma_agent.coordinator")

SNAPSHOT_INTERVAL = 60.0
MAX_B64 = 16 * 1024          # a record is well under 8 KiB; anything bigger is abuse
MAX_BODY = 64 * 1024
MAX_NESTING = 32             # '[' + '{' in a body; a registration has one '{'
REPUBLISH_TIMEOUT = 5.0

_LIMIT_TEXT = {
    "ip_full": "{n} workers already registered from {ip}",
    "prefix_full": "{n} workers already registered from {prefix}",
    "reserved": "the registry's last places are kept for networks with few workers",
}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _parse_json(raw: bytes) -> Any:
    """The body as JSON, or ValueError. Nesting is bounded before parsing (a body of
    30,000 '[' made the parser raise RecursionError: a 500 with a traceback)."""
    if raw.count(b"[") + raw.count(b"{") > MAX_NESTING:
        raise ValueError("too deeply nested")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("too deeply nested") from None
    except UnicodeDecodeError as exc:
        raise ValueError(str(exc)) from None


class CoordinatorRole(Component):
    """Snapshot keeper, registration endpoint and registry."""

    name = "coordinator"

    def __init__(self, agent: AgentAPI) -> None:
        super().__init__(agent)
        self.book = Registry(lambda: float(self.agent.config.dht.record_ttl))
        self.seeds = SeedBook()
        self._task: asyncio.Task[None] | None = None
        self.last_snapshot_at: float | None = None
        self.last_snapshot_size = 0
        self.registrations = 0
        self.rejected = 0
        self.republished = 0
        self._m_regs = Counter("rma_agent_coordinator_registrations",
                               "POST /api/services/register outcomes", ["result"],
                               registry=agent.registry)
        self._m_workers = Gauge("rma_agent_coordinator_registry_workers",
                                "Live workers in the fallback registry", registry=agent.registry)
        self._m_workers.set_function(self._live_count)
        self.enroll = EnrollService(agent)

    @property
    def registry(self) -> dict[bytes, WorkerRecord]:
        """Registered records by worker id (read-only use; ``book`` keeps the counts)."""
        return self.book.records

    @property
    def dht(self) -> DHTComponent:
        dht = self.agent.dht
        if dht is None:
            raise RuntimeError("coordinator role needs the dht component")
        # the DHT's own bootstrap handler (served on our gateway) takes the component
        return cast("DHTComponent", dht)

    # ------------------------------------------------------------------ lifecycle
    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/services/register", self._register)
        app.router.add_get("/api/registry/{service}", self._registry_get)

    def add_gateway_routes(self, app: web.Application) -> None:
        """The public registry and seed list, on ``gateway.listen`` (SPEC §5): what
        workers behind UDP filters and new nodes reach through a TLS proxy or tunnel."""
        app.router.add_post("/api/services/register", self._register)
        app.router.add_get("/api/registry/{service}", self._registry_get)
        app.router.add_get("/api/dht/bootstrap", self._bootstrap)
        self.enroll.add_routes(app)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._snapshot_loop(), name="coordinator-snapshot")

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None
        self.save_snapshot(reason="stop")

    # ------------------------------------------------------------------ snapshot
    def save_snapshot(self, reason: str = "periodic") -> bool:
        """Write the routing table to ``routing.json``; keep the old file if we have none.

        Why not overwrite with an empty table: a coordinator that lost every peer (network
        outage) would otherwise forget the only seeds it had for its next start.
        """
        try:
            dht = self.dht
            contacts = dht.contacts()
        except Exception as exc:
            log.warning("coordinator: no routing table to snapshot: %s", exc)
            return False
        if not contacts:
            return False
        try:
            path = seeds_mod.save_snapshot(self.agent.config.agent.state_dir,
                                           dht.identity.node_id.hex(), contacts)
        except OSError as exc:
            log.warning("coordinator: cannot write routing snapshot: %s", exc)
            return False
        self.last_snapshot_at = time.time()
        self.last_snapshot_size = len(contacts)
        log.log(logging.INFO if reason == "stop" else logging.DEBUG,
                "coordinator: saved %d contacts to %s (%s)", len(contacts), path, reason)
        return True

    async def _snapshot_loop(self) -> None:
        """Every ``OBSERVE_INTERVAL``: note new routing-table contacts (the seed list
        prefers long-lived ones); every ``SNAPSHOT_INTERVAL``: snapshot and expire."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(OBSERVE_INTERVAL)
            self._observe()
            if time.monotonic() - last >= SNAPSHOT_INTERVAL:
                last = time.monotonic()
                self.save_snapshot()
                self._expire()

    def _observe(self) -> list[tuple[str, str, int]]:
        try:
            return self.seeds.observe(self.dht.contacts())
        except Exception as exc:    # not started yet, or stopping
            log.debug("coordinator: no contacts to observe: %s", exc)
            return []

    async def _bootstrap(self, request: web.Request) -> web.Response:
        """``GET /api/dht/bootstrap`` on the gateway: our own address (when reachable),
        then long-lived, diverse contacts (:mod:`agent.roles.seeds`)."""
        from agent.dht.api import MAX_SEEDS, _fmt, _own_seed

        seeds: list[str] = []
        own = _own_seed(self.dht, request)
        if own:
            seeds.append(own)
        for ip, port in self.seeds.pick(self._observe(), MAX_SEEDS - len(seeds)):
            s = _fmt(ip, port)
            if s not in seeds:
                seeds.append(s)
        return web.json_response({"seeds": seeds})

    # ------------------------------------------------------------------ registry
    def _expire(self, now: float | None = None) -> None:
        self.book.expire(now)

    def drop_where(self, pred: Callable[[WorkerRecord], bool]) -> int:
        """Forget every registered record for which ``pred`` is true (revoked workers,
        expired certificates); how many."""
        return self.book.drop_where(pred)

    def _store(self, record: WorkerRecord, source: str = "", now: float | None = None) -> str:
        return self.book.store(record, source, now)

    async def _register(self, request: web.Request) -> web.Response:
        resp = await self._register_inner(request)
        result = ("stored" if resp.status == 200 else "stale" if resp.status == 409
                  else "rejected")
        self._m_regs.labels(result).inc()
        return resp

    async def _register_inner(self, request: web.Request) -> web.Response:
        source = client_ip(request, self.agent.config.http.trusted_proxies)
        limited = self.book.rate_ok(source)
        if limited is not None:
            self.rejected += 1
            who = source if limited == "ip" else network_of(source)
            return web.json_response(
                {"error": f"too many registrations from {who}; retry later"},
                status=429, headers={"Retry-After": "5"})
        body = await self._read_json(request)
        if isinstance(body, web.Response):
            self.rejected += 1
            return body
        record = self._decode(body)
        if isinstance(record, web.Response):
            self.rejected += 1
            return record
        outcome = self.book.store(record, source)
        refused = self._refused(outcome, source)
        if refused is not None:
            self.rejected += 1
            return refused
        self.registrations += 1
        stored, republish = 0, "same"
        if outcome == "stored":
            if self.book.republishable(record):
                stored, republish = await self._republish(record), "yes"
            else:
                republish = (f"no: the record lives past the {self.agent.config.dht.record_ttl}"
                             " s this registry keeps it")
            if record.withdrawn:
                log.info("coordinator: worker %s (%s) withdrew", record.name,
                         record.worker_id.hex()[:12])
            else:
                log.debug("coordinator: registered %s (%s) for %s", record.name,
                          record.worker_id.hex()[:12], ",".join(record.services))
        return web.json_response({"ok": True, "worker_id": record.worker_id.hex(),
                                  "seq": record.seq, "result": outcome,
                                  "republished_on": stored, "republish": republish})

    async def _read_json(self, request: web.Request) -> Any:
        """The body's JSON object, or the 4xx answer saying why not."""
        try:
            raw = await read_bounded(request, MAX_BODY)
        except BodyTooLarge as exc:
            return _error(413, str(exc))
        except Exception as exc:
            return _error(400, f"cannot read body: {exc}")
        try:
            body = _parse_json(raw)
        except ValueError as exc:
            return _error(400, 'body must be JSON: {"record": "<base64 of the signed record>"}'
                               f" ({str(exc)[:80]})")
        if not isinstance(body, dict) or not isinstance(body.get("record"), str):
            return _error(400, 'expected {"record": "<base64 of the signed record>"}')
        return body

    def _decode(self, body: dict[str, Any]) -> WorkerRecord | web.Response:
        """The verified, admitted record of a registration, or the 4xx answer."""
        text = body["record"]
        if len(text) > MAX_B64:
            return _error(413, f"record too large (max {MAX_B64} base64 characters)")
        try:
            blob = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return _error(400, "record is not valid base64")
        try:
            record = WorkerRecord.decode(blob)
            record.verify(time.time())
        except RecordError as exc:
            return _error(422, f"record rejected: {exc}")
        except Exception as exc:    # decode of hostile bytes must still be a 4xx
            return _error(422, f"record rejected: undecodable ({type(exc).__name__})")
        why = admitted_reason(self.agent, record)
        if why is not None:
            return _error(403, f"record rejected: not admitted to this network: {why}")
        return record

    def _refused(self, outcome: str, source: str) -> web.Response | None:
        """The answer to a registration the registry refused, or None when kept."""
        if outcome in _LIMIT_TEXT:
            n = reg_mod.MAX_PER_IP if outcome == "ip_full" else reg_mod.MAX_PER_PREFIX
            why = _LIMIT_TEXT[outcome].format(n=n, ip=source, prefix=network_of(source))
            return _error(429, f"record rejected: {why}")
        if outcome == "full":
            return _error(503, "record rejected: the registry is full of live records")
        if outcome == "stale":
            return _error(409, "record rejected: a newer sequence number is already "
                               "registered for this worker")
        return None

    async def _republish(self, record: WorkerRecord) -> int:
        """Announce the worker's record into the DHT; bounded so a request never hangs."""
        try:
            stored = await asyncio.wait_for(self.dht.announce(record), timeout=REPUBLISH_TIMEOUT)
        except TimeoutError:
            stored = 0
        except Exception as exc:
            log.warning("coordinator: republish failed: %s", exc)
            stored = 0
        if stored:
            self.republished += 1
        return stored

    async def _registry_get(self, request: web.Request) -> web.Response:
        service = normalize_service(request.match_info["service"])
        if not (service == ALL_SERVICES or valid_service_name(service)):
            return _error(400, f"bad service name {service!r}")
        now = time.time()
        self._expire(now)
        recs = admitted(self.agent, [
            r for r in self.registry.values()
            if not r.withdrawn and (service == ALL_SERVICES or service in r.services)])
        recs.sort(key=lambda r: r.issued_at, reverse=True)
        max_results = int(self.agent.config.discovery.max_results) or 50
        limit_text = request.query.get("limit")
        if limit_text is not None:
            try:
                max_results = max(1, min(int(limit_text), 1000))
            except ValueError:
                return _error(400, "limit must be an integer")
        recs = recs[:max_results]
        return web.json_response({
            "service": service,
            "records": [base64.b64encode(r.encode()).decode() for r in recs],
        })

    # ------------------------------------------------------------------ status
    def _live_count(self) -> int:
        self._expire()
        return sum(1 for r in self.registry.values() if not r.withdrawn)

    def status(self) -> str:
        enroll = self.enroll.status()
        return f"registry={self._live_count()}" + (f", {enroll}" if enroll else "")

    def stats(self) -> dict[str, Any]:
        return {"coordinator": {
            "registry_size": self._live_count(),
            "registry_tombstones": sum(1 for r in self.registry.values() if r.withdrawn),
            "registrations": self.registrations,
            "rejected": self.rejected,
            "republished": self.republished,
            "snapshot": {"path": str(seeds_mod.snapshot_path(self.agent.config.agent.state_dir)),
                         "saved_at": self.last_snapshot_at,
                         "contacts": self.last_snapshot_size},
            **self.enroll.stats(),
        }}
