"""The coordinator's fallback registry: who registered, from where, and the bounds.

Why the bounds are what they are (issues 11 and 20):

* **Per client and per network.** One IP may hold ``MAX_PER_IP`` workers (a NAT of many
  workers is one IP), and one network — its /24, IPv6 /64 — ``MAX_PER_PREFIX``: renting
  42 addresses of one /24 no longer multiplies the quota by 42. The same groups carry
  token buckets (``REGISTER_RATE`` per IP, ``PREFIX_RATE`` per network).
* **Room for newcomers.** The last ``RESERVE_FRACTION`` of ``REGISTRY_MAX`` places is
  only for a newcomer whose IP holds fewer than ``NEWCOMER_PER_IP`` workers and whose
  network fewer than ``NEWCOMER_PER_PREFIX``: whoever fills the open part (however many
  networks it spans) cannot take the reserve, and an honest worker from a network of its
  own still registers.
* **Never evict a live record.** A full registry (reserve included) refuses; it never
  pushes out an honest worker for a stranger that claims a longer life.
* **Kept at most ``dht.record_ttl``** past its registration, whatever lifetime the record
  claims (workers re-register every republish interval). ``republishable`` says whether
  a record's own expiry fits in that window: the coordinator republishes into the DHT
  only records that will not outlive their registry entry.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator

from agent.dht.record import WorkerRecord
from agent.netgroups import network_of
from agent.ratelimit import TokenBucket

REGISTRY_MAX = 10_000        # workers kept
RESERVE_FRACTION = 0.2       # the last 20 % of places: newcomers from small groups only
NEWCOMER_PER_IP = 4          # ... whose IP holds fewer than this many workers
NEWCOMER_PER_PREFIX = 16     # ... and whose /24 (/64) fewer than this many
MAX_PER_IP = 256             # workers whose latest registration came from one IP
MAX_PER_PREFIX = 256         # ... from one /24 (IPv4) or /64 (IPv6)
REGISTER_RATE = 5.0          # registrations per second per source IP (a NAT of many workers
REGISTER_BURST = 50.0        # re-registers every republish interval: 100 workers ~ 3/s)
PREFIX_RATE = 20.0           # registrations per second per /24 (/64)
PREFIX_BURST = 200.0
RATE_KEYS = 4096             # buckets kept per kind (least recently seen dropped)
SKEW_S = 30.0                # a worker's clock may run this far ahead (record.verify)


class _Buckets:
    """Token buckets per key, at most ``RATE_KEYS`` of them (oldest dropped)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._b: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str) -> bool:
        bucket = self._b.get(key)
        if bucket is None:
            if len(self._b) >= RATE_KEYS:
                self._b.popitem(last=False)
            bucket = self._b[key] = TokenBucket(self.rate, self.burst)
        else:
            self._b.move_to_end(key)
        return bucket.take()


class Registry:
    """Bounded map worker id -> newest registered record, with per-group counts."""

    def __init__(self, keep_s: Callable[[], float]) -> None:
        self._keep_s = keep_s                       # dht.record_ttl, read at each store
        self.records: dict[bytes, WorkerRecord] = {}
        self._until: dict[bytes, float] = {}        # worker -> kept until (TTL capped)
        self._src: dict[bytes, str] = {}            # worker -> IP of its latest registration
        self.per_ip: Counter[str] = Counter()
        self.per_prefix: Counter[str] = Counter()
        self._ip_rate = _Buckets(REGISTER_RATE, REGISTER_BURST)
        self._prefix_rate = _Buckets(PREFIX_RATE, PREFIX_BURST)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.records)

    def rate_ok(self, ip: str) -> str | None:
        """None when ``ip`` may register now; else which limit it hit ("ip", "prefix")."""
        if not self._ip_rate.take(ip):
            return "ip"
        if not self._prefix_rate.take(network_of(ip)):
            return "prefix"
        return None

    def republishable(self, record: WorkerRecord, now: float | None = None) -> bool:
        """True when ``record`` expires before its registry entry would (clock skew
        allowed): only such records go into the DHT, where nothing can forget them early."""
        now = time.time() if now is None else now
        return record.expires_at <= now + self._keep_s() + SKEW_S

    # ------------------------------------------------------------------ upkeep
    def expire(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for wid in [w for w, r in self.records.items()
                    if min(r.expires_at, self._until.get(w, r.expires_at)) <= now]:
            self.forget(wid)

    def forget(self, wid: bytes) -> None:
        self.records.pop(wid, None)
        self._until.pop(wid, None)
        ip = self._src.pop(wid, None)
        if ip is not None:
            for counter, key in ((self.per_ip, ip), (self.per_prefix, network_of(ip))):
                n = counter[key] - 1
                if n > 0:
                    counter[key] = n
                else:
                    del counter[key]

    def drop_where(self, pred: Callable[[WorkerRecord], bool]) -> int:
        gone = [w for w, r in self.records.items() if pred(r)]
        for wid in gone:
            self.forget(wid)
        return len(gone)

    # ------------------------------------------------------------------ store
    def _refusal(self, source: str, now: float) -> str | None:
        """Why a newcomer from ``source`` may not take a place, or None."""
        if not source:
            return "full" if len(self.records) >= REGISTRY_MAX else None
        prefix = network_of(source)
        if self.per_ip[source] >= MAX_PER_IP:
            return "ip_full"
        if self.per_prefix[prefix] >= MAX_PER_PREFIX:
            return "prefix_full"
        open_places = REGISTRY_MAX - int(REGISTRY_MAX * RESERVE_FRACTION)
        if len(self.records) < open_places:
            return None
        self.expire(now)
        n = len(self.records)
        if n >= REGISTRY_MAX:
            return "full"
        if n < open_places:
            return None
        small = (self.per_ip[source] < NEWCOMER_PER_IP
                 and self.per_prefix[prefix] < NEWCOMER_PER_PREFIX)
        return None if small else "reserved"

    def store(self, record: WorkerRecord, source: str = "", now: float | None = None) -> str:
        """Keep ``record`` if newest for its worker: "stored", "duplicate", "stale", or a
        refusal of a newcomer: "ip_full", "prefix_full", "reserved", "full"."""
        now = time.time() if now is None else now
        old = self.records.get(record.worker_id)
        if old is not None:
            if record.seq == old.seq:
                return "duplicate"
            if record.seq < old.seq:
                return "stale"
            self.forget(record.worker_id)
        else:
            why = self._refusal(source, now)
            if why is not None:
                return why
        self.records[record.worker_id] = record
        self._until[record.worker_id] = min(record.expires_at, now + self._keep_s())
        if source:
            self._src[record.worker_id] = source
            self.per_ip[source] += 1
            self.per_prefix[network_of(source)] += 1
        return "stored"
