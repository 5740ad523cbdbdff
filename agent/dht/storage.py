"""Provider storage: many signed worker records per service key, bounded (SPEC §6).

Replaces kademlia's ``ForgetfulStorage``, which holds one opaque value per key that any
peer may overwrite. Here a key maps to at most one record *per worker*:

* newest ``seq`` wins; an equal seq keeps the stored copy; a lower seq (a replay) is
  refused — so only the holder of a worker's private key can replace its record;
* a record is dropped at its own ``expires_at`` (lazily on access, and by ``cull(now)``
  which the node runs periodically);
* a withdrawn record (tombstone) is kept until its expiry so that replays of the older,
  live record are refused, but ``get`` never returns it.

Bounds (memory stays flat whatever peers send): ``max_per_key`` records per key,
``max_keys`` keys, ``max_total`` records overall, and per *host* (:mod:`agent.dht.quota`)
— the sender's IP, not ``(ip, port)`` — ``max_per_sender`` records whose latest copy came
from one host and ``max_per_prefix`` from one /24 (IPv6 /64). A coordinator republishes
the records of many workers from one address; list its IP (or ``(ip, port)``) in
``trusted`` and its records count against the workers' endpoint hosts instead of against
it (still bounded: issue 20). Records stored by this node itself (``sender=None``) count
nowhere.

Eviction when a key (or the whole store) is full never drops an honest record to make
room for a newer stranger: the victim is a record of the host holding the most records
under that key, and only if that host holds at least two more than the newcomer's host
would (a flooder's records go first; a key full of one-record-per-host workers refuses
newcomers, ``key_full``). Expiry time plays no part: a long-TTL record does not outrank
an honest 300 s one.

Answers (``get``): at most ``limit`` (default ``ANSWER_LIMIT`` = 20) live records: half
the best-ranked (lowest ``load / capacity``, then freshest ``issued_at``), half a random
sample of the rest — or, for an asker passing ``page``, page ``page % pages`` of the rest
in worker-id order (``pages()``): a lookup asks each node for a different page, then the
pages it still misses (up to 8), so it sees every worker of a service of up to ~150, a
fair sample beyond; id ranges and sketches (:mod:`agent.dht.listing`) read the rest. 20
records of the maximum size (340 bytes) plus 20 contacts always fit one 8 KiB datagram.
"""

from __future__ import annotations

import bisect
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kademlia.storage import IStorage

from agent.dht.diversity import DiversityPolicy
from agent.dht.listing import range_of, sketch_of
from agent.dht.quota import QuotaBook, endpoint_groups
from agent.dht.record import RecordError, WorkerRecord

log = logging.getLogger(__name__)

ANSWER_LIMIT = 20
MAX_PER_KEY = 10_240        # a service of 10,000 workers fits under one key
STALE_REFRESHES = 2.0       # a record is stale after this many of its own refreshes
Sender = tuple[str, int] | None


def is_stale(record: WorkerRecord, now: float) -> bool:
    """The worker missed two of its own refreshes (``refresh``): callers stop offering
    it (``agent.discovery.select.record_max_age``, the same rule)."""
    return now - record.issued_at > STALE_REFRESHES * record.refresh


class _Entry:
    __slots__ = ("encoded", "host", "prefix", "record", "sender", "stored_at")

    def __init__(self, record: WorkerRecord, sender: Sender, stored_at: float,
                 host: Any = None, prefix: Any = None) -> None:
        self.record = record
        self.encoded = record.encode()
        self.sender = sender
        self.stored_at = stored_at
        # the quota groups this entry counts in (None: local or trusted, not counted)
        self.host = host
        self.prefix = prefix


