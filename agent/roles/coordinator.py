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
  signature travels with it, so no one can alter it on the way.
- **``GET /api/registry/{service}``** -> ``{"records": [base64, ...]}``: what discovery's
  coordinator fallback reads when the DHT cannot answer. Clients verify each record again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import Counter, Gauge

from agent.component import Component, cancel_task
from agent.dht import bootstrap as seeds_mod
from agent.dht.record import (
    ALL_SERVICES,
    RecordError,
    WorkerRecord,
    normalize_service,
    valid_service_name,
)

if TYPE_CHECKING:
    from agent.dht.component import DHTComponent
    from agent.lifecycle import Agent

log = logging.getLogger("rma_agent.coordinator")

SNAPSHOT_INTERVAL = 60.0
REGISTRY_MAX = 10_000        # workers kept; the soonest-expiring go first when full
MAX_B64 = 16 * 1024          # a record is well under 8 KiB; anything bigger is abuse
MAX_BODY = 64 * 1024
REPUBLISH_TIMEOUT = 5.0


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class CoordinatorRole(Component):
    """Snapshot keeper, registration endpoint and registry."""

    name = "coordinator"

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent)
        self.registry: dict[bytes, WorkerRecord] = {}
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

    @property
    def dht(self) -> DHTComponent:
        dht = self.agent.get("dht")
        if dht is None:
            raise RuntimeError("coordinator role needs the dht component")
        return dht  # type: ignore[return-value]

    # ------------------------------------------------------------------ lifecycle
    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/services/register", self._register)
        app.router.add_get("/api/registry/{service}", self._registry_get)

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
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL)
            self.save_snapshot()
            self._expire()

    # ------------------------------------------------------------------ registry
    def _expire(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for wid in [w for w, r in self.registry.items() if r.expires_at <= now]:
            del self.registry[wid]

    def _store(self, record: WorkerRecord) -> str:
        """Keep ``record`` if newest for its worker: "stored", "duplicate" or "stale"."""
        old = self.registry.get(record.worker_id)
        if old is not None:
            if record.seq == old.seq:
                return "duplicate"
            if record.seq < old.seq:
                return "stale"
        elif len(self.registry) >= REGISTRY_MAX:
            self._expire()
            if len(self.registry) >= REGISTRY_MAX:
                victim = min(self.registry.values(), key=lambda r: r.expires_at)
                del self.registry[victim.worker_id]
        self.registry[record.worker_id] = record
        return "stored"

    async def _register(self, request: web.Request) -> web.Response:
        resp = await self._register_inner(request)
        result = ("stored" if resp.status == 200 else "stale" if resp.status == 409
                  else "rejected")
        self._m_regs.labels(result).inc()
        return resp

    async def _register_inner(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_BODY:
            self.rejected += 1
            return _error(413, f"body too large (max {MAX_BODY} bytes)")
        try:
            raw = await request.content.read(MAX_BODY + 1)
        except Exception as exc:
            self.rejected += 1
            return _error(400, f"cannot read body: {exc}")
        if len(raw) > MAX_BODY:
            self.rejected += 1
            return _error(413, f"body too large (max {MAX_BODY} bytes)")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            self.rejected += 1
            return _error(400, 'body must be JSON: {"record": "<base64 of the signed record>"}')
        if not isinstance(body, dict) or not isinstance(body.get("record"), str):
            self.rejected += 1
            return _error(400, 'expected {"record": "<base64 of the signed record>"}')
        text = body["record"]
        if len(text) > MAX_B64:
            self.rejected += 1
            return _error(413, f"record too large (max {MAX_B64} base64 characters)")
        try:
            blob = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self.rejected += 1
            return _error(400, "record is not valid base64")
        try:
            record = WorkerRecord.decode(blob)
            record.verify(time.time())
        except RecordError as exc:
            self.rejected += 1
            return _error(422, f"record rejected: {exc}")
        except Exception as exc:    # decode of hostile bytes must still be a 4xx
            self.rejected += 1
            return _error(422, f"record rejected: undecodable ({type(exc).__name__})")
        outcome = self._store(record)
        if outcome == "stale":
            self.rejected += 1
            return _error(409, "record rejected: a newer sequence number is already "
                               "registered for this worker")
        self.registrations += 1
        stored = 0
        if outcome == "stored":
            stored = await self._republish(record)
            if record.withdrawn:
                log.info("coordinator: worker %s (%s) withdrew", record.name,
                         record.worker_id.hex()[:12])
            else:
                log.debug("coordinator: registered %s (%s) for %s", record.name,
                          record.worker_id.hex()[:12], ",".join(record.services))
        return web.json_response({"ok": True, "worker_id": record.worker_id.hex(),
                                  "seq": record.seq, "result": outcome,
                                  "republished_on": stored})

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
        recs = [r for r in self.registry.values()
                if not r.withdrawn and (service == ALL_SERVICES or service in r.services)]
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
        return f"registry={self._live_count()}"

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
        }}
