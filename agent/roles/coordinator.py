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
  signature travels with it, so no one can alter it on the way. Abuse bounds: in a closed
  network only admitted records (``agent.network``, 403 otherwise); per source IP a token
  bucket (``REGISTER_RATE``/s, burst ``REGISTER_BURST``, 429 beyond) and at most
  ``MAX_PER_IP`` workers; a record is kept at most ``dht.record_ttl`` seconds past its
  registration whatever lifetime it claims (workers re-register every republish
  interval), and a full registry refuses newcomers (503) instead of evicting a live
  record — so a flood of long-lived records cannot push honest workers out.
- **``GET /api/registry/{service}``** -> ``{"records": [base64, ...]}``: what discovery's
  coordinator fallback reads when the DHT cannot answer. Clients verify each record again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import logging
import time
from collections import Counter as CounterT
from collections import OrderedDict
from collections.abc import Callable
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
from agent.network import admitted, admitted_reason
from agent.ratelimit import TokenBucket

if TYPE_CHECKING:
    from agent.dht.component import DHTComponent
    from agent.lifecycle import Agent

log = logging.getLogger("rma_agent.coordinator")

SNAPSHOT_INTERVAL = 60.0
REGISTRY_MAX = 10_000        # workers kept; the soonest-expiring go first when full
MAX_B64 = 16 * 1024          # a record is well under 8 KiB; anything bigger is abuse
MAX_BODY = 64 * 1024
REPUBLISH_TIMEOUT = 5.0
REGISTER_RATE = 5.0          # registrations per second per source IP (a NAT of many workers
REGISTER_BURST = 50.0        # re-registers every republish interval: 100 workers ~ 3/s)
MAX_PER_IP = 256             # workers whose latest registration came from one IP
RATE_IPS = 4096              # source IPs with a bucket (least recently seen dropped)


def source_ip(request: web.Request) -> str:
    """The registering client's IP, for per-IP limits. Behind cloudflared or a TLS proxy
    on this box (the connection comes from loopback) the proxy's header names the client:
    ``CF-Connecting-IP``, else the *last* ``X-Forwarded-For`` entry (the one our proxy
    appended; earlier ones are whatever the client sent), else ``X-Real-IP``. Headers from
    any other peer are ignored: they would let a client pick its own bucket."""
    remote = request.remote or ""
    try:
        loopback = ipaddress.ip_address(remote.removeprefix("::ffff:")).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        for header, pick in (("CF-Connecting-IP", 0), ("X-Forwarded-For", -1),
                             ("X-Real-IP", 0)):
            value = request.headers.get(header)
            if value:
                ip = value.split(",")[pick].strip()[:64]
                if ip:
                    return ip
    return remote


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class CoordinatorRole(Component):
    """Snapshot keeper, registration endpoint and registry."""

    name = "coordinator"

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent)
        self.registry: dict[bytes, WorkerRecord] = {}
        self._until: dict[bytes, float] = {}        # worker -> kept until (TTL capped)
        self._src: dict[bytes, str] = {}            # worker -> IP of its latest registration
        self._per_ip: CounterT[str] = CounterT()
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
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

    def add_gateway_routes(self, app: web.Application) -> None:
        """The public registry and seed list, on ``gateway.listen`` (SPEC §5): what
        workers behind UDP filters and new nodes reach through a TLS proxy or tunnel."""
        from agent.dht.api import bootstrap_handler

        app.router.add_post("/api/services/register", self._register)
        app.router.add_get("/api/registry/{service}", self._registry_get)
        app.router.add_get("/api/dht/bootstrap", bootstrap_handler(self.dht))

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
        for wid in [w for w, r in self.registry.items()
                    if min(r.expires_at, self._until.get(w, r.expires_at)) <= now]:
            self._forget(wid)

    def _forget(self, wid: bytes) -> None:
        self.registry.pop(wid, None)
        self._until.pop(wid, None)
        ip = self._src.pop(wid, None)
        if ip is not None:
            n = self._per_ip[ip] - 1
            if n > 0:
                self._per_ip[ip] = n
            else:
                del self._per_ip[ip]

    def drop_where(self, pred: Callable[[WorkerRecord], bool]) -> int:
        """Forget every registered record for which ``pred`` is true (revoked workers,
        expired certificates); how many."""
        gone = [w for w, r in self.registry.items() if pred(r)]
        for wid in gone:
            self._forget(wid)
        return len(gone)

    def _store(self, record: WorkerRecord, source: str = "", now: float | None = None) -> str:
        """Keep ``record`` if newest for its worker: "stored", "duplicate", "stale", or
        "ip_full" / "full" (a newcomer never evicts a live record)."""
        now = time.time() if now is None else now
        old = self.registry.get(record.worker_id)
        if old is not None:
            if record.seq == old.seq:
                return "duplicate"
            if record.seq < old.seq:
                return "stale"
            self._forget(record.worker_id)
        else:
            if source and self._per_ip[source] >= MAX_PER_IP:
                return "ip_full"
            if len(self.registry) >= REGISTRY_MAX:
                self._expire(now)
                if len(self.registry) >= REGISTRY_MAX:
                    return "full"
        self.registry[record.worker_id] = record
        self._until[record.worker_id] = min(
            record.expires_at, now + float(self.agent.config.dht.record_ttl))
        if source:
            self._src[record.worker_id] = source
            self._per_ip[source] += 1
        return "stored"

    def _rate_ok(self, ip: str) -> bool:
        bucket = self._buckets.get(ip)
        if bucket is None:
            if len(self._buckets) >= RATE_IPS:
                self._buckets.popitem(last=False)
            bucket = self._buckets[ip] = TokenBucket(REGISTER_RATE, REGISTER_BURST)
        else:
            self._buckets.move_to_end(ip)
        return bucket.take()

    async def _register(self, request: web.Request) -> web.Response:
        resp = await self._register_inner(request)
        result = ("stored" if resp.status == 200 else "stale" if resp.status == 409
                  else "rejected")
        self._m_regs.labels(result).inc()
        return resp

    async def _register_inner(self, request: web.Request) -> web.Response:
        source = source_ip(request)
        if not self._rate_ok(source):
            self.rejected += 1
            return web.json_response(
                {"error": f"too many registrations from {source} (at most "
                          f"{REGISTER_RATE:g}/s); retry later"},
                status=429, headers={"Retry-After": "5"})
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
        why = admitted_reason(self.agent, record)
        if why is not None:
            self.rejected += 1
            return _error(403, f"record rejected: not admitted to this network: {why}")
        outcome = self._store(record, source)
        if outcome == "ip_full":
            self.rejected += 1
            return _error(429, f"record rejected: {MAX_PER_IP} workers already registered "
                               f"from {source}")
        if outcome == "full":
            self.rejected += 1
            return _error(503, "record rejected: the registry is full of live records")
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