class ProviderStorage(IStorage):
    """Bounded map ``key -> {worker_id -> newest signed record}``.

    ``put`` returns a short status string (``"stored"`` or a refusal reason) so the
    protocol can count refusals by reason.
    """

    def __init__(
        self,
        *,
        max_per_key: int = MAX_PER_KEY,
        max_keys: int = 4096,
        max_per_sender: int = 64,
        max_per_prefix: int | None = None,
        max_total: int = 50_000,
        trusted: Iterable[Any] = (),
        max_skew: float = 30.0,
        rng: random.Random | None = None,
        diversity: DiversityPolicy | None = None,
        admit: Callable[[WorkerRecord, float], str | None] | None = None,
        on_stored: Callable[[WorkerRecord], None] | None = None,
    ) -> None:
        self.max_per_key = max_per_key
        self.max_keys = max_keys
        self.quota = QuotaBook(max_per_sender, 4 * max_per_sender if max_per_prefix is None
                               else max_per_prefix)
        self.max_total = max_total
        self.diversity = diversity if diversity is not None else DiversityPolicy.from_env()
        self.trusted: set[Any] = set(trusted)
        self.max_skew = max_skew
        self._rng = rng or random.Random()
        self._data: dict[bytes, dict[bytes, _Entry]] = {}
        self.evicted = 0
        self._no_flooder: set[bytes] = set()   # full keys known to hold no flooder
        self._total = 0
        self._last_cull = 0.0
        self.refused: Counter[str] = Counter()
        # key -> (earliest expiry among them, live entries ranked best first); answers
        # are served from here until the key changes or its first entry expires
        self._ranked: dict[bytes, tuple[float, list[_Entry]]] = {}
        # key -> worker ids in ascending order (range listing pages through it)
        self._order: dict[bytes, list[bytes]] = {}
        # key -> (earliest expiry, sketch of the live records), see ``sketch``
        self._sketch: dict[bytes, tuple[float, list[list[int]]]] = {}
        # called with each record that replaced or added an entry (the agent turns it
        # into its "record" bus event, so cached lookup answers learn of withdrawals)
        self.on_stored: Callable[[WorkerRecord], None] | None = on_stored
        # closed networks (agent.admission): refusal reason for a record, or None to admit
        self.admit: Callable[[WorkerRecord, float], str | None] | None = admit

    # ------------------------------------------------------------------ writes
    def put(self, key: bytes, record: WorkerRecord, *, sender: Sender = None,
            now: float | None = None, verify: bool = True) -> str:
        """Store ``record`` under ``key``; return "stored", "same" (equal seq, kept the
        existing copy) or the refusal reason ("invalid", "wrong_key", "not_admitted",
        "stale", "key_full", "sender_full", "total_full", "too_many_keys")."""
        now = time.time() if now is None else now
        status = self._put(key, record, sender, now, verify)
        if status not in ("stored", "same"):
            self.refused[status] += 1
        elif status == "stored" and self.on_stored is not None:
            try:
                self.on_stored(record)
            except Exception:  # an observer must never break storing
                log.debug("storage: on_stored observer failed", exc_info=True)
        return status

    def _put(self, key: bytes, record: WorkerRecord, sender: Sender, now: float,
             verify: bool) -> str:
        if verify:
            try:
                record.verify(now, self.max_skew)
            except RecordError:
                return "invalid"
        elif record.is_expired(now):
            return "invalid"
        if not record.serves(key):
            return "wrong_key"
        if self.admit is not None and self.admit(record, now) is not None:
            return "not_admitted"
        bucket = self._data.get(key)
        old = bucket.get(record.worker_id) if bucket is not None else None
        if old is not None and old.record.expires_at <= now:
            self._remove(key, bucket, record.worker_id)  # type: ignore[arg-type]
            old = None
        host, prefix = self._groups(sender, record)
        if old is not None:
            if record.seq < old.record.seq:
                return "stale"
            if record.seq == old.record.seq:
                return "same"
            if host != old.host and self._sender_full(host, prefix):
                return "sender_full"
            self._uncount(old)
            entry = _Entry(record, sender, now, host, prefix)
            self._count(entry)
            bucket[record.worker_id] = entry  # type: ignore[index]
            self._ranked.pop(key, None)
            self._sketch.pop(key, None)
            self._no_flooder.discard(key)
            return "stored"
        # a new worker under this key
        if self._sender_full(host, prefix):
            return "sender_full"
        if self._total >= self.max_total:
            self.cull(now, force=False)
            if self._total >= self.max_total and not (
                    bucket and self._evict_flooder(key, bucket, host)):
                return "total_full"
        if bucket is None:
            if len(self._data) >= self.max_keys:
                self.cull(now, force=False)
                if len(self._data) >= self.max_keys:
                    return "too_many_keys"
            bucket = self._data[key] = {}
        elif len(bucket) >= self.max_per_key and not self._evict_flooder(key, bucket, host):
            return "key_full"
        entry = _Entry(record, sender, now, host, prefix)
        bucket[record.worker_id] = entry
        self._ranked.pop(key, None)
        self._sketch.pop(key, None)
        self._no_flooder.discard(key)
        order = self._order.get(key)
        if order is not None:
            bisect.insort(order, record.worker_id)
        self._count(entry)
        self._total += 1
        return "stored"

    def _is_trusted(self, sender: Sender) -> bool:
        return sender is not None and (sender in self.trusted or sender[0] in self.trusted)

    def _groups(self, sender: Sender, record: WorkerRecord) -> tuple[Any, Any]:
        """(host, prefix) the quotas count a record from ``sender`` in: the sender's, or
        for a trusted republisher the record's endpoint host's; (None, None) when this
        node stores it itself."""
        if sender is None:
            return None, None
        if self._is_trusted(sender):
            return endpoint_groups(record, self.diversity)
        ip, port = sender
        return self.diversity.host(ip, port), self.diversity.prefix(ip, port)

    def _sender_full(self, host: Any, prefix: Any) -> bool:
        return self.quota.full(host, prefix)

    def _evict_flooder(self, key: bytes, bucket: dict[bytes, _Entry], host: Any) -> bool:
        """Make room under ``key`` for a record of ``host`` by dropping one record of the
        host holding the most there, if it holds at least two more than ``host`` would;
        never one this node stored itself (relayed ones count as their endpoint's host).
        True if one was dropped. A key found to hold no host with two or more records is
        remembered (``_no_flooder``, cleared by any change to the key): a full key of
        one-record hosts refuses newcomers without rescanning."""
        if key in self._no_flooder:
            return False
        per_host: Counter[Any] = Counter(e.host for e in bucket.values() if e.host is not None)
        heavy, n = per_host.most_common(1)[0] if per_host else (None, 0)
        if n < 2:
            self._no_flooder.add(key)
            return False
        mine = per_host.get(host, 0) if host is not None else 0
        if n < mine + 2:
            return False
        victim = min((w for w, e in bucket.items() if e.host == heavy),
                     key=lambda w: bucket[w].stored_at)
        self._remove(key, bucket, victim)
        self.evicted += 1
        return True

    def _count(self, entry: _Entry) -> None:
        self.quota.count(entry.host, entry.prefix)

    def _uncount(self, entry: _Entry) -> None:
        self.quota.uncount(entry.host, entry.prefix)

    def _remove(self, key: bytes, bucket: dict[bytes, _Entry], worker_id: bytes) -> None:
        entry = bucket.pop(worker_id)
        self._ranked.pop(key, None)
        self._sketch.pop(key, None)
        self._no_flooder.discard(key)
        order = self._order.get(key)
        if order is not None:
            i = bisect.bisect_left(order, worker_id)
            if i < len(order) and order[i] == worker_id:
                del order[i]
        self._uncount(entry)
        self._total -= 1
        if not bucket:
            self._data.pop(key, None)
            self._order.pop(key, None)

    def cull(self, now: float | None = None, *, force: bool = True) -> int:
        """Drop every expired record (tombstones included); return how many.
        ``force=False`` skips the scan when one ran less than a second ago, so a flood
        of refused puts cannot turn into repeated full scans."""
        now = time.time() if now is None else now
        if not force and now - self._last_cull < 1.0:
            return 0
        self._last_cull = now
        dropped = 0
        for key in list(self._data):
            bucket = self._data[key]
            for wid in [w for w, e in bucket.items() if e.record.expires_at <= now]:
                self._remove(key, bucket, wid)
                dropped += 1
        return dropped

    def drop_where(self, pred: Callable[[WorkerRecord], bool]) -> int:
        """Remove every record (tombstones included) for which ``pred`` is true; how
        many. Used when a revocation list or an expired certificate removes a worker."""
        dropped = 0
        for key in list(self._data):
            bucket = self._data[key]
            for wid in [w for w, e in bucket.items() if pred(e.record)]:
                self._remove(key, bucket, wid)
                dropped += 1
        return dropped

    # ------------------------------------------------------------------ reads
    def _live(self, key: bytes, now: float) -> list[_Entry]:
        bucket = self._data.get(key)
        if not bucket:
            return []
        live: list[_Entry] = []
        expired: list[bytes] = []
        for wid, e in bucket.items():
            if e.record.expires_at <= now:
                expired.append(wid)
            elif not e.record.withdrawn:
                live.append(e)
        for wid in expired:
            self._remove(key, bucket, wid)
        return live

    @staticmethod
    def _rank(e: _Entry) -> tuple[float, float]:
        r = e.record
        return (r.load / r.capacity if r.capacity > 0 else float("inf"), -r.issued_at)

    def _ranked_live(self, key: bytes, now: float) -> list[_Entry]:
        hit = self._ranked.get(key)
        if hit is not None and now < hit[0]:
            return hit[1]
        live = self._live(key, now)
        live.sort(key=self._rank)
        bucket = self._data.get(key)
        if bucket:
            first_exp = min(e.record.expires_at for e in bucket.values())
            self._ranked[key] = (first_exp, live)
        return live

    def _sample(self, key: bytes, limit: int | None, now: float,
                page: int | None = None) -> list[_Entry]:
        live = list(self._ranked_live(key, now))
        limit = ANSWER_LIMIT if limit is None else max(0, limit)
        if len(live) <= limit:
            return live
        best = (limit + 1) // 2
        rest, m = live[best:], limit - best
        if page is None or m == 0:
            return live[:best] + self._rng.sample(rest, m)
        # page ``page % pages`` of the rest in worker-id order: a lookup that asks its
        # nodes for different pages (and fetches any page it missed) sees every record
        rest.sort(key=lambda e: e.record.worker_id)
        idx = page % -(-len(rest) // m)
        return live[:best] + rest[idx * m:(idx + 1) * m]

    def pages(self, key: bytes, limit: int | None = None,
              now: float | None = None) -> tuple[int, int]:
        """``(live records, pages)`` for ``key``: how many pages of the non-best records
        an answer of ``limit`` has (0 when one answer holds everything)."""
        now = time.time() if now is None else now
        n = len(self._ranked_live(key, now))
        limit = ANSWER_LIMIT if limit is None else max(0, limit)
        if n <= limit:
            return n, 0
        m = limit - (limit + 1) // 2
        return n, (-(-(n - (limit + 1) // 2) // m) if m else 0)

    def get(self, key: bytes, limit: int | None = None, now: float | None = None,
            default: Any = None) -> Any:
        """Up to ``limit`` (default 20) live, non-withdrawn records for ``key``: the best
        half by (utilisation, freshness) plus a random sample of the rest (see module doc).

        Also serves kademlia's ``IStorage.get(key, default)`` call shape: when nothing is
        stored for ``key`` and ``default`` was given, returns ``default``.
        """
        now = time.time() if now is None else now
        recs = [e.record for e in self._sample(key, limit, now)]
        if not recs and default is not None:
            return default
        return recs

    def get_encoded(self, key: bytes, limit: int | None = None,
                    now: float | None = None, page: int | None = None) -> list[bytes]:
        """Like ``get`` but the canonical bytes (what the find_providers RPC sends).
        ``page`` replaces the random half by page ``page`` of the non-best records in
        worker-id order (the lookup asks each node for a different page)."""
        now = time.time() if now is None else now
        return [e.encoded for e in self._sample(key, limit, now, page)]

    def tombstones(self, key: bytes, *, since: float, limit: int = 8,
                   now: float | None = None) -> list[bytes]:
        """Encoded tombstones for ``key`` issued after ``since`` (newest first). Sent
        alongside live records so a lookup that also hears an older live copy from a
        node that missed the withdrawal still drops the worker (merge by newest seq)."""
        now = time.time() if now is None else now
        bucket = self._data.get(key) or {}
        ts = [e for e in bucket.values()
              if e.record.withdrawn and e.record.issued_at >= since and e.record.expires_at > now]
        ts.sort(key=lambda e: -e.record.issued_at)
        return [e.encoded for e in ts[:limit]]

    def range_encoded(self, key: bytes, start: bytes, end: bytes, budget: int,
                      now: float | None = None) -> tuple[list[bytes], bytes | None]:
        """Encoded records (tombstones included) of the workers with ``start <= id <
        end`` (``end == b""``: to the end of the id space), in worker-id order, within
        ``budget`` bytes; and the id to continue from (:func:`listing.range_of`)."""
        now = time.time() if now is None else now
        bucket = self._data.get(key)
        if not bucket:
            return [], None
        order = self._order.get(key)
        if order is None or len(order) != len(bucket):
            order = self._order[key] = sorted(bucket)
        return range_of(order, bucket, start, end, budget, now)

    def sketch(self, key: bytes, now: float | None = None) -> list[list[int]]:
        """The ``[count, xor]`` sketch of the live workers of ``key``
        (:mod:`agent.dht.listing`), cached until the key's first expiry."""
        now = time.time() if now is None else now
        hit = self._sketch.get(key)
        if hit is not None and now < hit[0]:
            return hit[1]
        out = sketch_of(e.record.worker_id for e in self._live(key, now))
        first_exp = min((e.record.expires_at for e in (self._data.get(key) or {}).values()),
                        default=float("inf"))
        self._sketch[key] = (first_exp, out)
        return out

    def service_counts(self, key: bytes, now: float | None = None) -> dict[str, int]:
        """Live workers per service name among the records under ``key`` (the answer
        of a service-index shard: names and counts, not the records). Live is what
        lookups offer: unexpired *and* not stale by the record's own ``refresh``
        (``is_stale``), so a worker gone without a goodbye leaves the counts when it
        leaves lookups, not at its TTL."""
        now = time.time() if now is None else now
        counts: dict[str, int] = {}
        for e in self._live(key, now):
            if is_stale(e.record, now):
                continue
            for svc in e.record.services:
                counts[svc] = counts.get(svc, 0) + 1
        return counts

    def snapshot(self, key: bytes, now: float | None = None) -> list[WorkerRecord]:
        """Every unexpired record under ``key``, tombstones included (for merging)."""
        now = time.time() if now is None else now
        return [e.record for e in (self._data.get(key) or {}).values()
                if e.record.expires_at > now]

    def record(self, key: bytes, worker_id: bytes) -> WorkerRecord | None:
        """The stored record (withdrawn or not) of one worker under ``key``."""
        e = (self._data.get(key) or {}).get(worker_id)
        return e.record if e is not None else None

    def keys(self) -> list[bytes]:
        return list(self._data)

    def count(self, key: bytes | None = None) -> int:
        """Records held (tombstones included), for one key or in total."""
        if key is None:
            return self._total
        return len(self._data.get(key) or ())

    def sender_count(self, sender: tuple[str, int]) -> int:
        """Records counted against ``sender``'s host (every port of its IP)."""
        ip, port = sender
        return self.quota.by_sender.get(self.diversity.host(ip, port), 0)

    @property
    def max_per_sender(self) -> int:
        return self.quota.max_per_sender

    @property
    def max_per_prefix(self) -> int:
        return self.quota.max_per_prefix

    def stats(self) -> dict[str, Any]:
        withdrawn = sum(1 for b in self._data.values() for e in b.values() if e.record.withdrawn)
        return {"keys": len(self._data), "records": self._total - withdrawn,
                "tombstones": withdrawn, "senders": len(self.quota.by_sender),
                "evicted": self.evicted, "refused": dict(self.refused)}

    def __len__(self) -> int:
        return self._total

    # ------------------------------------------------ kademlia IStorage surface
    # Plain kademlia values are not accepted: rpc_store is refused by RMAProtocol, and
    # these methods keep kademlia's own code paths (Server.get/set, republish, welcome)
    # inert instead of letting them store unsigned data.
    def __setitem__(self, key: bytes, value: Any) -> None:
        raise TypeError("ProviderStorage holds signed WorkerRecords only; use put()")

    def __getitem__(self, key: bytes) -> list[WorkerRecord]:
        recs = self.get(key)
        if not recs:
            raise KeyError(key)
        return recs

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, Any]]:
        return []

    def __iter__(self) -> Iterator[tuple[bytes, Any]]:
        return iter(())
