"""Per-service answer cache with early invalidation (single-flight is agent.concurrency).

Why cache at all: a DHT lookup is a network crawl (several round trips), while callers
ask the same few questions ("who serves llm-inference?") many times a second. An entry is
the *candidate set* (records as arrays), not a ranked answer: ranking is redone on each
call, so reports, probes and ageing show at once even on a cached entry.

An entry is fresh until the first of:

* ``fetched_at + discovery.cache_ttl``;
* the moment its first record would turn stale or expire (``min(expires_at,
  issued_at + 2*refresh)`` over its records, ``refresh`` being each record's own) — past that the answer would
  shrink while the DHT already holds the worker's refreshed record, so ask again;
* an early invalidation: a cached worker was reported (or probed) failed, or a newer
  record of a cached worker was seen elsewhere (another lookup, or the local DHT node
  storing it — the ``"record"`` event) that changes what an answer says: withdrawn,
  new endpoint, services, GPU, capacity or region, or load moved by a whole slot; or a
  live record, issued after the entry was fetched, of a worker the entry lacks (a new
  worker, or one back from a restart or a package upgrade).

An empty answer is cached for at most ``NEGATIVE_TTL_S`` (a lookup storm for a service
nobody serves must not become a DHT storm, but a new worker must show up quickly).
Entries past freshness are kept (bounded, LRU) as a last resort: when the DHT *and* the
coordinators fail, the stale entry answers (source ``cache``) rather than nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from agent.discovery.select import CandidateSet, RecordLike

NEGATIVE_TTL_S = 5.0
# A record issued this long before an answer was fetched may still have been on its way to
# the nodes the query asked (UDP, a busy storing node): not proof that the answer saw it.
IN_TRANSIT_S = 2.0
LOAD_DELTA = 1.0         # a load change of a whole slot is news (workers re-announce on it)
MAX_SERVICES = 1024


@dataclass
class CacheEntry:
    candidates: CandidateSet
    source: str            # where the candidates came from: "dht" | "coordinator"
    fetched_at: float
    valid_until: float

    def fresh(self, now: float) -> bool:
        return now < self.valid_until


class ServiceCache:
    """Service name -> :class:`CacheEntry`, bounded LRU."""

    def __init__(self, ttl_s: float, max_services: int = MAX_SERVICES,
                 negative_ttl_s: float = NEGATIVE_TTL_S) -> None:
        self.ttl_s = float(ttl_s)
        self.max_services = max_services
        self.negative_ttl_s = negative_ttl_s
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self.invalidations = 0
        # service -> {worker id: newest record observed} while a query for it is in flight:
        # a record stored locally during the query may be missing from its answer.
        self._inflight: dict[str, dict[bytes, RecordLike]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, service: str) -> bool:
        return service in self._entries

    def get(self, service: str, now: float) -> CacheEntry | None:
        """The entry if it is still fresh, else None."""
        entry = self._entries.get(service)
        if entry is None or not entry.fresh(now):
            return None
        return entry

    def get_any(self, service: str) -> CacheEntry | None:
        """The entry even past freshness (last-resort answers)."""
        return self._entries.get(service)

    def begin(self, service: str) -> None:
        """A query for ``service`` starts: records observed until its ``put`` (or ``end``)
        are checked against its answer."""
        self._inflight[service] = {}

    def end(self, service: str) -> None:
        """The query for ``service`` finished without ``put`` (or after it)."""
        self._inflight.pop(service, None)

    def put(self, service: str, candidates: CandidateSet, source: str,
            now: float) -> CacheEntry:
        if len(candidates):
            until = min(now + self.ttl_s, candidates.fresh_until)
        else:
            until = now + min(self.ttl_s, self.negative_ttl_s)
        # A record that arrived while the query ran and that its answer lacks (or holds in
        # a materially older form) makes the answer outdated on arrival: keep it (a last
        # resort) but not fresh, so the next lookup asks again instead of serving it until
        # it expires (a restarted worker would stay invisible for NEGATIVE_TTL_S).
        for wid, rec in self._inflight.pop(service, {}).items():
            i = candidates.index.get(wid)
            if (not rec.withdrawn if i is None else
                    candidates.records[i].seq < rec.seq
                    and material_change(candidates.records[i], rec)):
                until = 0.0
                self.invalidations += 1
                break
        entry = CacheEntry(candidates, source, now, until)
        self._entries[service] = entry
        self._entries.move_to_end(service)
        while len(self._entries) > self.max_services:
            self._entries.popitem(last=False)
        return entry

    def invalidate(self, service: str) -> bool:
        entry = self._entries.get(service)
        if entry is None or entry.valid_until == 0.0:
            return False
        entry.valid_until = 0.0
        self.invalidations += 1
        return True

    def invalidate_worker(self, worker_id: bytes) -> int:
        """Invalidate every entry holding ``worker_id``; how many were."""
        hit = [s for s, e in self._entries.items() if worker_id in e.candidates.index]
        return sum(self.invalidate(s) for s in hit)

    def observe(self, records: Iterable[RecordLike], except_service: str | None = None) -> int:
        """Invalidate entries whose copy of a worker is materially older than one of
        ``records`` (withdrawn, moved, changed services/GPU/capacity/region, or a load
        change of at least one slot), or that lack a live worker of the service whose
        record was issued after (or within ``IN_TRANSIT_S`` before) the entry was fetched
        (a new or restarted worker). A
        plain refresh (same content, newer ``seq``) is not a reason: workers refresh
        every ``republish_interval``, and invalidating on each would make the cache
        useless for large services."""
        newest: dict[bytes, RecordLike] = {}
        for rec in records:
            cur = newest.get(rec.worker_id)
            if cur is None or rec.seq > cur.seq:
                newest[rec.worker_id] = rec
        for service, seen in self._inflight.items():
            if service == except_service:
                continue
            for wid, rec in newest.items():
                if service in rec.services and (wid not in seen or seen[wid].seq < rec.seq):
                    seen[wid] = rec
        count = 0
        for service, entry in list(self._entries.items()):
            if service == except_service or entry.valid_until == 0.0:
                continue
            cs = entry.candidates
            for wid, rec in newest.items():
                i = cs.index.get(wid)
                if i is None:
                    # A worker the answer lacks, live, serving this service and issued
                    # after (or just before: it was in transit while the query ran) the
                    # entry was fetched: new, or back after a restart (its withdrawal
                    # emptied the answer). Without this a restarted worker stays invisible
                    # until the entry expires (NEGATIVE_TTL_S when empty).
                    if not rec.withdrawn and service in rec.services \
                            and rec.issued_at > entry.fetched_at - IN_TRANSIT_S:
                        count += self.invalidate(service)
                        break
                elif cs.records[i].seq < rec.seq and material_change(cs.records[i], rec):
                    count += self.invalidate(service)
                    break
        return count

    def set_ttl(self, ttl_s: float) -> None:
        self.ttl_s = float(ttl_s)

    def clear(self) -> None:
        self._entries.clear()

    def items(self) -> list[tuple[str, CacheEntry]]:
        return list(self._entries.items())


def material_change(old: RecordLike, new: RecordLike) -> bool:
    """Whether ``new`` would change what an answer says about the worker."""
    return (new.withdrawn != old.withdrawn or new.endpoint != old.endpoint
            or tuple(new.services) != tuple(old.services) or new.gpu != old.gpu
            or new.gpu_memory_gb != old.gpu_memory_gb or new.capacity != old.capacity
            or new.region != old.region or abs(new.load - old.load) >= LOAD_DELTA)
