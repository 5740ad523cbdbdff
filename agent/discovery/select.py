"""Filter and rank the workers of one service; pick the first slot at random among the best 3.

The rule, exactly (what ``GET /api/services/{name}`` returns, best first):

1. **Dropped, never returned:** records that are withdrawn, expired (``expires_at <= now``),
   stale (``now - issued_at > 2 * refresh``: the worker missed two of *its own* refreshes;
   ``refresh`` is the record's field, the caller's ``republish_interval`` only for records
   that do not carry one),
   records of a worker currently failing (reported or probed failed and still inside its
   back-off, see :mod:`agent.discovery.latency`), and records that do not list the service.
   Of several records of one worker the highest ``seq`` is kept.
2. **Filters** (query parameters): ``region`` (case-insensitive equality), ``gpu`` (same GPU
   class, see :mod:`agent.discovery.gpu_classes`), ``min_gpu_memory_gb``.
3. **Score** (``_fast.score_values``: the Cython kernel, or its pure-Python twin)::

       free   = clamp((capacity - load) / capacity, 0, 1)      (0 when capacity <= 0)
       lat    = latency_ms / (latency_ms + 50)                 (0.5 while unmeasured)
       age    = (now - issued_at) / (2 * refresh)
       score  = 1.0*free + 0.6*gpu_class + 0.4*same_region - 0.5*lat - 0.1*age

   Free capacity weighs most (it is what spreads work), a better GPU class is worth up to
   0.6, the caller's own region 0.4 (the ``prefer_region`` query parameter, else the
   answering agent's ``agent.region``; with a ``region`` filter every answer is in that
   region anyway), a slow worker loses up to 0.5 and a record near staleness 0.1. Ties
   go to the earlier record (the order the DHT returned).
4. **Spread:** the first slot is drawn uniformly at random among the best three; the other
   two keep their order behind it, rank 4 and later are untouched. With one candidate
   there is nothing to draw. The generator is a ``random.Random`` the caller owns, so tests
   seed it and get the same answer every time.
5. At most ``limit`` (itself at most ``discovery.max_results``) workers are returned.

Why arrays: a lookup on a cached service re-ranks on every call (ages, latencies and
failures change), and converting per-record objects to kernel inputs each time costs as
much as the scoring itself. A :class:`CandidateSet` therefore holds one service's records
as parallel ``array('d')`` columns, built once per DHT answer; per ranking only the age,
health and (when the latency tracker changed) latency columns are rebuilt. (The service
layer additionally reuses a rendered ranking for up to 100 ms while the tracker does not
change; the top-3 draw is still made on every lookup.)
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from _fast import score_values
from agent.discovery.gpu_classes import GpuScorer

# (w_free, w_gpu, w_region, w_latency, w_age) — see the module docstring
DEFAULT_WEIGHTS: tuple[float, float, float, float, float] = (1.0, 0.6, 0.4, 0.5, 0.1)
TOP_RANDOM = 3           # the first slot is drawn among this many
UNKNOWN_LATENCY = -1.0   # kernel convention: < 0 (or NaN) means "not measured yet"


T = TypeVar("T")


class RecordLike(Protocol):
    """The fields of ``agent.dht.record.WorkerRecord`` that selection reads."""

    worker_id: bytes
    name: str
    services: tuple[str, ...]
    endpoint: str
    gpu: str
    gpu_memory_gb: float
    load: float
    capacity: float
    region: str
    seq: int
    issued_at: float
    expires_at: float
    withdrawn: bool


class HealthView(Protocol):
    """What ranking needs from the latency tracker (:class:`LatencyTracker`)."""

    version: int

    def current_bans(self, now: float) -> Mapping[bytes, float]: ...

    def latency_ms(self, worker_id: bytes) -> float: ...


@dataclass(frozen=True)
class Query:
    """Filters and preferences of one lookup (already validated by the API layer)."""

    limit: int = 50
    region: str | None = None           # filter: only this region
    gpu: str | None = None              # filter: only this GPU class
    min_gpu_memory_gb: float | None = None
    caller_region: str = ""             # preference: ranks this region first


def _finite(x: Any, default: float) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


def record_max_age(rec: RecordLike, default: float) -> float:
    """How long ``rec`` stays fresh after ``issued_at``: two of the worker's own
    republish intervals (the record's ``refresh``), ``default`` when it carries none."""
    r = getattr(rec, "refresh", None)
    if type(r) in (int, float) and math.isfinite(r) and r > 0:
        return 2.0 * float(r)
    return float(default)


def newest_per_worker(records: Iterable[RecordLike]) -> list[RecordLike]:
    """One record per worker, the highest ``seq``; order of first appearance kept."""
    best: dict[bytes, RecordLike] = {}
    for rec in records:
        cur = best.get(rec.worker_id)
        if cur is None or rec.seq > cur.seq:
            best[rec.worker_id] = rec
    return list(best.values())


class CandidateSet:
    """One service's usable records as parallel columns, ready for the scoring kernel.

    Built from a DHT (or coordinator) answer; withdrawn, expired and stale records and
    records not listing ``service`` are left out at build time. ``service == "*"`` (the
    all-services key) keeps every record.
    """

    _MEMO_MAX = 64

    def __init__(self, service: str, records: Iterable[RecordLike], scorer: GpuScorer,
                 now: float, max_age_s: float) -> None:
        self.service = service
        self.max_age_s = float(max_age_s)
        kept: list[RecordLike] = []
        ages: list[float] = []
        for rec in newest_per_worker(records):
            if rec.withdrawn or rec.expires_at <= now:
                continue
            max_age = record_max_age(rec, self.max_age_s)
            if now - rec.issued_at > max_age:
                continue
            if service != "*" and service not in rec.services:
                continue
            kept.append(rec)
            ages.append(max_age)
        self.records = kept
        # per record: how long after issued_at it stays fresh (2 x its own refresh)
        self.max_ages = array("d", ages)
        n = len(kept)
        self.ids: list[bytes] = [r.worker_id for r in kept]
        self.index: dict[bytes, int] = {wid: i for i, wid in enumerate(self.ids)}
        self.seqs: dict[bytes, int] = {r.worker_id: r.seq for r in kept}
        self.load = array("d", (max(_finite(r.load, 0.0), 0.0) for r in kept))
        self.capacity = array("d", (_finite(r.capacity, 0.0) for r in kept))
        self.gpu_memory = array("d", (max(_finite(r.gpu_memory_gb, 0.0), 0.0) for r in kept))
        self.gpu_score = array("d", (scorer.score(r.gpu, m) for r, m in zip(kept, self.gpu_memory,
                                                                              strict=True)))
        self.issued = array("d", (float(r.issued_at) for r in kept))
        self.expires = array("d", (float(r.expires_at) for r in kept))
        self.regions_lower = [(r.region or "").lower() for r in kept]
        # a record stops being usable at expiry or at staleness, whichever is first
        self.fresh_until = min((min(r.expires_at, r.issued_at + a)
                                for r, a in zip(kept, ages, strict=True)), default=math.inf)
        self.min_expiry = min(self.expires, default=math.inf)
        self._ones = bytearray(b"\x01") * n
        self._zeros = bytearray(n)
        self._filter_memo: dict[tuple[str | None, str | None, float | None], bytearray] = {}
        self._region_memo: dict[str, bytearray] = {}
        self._scorer = scorer
        self._lat_version = -1
        self._lat = array("d", [UNKNOWN_LATENCY]) * n
        self._static = [
            {
                "id": r.worker_id.hex(),
                "name": r.name,
                "endpoint": r.endpoint,
                "gpu": r.gpu,
                "gpu_memory_gb": self.gpu_memory[i],
                "load": self.load[i],
                "capacity": self.capacity[i],
                "region": r.region,
            }
            for i, r in enumerate(kept)
        ]

    def __len__(self) -> int:
        return len(self.records)

    def is_fresh(self, i: int, now: float) -> bool:
        """Record ``i`` is unexpired and within its own staleness bound."""
        return self.expires[i] > now and now - self.issued[i] <= self.max_ages[i]

    # -- per-call columns -------------------------------------------------------------
    def _filter_mask(self, q: Query) -> bytearray:
        key = (q.region.lower() if q.region else None, q.gpu, q.min_gpu_memory_gb)
        mask = self._filter_memo.get(key)
        if mask is not None:
            return mask
        if key == (None, None, None):
            mask = self._ones
        else:
            region, gpu, min_mem = key
            mask = bytearray(
                1 if ((region is None or self.regions_lower[i] == region)
                      and (gpu is None or self._scorer.matches(r.gpu, gpu))
                      and (min_mem is None or self.gpu_memory[i] >= min_mem)) else 0
                for i, r in enumerate(self.records))
        if len(self._filter_memo) >= self._MEMO_MAX:
            self._filter_memo.clear()
        self._filter_memo[key] = mask
        return mask

    def _region_match(self, caller_region: str) -> bytearray:
        region = (caller_region or "").lower()
        if not region:
            return self._zeros
        match = self._region_memo.get(region)
        if match is None:
            match = bytearray(1 if r == region else 0 for r in self.regions_lower)
            if len(self._region_memo) >= self._MEMO_MAX:
                self._region_memo.clear()
            self._region_memo[region] = match
        return match

    def _latencies(self, tracker: HealthView | None) -> array:
        if tracker is None:
            return self._lat
        if tracker.version != self._lat_version:
            get = tracker.latency_ms
            self._lat = array("d", [get(wid) for wid in self.ids])
            self._lat_version = tracker.version
        return self._lat

    def _healthy(self, mask: bytearray, now: float, tracker: HealthView | None) -> bytearray:
        bans = tracker.current_bans(now) if tracker is not None else {}
        if not bans and now < self.min_expiry:
            return mask
        exp = self.expires
        ids = self.ids
        return bytearray(1 if (m and exp[i] > now and ids[i] not in bans) else 0
                         for i, m in enumerate(mask))

    # -- ranking ----------------------------------------------------------------------
    def ranked(self, now: float, q: Query, tracker: HealthView | None = None,
               weights: Sequence[float] = DEFAULT_WEIGHTS) -> list[tuple[int, float]]:
        """The deterministic order: ``(index, score)`` best first, up to
        ``max(q.limit, TOP_RANDOM)`` entries (the draw needs the best three even when
        ``limit`` is 1)."""
        n = len(self.records)
        if n == 0 or q.limit <= 0:
            return []
        mask = self._filter_mask(q)
        healthy = self._healthy(mask, now, tracker)
        region_match = self._region_match(q.caller_region)
        lat = self._latencies(tracker)
        # clamp to 0: a record issued slightly "in the future" (clock skew the record
        # verification tolerates) is fresh, not invalid
        # and scaled so the kernel's age / max_age_s is each record's age / its own max age
        scale = self.max_age_s
        age = array("d", [a * scale / m if a > 0.0 else 0.0
                          for a, m in zip((now - t for t in self.issued), self.max_ages,
                                          strict=True)])
        return score_values(self.load, self.capacity, self.gpu_score, age, lat,
                            region_match, healthy, weights, self.max_age_s,
                            max(q.limit, TOP_RANDOM))

    def rank(self, now: float, q: Query, tracker: HealthView | None = None,
             rng: random.Random | None = None,
             weights: Sequence[float] = DEFAULT_WEIGHTS) -> list[tuple[int, float]]:
        """Ranked ``(index, score)`` pairs, best first, after the top-3 draw (if ``rng``).

        ``rng=None`` gives the plain deterministic order (no draw).
        """
        ranked = self.ranked(now, q, tracker, weights)
        if rng is not None:
            ranked = pick_first(ranked, rng)
        return ranked[:q.limit]

    def view(self, i: int, now: float, score: float) -> dict[str, Any]:
        """The API's JSON object for record ``i``."""
        out = dict(self._static[i])
        age = now - self.issued[i]
        out["age_s"] = round(age if age > 0 else 0.0, 1)
        lat = self._lat[i]
        out["latency_ms"] = round(lat, 1) if lat >= 0.0 else None
        out["score"] = round(score, 4)
        return out


def pick_first(order: list[T], rng: random.Random, top: int = TOP_RANDOM) -> list[T]:
    """Move one of the first ``top`` entries, drawn uniformly, to the front.

    The others keep their relative order; entries past ``top`` are untouched.
    """
    span = min(top, len(order))
    if span <= 1:
        return list(order)
    j = rng.randrange(span)
    out = list(order)
    out.insert(0, out.pop(j))
    return out
