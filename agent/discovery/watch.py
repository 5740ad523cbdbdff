"""Live membership of services: ``GET /api/services/{name}/watch`` (Server-Sent Events).

A watch sends the service's current members (``event: snapshot``), then one event per
change: ``added`` (a worker appeared), ``changed`` (its load, endpoint, capacity, GPU,
region or name changed; ``fields`` says which) and ``removed`` (``reason``: withdrawn,
expired, stale, or gone from the DHT). Every event has an ``id``; a client reconnecting
with ``Last-Event-ID`` gets what it missed, or a fresh snapshot when too much happened.

How changes are noticed, without trusting any single signal:

* **Periodic refresh.** While a service has watchers (or the dashboard pins it), its
  lookup is refreshed from the DHT every ``REFRESH_S`` (bypassing the cache, sharing the
  query with concurrent lookups; the answer also refreshes discovery's cache). This is
  what finds members appearing and disappearing anywhere in the network, even when this
  node stores none of the service's records. ``"*"`` (every worker, the dashboard's
  overview) is a crawl of every service-index shard with all their records, so it is
  refreshed every ``INDEX_REFRESH_S`` and, woken by a join, at most every
  ``INDEX_MIN_GAP_S``.
* **Local records.** A record the local DHT node stores (the ``"record"`` bus event)
  wakes the service's refresh at once; a withdrawal (tombstone) removes the worker at
  once, with reason ``withdrawn``.

Membership is what the DHT says (live, non-stale records listing the service), not
health: a worker inside a failure back-off is still a member (the dashboard shows its
state). One :class:`ServiceWatch` per watched service, shared by all its watchers; it is
kept for ``LINGER_S`` after the last one leaves so a reconnect can resume.

Bounds: at most ``MAX_WATCHERS`` streams per agent (503 JSON beyond), a bounded queue per
watcher (a reader that stops reading is dropped, see :mod:`agent.events`), at most
``MAX_SERVICES`` watched services, and members per snapshot as discovery bounds lookups.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agent import events
from agent.dht.record import ALL_SERVICES
from agent.discovery.api import BadRequest, check_service
from agent.discovery.select import record_max_age
from agent.ratelimit import RateLimiter

if TYPE_CHECKING:
    from agent.discovery.select import CandidateSet, RecordLike
    from agent.interfaces import AgentAPI, DiscoveryService

log = logging.getLogger("rma_agent.watch")
_LOG_LIMIT = RateLimiter(rate=0.1, burst=2)

REFRESH_S = 1.0          # a watched service's lookup is refreshed this often
INDEX_REFRESH_S = 10.0   # "*" (every worker: all index shards) at least this often...
INDEX_MIN_GAP_S = 2.0    # ...and, woken by joins, at most this often
# a member whose last record is still live is "gone from the DHT" only when this many
# refreshes in a row missed it over at least one of its own republish intervals (a live
# worker has republished by then): over a lossy WAN one lookup can miss live workers
# (issue 16: 30 agents, 2 % loss, every worker shown removed and re-added within seconds)
GONE_AFTER_MISSES = 3
GONE = "gone from the DHT"
LINGER_S = 60.0          # a watch without watchers is kept this long (resume, dashboard)
FIRST_LOOKUP_S = 3.0     # a new watcher waits at most this for the first answer
MAX_WATCHERS = 256
MAX_SERVICES = 64
HISTORY = 256
TOMBSTONES = 4096
FIELDS = ("name", "endpoint", "load", "capacity", "gpu", "gpu_memory_gb", "region")

ChangeHook = Callable[[str, str, dict[str, Any], str], None]


def member_view(rec: RecordLike) -> dict[str, Any]:
    """What a watcher is told about one member (no age or score: those drift every
    second and would turn every refresh into "changed" events)."""
    return {"id": rec.worker_id.hex(), "name": rec.name, "endpoint": rec.endpoint,
            "load": float(rec.load), "capacity": float(rec.capacity), "gpu": rec.gpu,
            "gpu_memory_gb": float(rec.gpu_memory_gb), "region": rec.region,
            "seq": rec.seq}


class ServiceWatch:
    """One watched service: its members, its event channel and its refresh loop."""

    def __init__(self, hub: WatchHub, service: str) -> None:
        self.hub = hub
        self.service = service
        self.channel = events.Channel(hub.limit, history=HISTORY, queue_size=hub.queue_size)
        self.members: dict[bytes, dict[str, Any]] = {}
        self.records: dict[bytes, RecordLike] = {}
        # member -> (refreshes in a row that missed it, time of the first of them)
        self.misses: dict[bytes, tuple[int, float]] = {}
        self.first_done = asyncio.Event()
        self.wake = asyncio.Event()
        self.pins = 0
        self.watchers = 0
        self.idle_since = time.monotonic()
        self.source = ""
        self.refreshes = 0
        self.task: asyncio.Task[None] | None = None

    # -------------------------------------------------------------- state
    @property
    def idle(self) -> bool:
        return self.watchers == 0 and self.pins == 0

    def snapshot(self) -> dict[str, Any]:
        return {"service": self.service, "source": self.source,
                "workers": list(self.members.values())}

    async def wait_first(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.first_done.wait(), FIRST_LOOKUP_S)

    # -------------------------------------------------------------- refresh
    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _LOG_LIMIT.log(log, logging.WARNING, f"watch:{self.service}",
                               "watch: refreshing %r failed: %r", self.service, exc)
            self.first_done.set()
            if self.idle and time.monotonic() - self.idle_since > LINGER_S:
                self.hub._retire(self)
                return
            self.wake.clear()
            period = self.hub.refresh_s
            if self.service == ALL_SERVICES:
                # every worker of the network: a crawl of every service-index shard
                # (agent.dht.keys), records and all. At most every INDEX_MIN_GAP_S (a
                # join wakes it), else every INDEX_REFRESH_S; per-service watches keep
                # their 1 s pace.
                await asyncio.sleep(INDEX_MIN_GAP_S)
                period = max(period, INDEX_REFRESH_S) - INDEX_MIN_GAP_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), period)

    async def refresh(self) -> None:
        comp = self.hub.discovery
        if comp is None:
            return
        entry, source = await comp.answer(self.service, True, paced=True)
        self.source = source
        self.refreshes += 1
        self.apply(entry.candidates, comp.clock())

    def apply(self, cs: CandidateSet, now: float) -> None:
        """Diff the live members of ``cs`` against the last known ones; publish."""
        current: dict[bytes, RecordLike] = {}
        for i, rec in enumerate(cs.records):
            tomb = self.hub.tombstones.get(rec.worker_id)
            # fresh by the record's own refresh (select.record_max_age), as lookups judge
            if cs.is_fresh(i, now) and (tomb is None or rec.issued_at > tomb):
                current[rec.worker_id] = rec
        for wid, rec in current.items():
            old = self.records.get(wid)
            if old is not None and rec.seq < old.seq:
                continue      # an older copy (another storing node lagging): keep ours
            view = member_view(rec)
            prev = self.members.get(wid)
            self.records[wid] = rec
            self.members[wid] = view
            if prev is None:
                self._publish("added", {"service": self.service, "worker": view})
            else:
                changed = [f for f in FIELDS if prev[f] != view[f]]
                if changed:
                    self._publish("changed", {"service": self.service, "worker": view,
                                              "fields": changed})
        for wid in current:
            self.misses.pop(wid, None)
        for wid in [w for w in self.members if w not in current]:
            reason = self._reason(wid, now, cs.max_age_s)
            if reason == GONE and not self._gone(wid, now, cs.max_age_s):
                continue            # its record is live: a missed lookup proves nothing
            self.misses.pop(wid, None)
            self.remove(wid, reason)

    def _gone(self, wid: bytes, now: float, max_age_s: float) -> bool:
        """Count one more miss of ``wid``; whether it has now been missed long enough."""
        count, since = self.misses.get(wid, (0, now))
        self.misses[wid] = (count + 1, since)
        rec = self.records.get(wid)
        interval = record_max_age(rec, max_age_s) / 2 if rec is not None else 0.0
        return count + 1 >= GONE_AFTER_MISSES and now - since >= interval

    def _reason(self, wid: bytes, now: float, max_age_s: float) -> str:
        rec = self.records.get(wid)
        tomb = self.hub.tombstones.get(wid)
        if tomb is not None and (rec is None or rec.issued_at <= tomb):
            return "withdrawn"
        if rec is not None and rec.expires_at <= now:
            return "expired"
        if rec is not None and now - rec.issued_at > record_max_age(rec, max_age_s):
            return "stale"
        return GONE

    def remove(self, wid: bytes, reason: str) -> None:
        view = self.members.pop(wid, None)
        self.records.pop(wid, None)
        self.misses.pop(wid, None)
        if view is not None:
            self._publish("removed", {"service": self.service, "worker": view,
                                      "reason": reason})

    def _publish(self, kind: str, data: dict[str, Any]) -> None:
        self.channel.publish(kind, data)
        hook = self.hub.on_change
        if hook is not None:
            try:
                hook(self.service, kind, data["worker"], data.get("reason", ""))
            except Exception:
                log.exception("watch: change hook failed")


class WatchHub:
    """Every :class:`ServiceWatch` of one agent, the watcher bound, and the HTTP route."""

    def __init__(self, agent: AgentAPI, *, max_watchers: int = MAX_WATCHERS,
                 refresh_s: float = REFRESH_S, queue_size: int = events.QUEUE_SIZE,
                 heartbeat_s: float = events.HEARTBEAT_S) -> None:
        self.agent = agent
        self.limit = events.SubscriberLimit(max_watchers)
        self.refresh_s = refresh_s
        self.queue_size = queue_size
        self.heartbeat_s = heartbeat_s
        self.watches: dict[str, ServiceWatch] = {}
        self.tombstones: OrderedDict[bytes, float] = OrderedDict()
        self.on_change: ChangeHook | None = None
        self.running = False

    @property
    def discovery(self) -> DiscoveryService | None:
        return self.agent.discovery

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.running = True
        self.agent.subscribe("record", self.observe_record)

    async def stop(self) -> None:
        self.running = False
        tasks = []
        for w in list(self.watches.values()):
            w.channel.close_all()
            if w.task is not None:
                w.task.cancel()
                tasks.append(w.task)
        self.watches.clear()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -------------------------------------------------------------- watches
    def get(self, service: str) -> ServiceWatch | None:
        """An existing watch (never creates one)."""
        return self.watches.get(service)

    def watch(self, service: str) -> ServiceWatch | None:
        """The watch of ``service``, started if needed; None when too many services are
        watched already."""
        w = self.watches.get(service)
        if w is not None:
            if w.task is None or w.task.done():
                w.task = asyncio.ensure_future(w.run())
            return w
        if len(self.watches) >= MAX_SERVICES:
            idle = [x for x in self.watches.values() if x.idle]
            if not idle:
                return None
            self._retire(min(idle, key=lambda x: x.idle_since))
        w = ServiceWatch(self, service)
        self.watches[service] = w
        w.task = asyncio.ensure_future(w.run())
        return w

    def pin(self, service: str) -> ServiceWatch | None:
        """Keep ``service`` refreshed (the dashboard shows it) until :meth:`unpin`."""
        w = self.watch(service)
        if w is not None:
            w.pins += 1
        return w

    def unpin(self, service: str) -> None:
        w = self.watches.get(service)
        if w is not None and w.pins > 0:
            w.pins -= 1
            if w.idle:
                w.idle_since = time.monotonic()

    def _retire(self, w: ServiceWatch) -> None:
        if self.watches.get(w.service) is w:
            del self.watches[w.service]
        w.channel.close_all()
        if w.task is not None and w.task is not asyncio.current_task():
            w.task.cancel()

    def observe_record(self, record: Any) -> None:
        """A record the local DHT node stored: withdrawals act now, others wake the
        watch's refresh."""
        try:
            wid = record.worker_id
            services = tuple(record.services)
            withdrawn = bool(record.withdrawn)
        except AttributeError:
            return
        if withdrawn:
            self.tombstones[wid] = float(record.issued_at)
            self.tombstones.move_to_end(wid)
            while len(self.tombstones) > TOMBSTONES:
                self.tombstones.popitem(last=False)
        else:
            prev = self.tombstones.get(wid)
            if prev is not None and record.issued_at > prev:
                del self.tombstones[wid]      # back after a restart
        for svc in (*services, ALL_SERVICES):   # "*": every worker (the dashboard's count)
            w = self.watches.get(svc)
            if w is None:
                continue
            if withdrawn and wid in w.members:
                w.remove(wid, "withdrawn")
            elif svc == ALL_SERVICES and wid in w.members:
                continue          # a known worker's refresh: not worth an index crawl
            w.wake.set()

    # -------------------------------------------------------------- HTTP
    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/services/{name}/watch``."""
        try:
            name = check_service(request.match_info["name"])   # lowercases what was typed
        except BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        extra = sorted(set(request.query) - {"last_event_id"})
        if extra:
            return web.json_response({"error": f"unknown parameter {extra[0]!r} "
                                               "(allowed: last_event_id)"}, status=400)
        if not self.running:
            return web.json_response({"error": "agent is stopping"}, status=503)
        if not self.limit.try_take():
            return events.too_many("watchers", self.limit)
        w = self.watch(name)
        if w is None:
            self.limit.release()
            return web.json_response(
                {"error": f"too many services watched ({MAX_SERVICES}); try again later"},
                status=503, headers={"Retry-After": "5"})
        w.watchers += 1
        last = events.parse_last_event_id(request)

        def first() -> list[bytes]:
            replay = w.channel.replay_after(last)
            if replay is not None:
                return replay
            return [events.frame("snapshot", w.snapshot(), w.channel.last_id)]

        def closed() -> None:
            w.watchers -= 1
            if w.idle:
                w.idle_since = time.monotonic()

        return await events.stream(request, w.channel, first, before=w.wait_first,
                                   heartbeat_s=self.heartbeat_s, on_close=closed)

    def stats(self) -> dict[str, Any]:
        return {"watchers": self.limit.current, "max_watchers": self.limit.maximum,
                "refused": self.limit.refused, "dropped_slow": self.limit.dropped,
                "services": sorted(self.watches)}
