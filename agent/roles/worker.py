"""WorkerRole: keep this box's signed record alive in the DHT while it serves.

What it does and why:
- One record lists every configured service; the DHT stores it under each service key
  (and ``ALL_SERVICES``), so one announce serves all lookups.
- Refresh every ``republish_interval`` ±10 % (jitter, so a fleet restarted together does
  not announce in lock-step), and at once when the endpoint (tunnel URL), the load or the
  config changes — a stale endpoint is a dead worker for its callers.
- Sequence numbers are milliseconds since the epoch (``record.next_seq``, strictly
  increasing): a restarted worker's new records win over its old ones without any
  persisted counter.
- No endpoint (tunnel not up yet) -> no announce: a record nobody can call is worse than
  none. ``ready()`` says so.
- If an announce stores on no node (DHT unreachable, e.g. UDP filtered) the record is
  POSTed to each of ``discovery.coordinators`` instead, which verify and republish it.
- ``stop()`` announces a signed *withdrawn* tombstone with a higher sequence: storing
  nodes replace the live record with it, so lookups stop returning this worker at once
  instead of after ``record_ttl``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import Counter

from agent import __version__
from agent.admission.renewal import WorkerRenewal
from agent.component import Component, cancel_task
from agent.dht.record import RecordError, WorkerRecord
from agent.gpu import GpuInfo, detect_gpu
from agent.http.local_caller import refuse_remote

if TYPE_CHECKING:
    import aiohttp

    from agent.config import Config
    from agent.dht.identity import Identity
    from agent.interfaces import AgentAPI, DHTService

log = logging.getLogger("rma_agent.worker")

JOIN_GRACE = 5.0           # first announce waits this long for the DHT to join
RETRY_MIN = 1.0            # failed announces are retried sooner than republish_interval
LOAD_POLL = 5.0            # NVML utilisation poll, when NVML reports it
LOAD_DELTA = 1.0           # a load change of this many slots triggers a re-announce
STOP_BUDGET = 1.2           # the withdrawal on shutdown (lifecycle allows 1.5 s per component)
HTTP_TIMEOUT = 5.0


class WorkerRole(Component):
    """Announces, refreshes and withdraws this worker's record."""

    name = "worker"

    def __init__(self, agent: AgentAPI) -> None:
        super().__init__(agent)
        self._tunnel_endpoint = ""
        self._gpu: GpuInfo | None = None
        self._inflight: float | None = None     # set by whoever tracks requests, if anyone
        self._reported: float | None = None     # PUT /api/worker/load (the local service)
        self._load = 0.0
        self._seq = 0
        self._task: asyncio.Task[None] | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._session: aiohttp.ClientSession | None = None
        self._started = 0.0
        self._stopping = False
        self._announced_services: tuple[str, ...] = ()
        self._withdraw_services: tuple[str, ...] = ()
        self._down: frozenset[str] = frozenset()   # services whose upstream is down
        self.last_record: WorkerRecord | None = None
        self.last_announce_at: float | None = None
        self.last_stored = 0
        self.last_result = "never"
        self.announce_count = 0
        self.fallback_used = False
        self.fallback_ok = 0
        self.fallback_failed = 0
        self._said_no_endpoint = False
        self._dht_ok: bool | None = None        # None until the first announce
        self._last_registered = 0
        self._record_error = ""
        self.renewal = WorkerRenewal(agent, self.wake)   # closed networks: cert renewal
        self._m_announces = Counter(
            "rma_agent_worker_announces", "Worker record announces, by outcome "
            "(dht, coordinator = stored only through the fallback, failed, withdrawn)",
            ["result"], registry=agent.registry)

    # ------------------------------------------------------------------ helpers
    @property
    def dht(self) -> DHTService:
        dht = self.agent.dht
        if dht is None:
            raise RuntimeError("worker role needs the dht component")
        return dht

    @property
    def identity(self) -> Identity:
        identity = self.dht.identity
        if identity is None:      # the DHT does not start without one
            raise RuntimeError("worker role needs the node identity")
        return identity

    def _certificate(self) -> bytes:
        """The closed network's admission certificate (b"": open network, or none)."""
        admission = self.agent.admission
        return admission.certificate_blob() if admission is not None else b""

    @property
    def endpoint(self) -> str:
        return self.agent.config.worker.endpoint or self._tunnel_endpoint

    def _capacity(self) -> int:
        return max(1, int(self.agent.config.worker.max_concurrency))

    def _current_load(self) -> float:
        cap = self._capacity()
        # the gateway's count and the local service's own report: the larger, as neither
        # sees everything (the service also works on requests that did not come through
        # the gateway; the gateway's count drops to 0 after each burst)
        counts = [n for n in (self._inflight, self._reported) if n is not None]
        if counts:
            return float(min(max(max(counts), 0.0), cap))
        if self._gpu is not None and self._gpu.utilization is not None:
            return round(min(max(self._gpu.utilization, 0.0), 1.0) * cap, 2)
        return 0.0

    def _build(self, *, services: tuple[str, ...] | None = None,
               withdrawn: bool = False) -> WorkerRecord:
        cfg = self.agent.config
        gpu = self._gpu or GpuInfo("CPU", 0.0, None)
        record = WorkerRecord.create(
            self.identity,
            name=cfg.agent.name,
            services=list(services if services is not None else self.services()),
            endpoint=self.endpoint,
            gpu=gpu.name,
            gpu_memory_gb=float(gpu.memory_gb),
            load=self._load,
            capacity=self._capacity(),
            region=cfg.agent.region,
            seq=None,                      # wall-clock ms, strictly increasing
            ttl=int(cfg.dht.record_ttl),
            withdrawn=withdrawn,
            refresh=float(cfg.dht.republish_interval),
            agent_version=__version__,     # the fleet's versions (agent.versions, status)
            cert=self._certificate(),      # closed networks
        )
        self._seq = record.seq
        return record

    def wake(self) -> None:
        """Re-announce as soon as possible (endpoint, load or config changed)."""
        if self._wake is not None:
            self._wake.set()

    def services(self) -> tuple[str, ...]:
        """The services announced now: the configured ones whose upstream is not down."""
        return tuple(s for s in self.agent.config.worker.services if s not in self._down)

    def set_down(self, services: frozenset[str]) -> None:
        """Services whose upstream fails its health check (the gateway says so): left out
        of the record, and withdrawn at once if they were announced, until they are back."""
        services = frozenset(services)
        if services == self._down:
            return
        gone = tuple(s for s in self._announced_services if s in services - self._down)
        back = (self._down - services) & set(self.agent.config.worker.services)
        self._down = services
        # a service back before its withdrawal went out needs none any more
        pending = (s for s in self._withdraw_services if s not in back)
        self._withdraw_services = tuple(dict.fromkeys((*pending, *gone)))
        self.wake()

    def set_inflight(self, n: float | None) -> None:
        """Report requests in flight (overrides the NVML estimate); re-announces on change.
        The gateway calls this with its proxied requests."""
        self._inflight = n
        self._maybe_load_changed()

    def renewal_state(self) -> dict[str, Any] | None:
        return self.renewal.stats()

    def set_reported(self, n: float | None) -> None:
        """The local service's own in-flight count (``PUT /api/worker/load``); kept apart
        from the gateway's so that neither report erases the other."""
        self._reported = n
        self._maybe_load_changed()

    def _maybe_load_changed(self) -> None:
        new = self._current_load()
        if abs(new - self._load) >= min(LOAD_DELTA, self._capacity() / 4):
            log.info("worker: load %.2f -> %.2f: re-announcing", self._load, new)
            self._load = new
            self.wake()

    # ------------------------------------------------------------------ lifecycle
    def add_routes(self, app: web.Application) -> None:
        async def not_coordinator(request: web.Request) -> web.Response:
            return web.json_response(
                {"error": "this agent is a worker: only coordinators accept registrations "
                          "(agent.role = \"coordinator\")"}, status=404)

        app.router.add_post("/api/services/register", not_coordinator)
        app.router.add_get("/api/registry/{service}", not_coordinator)
        app.router.add_put("/api/worker/load", self._put_load)

    async def _put_load(self, request: web.Request) -> web.Response:
        """``PUT /api/worker/load`` ``{"inflight": N}`` (or ``null`` to go back to the NVML
        estimate): the service on this box reports its requests in flight; the record's
        load is the larger of that and the gateway's own count. Local callers only: the agent's port is what a quick tunnel
        publishes, so a request relayed by cloudflared (``Cf-Connecting-Ip``) is refused
        like any non-loopback caller."""
        refused = refuse_remote(request, "the load")
        if refused is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": 'body must be JSON: {"inflight": <number>}'},
                                     status=400)
        value = body.get("inflight", ...) if isinstance(body, dict) else ...
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not 0 <= value < 1e9):
            return web.json_response(
                {"error": 'expected {"inflight": <number >= 0>} or {"inflight": null}'},
                status=400)
        self.set_reported(None if value is None else float(value))
        return web.json_response({"inflight": self._reported, "load": self._current_load(),
                                  "capacity": self._capacity()})

    async def start(self) -> None:
        import aiohttp

        self._started = time.monotonic()
        self._gpu = await asyncio.get_running_loop().run_in_executor(
            None, detect_gpu, self.agent.config.worker)
        self._load = self._current_load()
        self._wake = asyncio.Event()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT))
        self.agent.subscribe("endpoint", self._on_endpoint)
        tunnel = self.agent.tunnel
        known = tunnel.endpoint if tunnel is not None else None
        if known:
            self._tunnel_endpoint = known       # learned before we subscribed
        self._task = asyncio.create_task(self._loop(), name="worker-announce")
        if self._gpu.utilization is not None:
            self._load_task = asyncio.create_task(self._poll_load(), name="worker-load")
        self.renewal.start()
        if not self.endpoint:
            log.info("worker: no endpoint configured: waiting for the tunnel's public URL")

    def _on_endpoint(self, value: Any) -> None:
        url = str(value or "")
        if url != self._tunnel_endpoint:
            log.info("worker: endpoint from tunnel: %s", url or "(none)")
            self._tunnel_endpoint = url
            self.wake()
            self.agent.status_changed()

    async def reload(self, old: Config, new: Config) -> None:
        await self.renewal.reload()
        removed = tuple(s for s in old.worker.services if s not in new.worker.services)
        if removed and self._announced_services:
            self._withdraw_services = tuple(dict.fromkeys((*self._withdraw_services, *removed)))
        if old.worker != new.worker:
            self._gpu = await asyncio.get_running_loop().run_in_executor(
                None, detect_gpu, new.worker)
            self._load = self._current_load()
        if (old.worker != new.worker or old.agent.name != new.agent.name
                or old.agent.region != new.agent.region or old.dht.record_ttl != new.dht.record_ttl):
            log.info("worker: config changed: re-announcing")
            self.wake()

    async def stop(self) -> None:
        self._stopping = True
        await self.renewal.stop()
        for task in (self._task, self._load_task):
            await cancel_task(task)
        self._task = self._load_task = None
        try:
            if self.last_record is not None and not self.last_record.withdrawn:
                await asyncio.wait_for(self._withdraw(self._announced_services),
                                       timeout=STOP_BUDGET)
        except TimeoutError:
            log.warning("worker: withdrawal not confirmed within %.1fs", STOP_BUDGET)
        except Exception as exc:
            log.warning("worker: withdrawal failed: %s", exc)
        finally:
            if self._session is not None:
                await self._session.close()
                self._session = None

    # ------------------------------------------------------------------ announcing
    async def _loop(self) -> None:
        assert self._wake is not None
        dht = self.dht
        deadline = time.monotonic() + JOIN_GRACE
        while not dht.joined and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        retry = RETRY_MIN
        while True:
            self._wake.clear()
            ok = False
            try:
                ok = await self._announce_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:    # never let the refresh loop die
                self.last_result = f"error: {exc}"
                log.warning("worker: announce failed: %s", exc)
            interval = float(self.agent.config.dht.republish_interval)
            if ok or not self.endpoint:
                delay = interval * random.uniform(0.9, 1.1)
                retry = RETRY_MIN
            else:
                delay = min(interval, retry) * random.uniform(0.9, 1.1)
                retry = min(retry * 2, interval)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except TimeoutError:
                pass

    async def _announce_once(self) -> bool:
        """One refresh; True when the record is stored somewhere (DHT or a coordinator)."""
        cfg = self.agent.config
        if not self.endpoint or not self.services():
            if self.last_record is not None and not self.last_record.withdrawn:
                # a record pointing at a dead URL (or at services no longer served) is
                # worse than none: withdraw it now instead of letting it live to expiry
                log.warning("worker: %s: withdrawing the announced record",
                            "endpoint gone" if not self.endpoint else "no services left")
                await self._withdraw(self._announced_services)
            if not self._said_no_endpoint:
                self._said_no_endpoint = True
                self.last_result = ("no endpoint" if not self.endpoint
                                    else "every service's upstream is down"
                                    if cfg.worker.services else "no services configured")
            return False
        self._said_no_endpoint = False
        if self._withdraw_services:
            removed, self._withdraw_services = self._withdraw_services, ()
            await self._withdraw(removed)
        try:
            record = self._build()
        except RecordError as exc:
            # e.g. a long endpoint + name + services over the record's size limit: the
            # config is valid TOML but cannot be announced; say so (once) and in /readyz
            if str(exc) != self._record_error:
                log.error("worker: cannot announce: %s (shorten agent.name, worker.endpoint, "
                          "agent.region, worker.gpu or worker.services)", exc)
                self.agent.status_changed()
            self._record_error = str(exc)
            self.last_result = f"cannot build the record: {exc}"
            return False
        self._record_error = ""
        stored = await self.dht.announce(record)
        self.announce_count += 1
        self.last_record = record
        self.last_announce_at = time.time()
        self.last_stored = stored
        self._announced_services = tuple(record.services)
        before = self.last_result
        if stored > 0:
            self.last_result = f"{stored} stores over {len(record.keys())} keys"
            if not self._dht_ok:        # first success, or recovered: say it once
                log.info("worker: announced %s at %s (%d stores over %d keys)",
                         ",".join(record.services), record.endpoint, stored,
                         len(record.keys()))
                self.agent.status_changed()
            self._dht_ok = True
            self._m_announces.labels("dht").inc()
            return True
        registered = await self._register_fallback(record)
        self._last_registered = registered
        self.last_result = (f"dht stored on no node; registered with {registered} of "
                            f"{len(cfg.discovery.coordinators)} coordinators"
                            if cfg.discovery.coordinators else
                            "dht stored on no node and no discovery.coordinators to fall back to")
        if self._dht_ok is not False or self.last_result != before:
            log.warning("worker: %s", self.last_result)     # on change only: no log flood
            self.agent.status_changed()
        self._dht_ok = False
        self._m_announces.labels("coordinator" if registered else "failed").inc()
        return registered > 0

    async def _register_fallback(self, record: WorkerRecord) -> int:
        coordinators = self.agent.config.discovery.coordinators
        if not coordinators or self._session is None:
            return 0
        self.fallback_used = True
        body = {"record": base64.b64encode(record.encode()).decode()}

        async def post(base: str) -> bool:
            url = base.rstrip("/") + "/api/services/register"
            assert self._session is not None
            try:
                async with self._session.post(url, json=body) as resp:
                    if 200 <= resp.status < 300:
                        return True
                    text = (await resp.text())[:200]
                    log.warning("worker: %s refused the registration: HTTP %d %s",
                                url, resp.status, text)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("worker: registration with %s failed: %s", url, exc)
            return False

        results = await asyncio.gather(*(post(c) for c in coordinators))
        ok = sum(1 for r in results if r)
        self.fallback_ok += ok
        self.fallback_failed += len(results) - ok
        return ok

    async def _withdraw(self, services: tuple[str, ...]) -> None:
        """Announce a signed tombstone for ``services`` (all announced ones on stop)."""
        if not services or self.last_record is None:
            return
        if self.endpoint:
            tomb = self._build(services=services, withdrawn=True)
        else:   # the endpoint is gone: withdraw what was announced, with its old URL
            tomb = self.last_record.tombstone(self.identity)
        stored = await self.dht.announce(tomb)
        if stored == 0 or self.fallback_used:
            await self._register_fallback(tomb)
        if set(services) >= set(self._announced_services):
            self.last_record = tomb
        self._m_announces.labels("withdrawn").inc()
        log.info("worker: withdrew %s (%d stores)", ",".join(services), stored)

    async def _poll_load(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(LOAD_POLL)
            try:
                self._gpu = await loop.run_in_executor(None, detect_gpu,
                                                       self.agent.config.worker)
            except Exception as exc:
                log.debug("worker: load poll failed: %s", exc)
                continue
            self._maybe_load_changed()

    # ------------------------------------------------------------------ readiness/status
    def ready(self) -> tuple[bool, str]:
        if not self.endpoint:
            mode = self.agent.config.tunnel.mode
            if mode == "off":
                return False, ("worker: no endpoint: set worker.endpoint or enable the tunnel "
                               "(tunnel.mode)")
            return False, "worker: no endpoint yet (waiting for the tunnel's public URL)"
        if not self.agent.config.worker.services:
            return False, "worker: no services configured (worker.services)"
        if self._record_error:
            return False, f"worker: cannot announce: {self._record_error}"
        return True, ""

    def status(self) -> str:
        if not self.endpoint:
            return "no endpoint"
        if self.last_record is None:
            return "announcing"
        if self.last_record.withdrawn:
            return "withdrawn"
        if self.last_stored == 0 and not self._last_registered:
            return "announce failing"
        renewal = self.renewal.status()
        return "announced " + ",".join(self._announced_services) + (f"; {renewal}" if renewal
                                                                    else "")

    def stats(self) -> dict[str, Any]:
        return {"worker": {
            "services": list(self.agent.config.worker.services),
            "endpoint": self.endpoint,
            "gpu": self._gpu.name if self._gpu else None,
            "gpu_memory_gb": self._gpu.memory_gb if self._gpu else None,
            "load": self._load,
            "capacity": self._capacity(),
            "seq": self._seq,
            "announces": self.announce_count,
            "last_announce_at": self.last_announce_at,
            "last_stored_on": self.last_stored,
            "last_result": self.last_result,
            "fallback_used": self.fallback_used,
            "fallback_registrations": {"ok": self.fallback_ok, "failed": self.fallback_failed},
            "certificate_renewal": self.renewal_state(),
        }}
