"""Which worker a routed request goes to: power of two choices on fresh per-worker cost.

Why: the seed drew at random among the three best by a score whose load was the worker's
record, up to 30 s old, so every caller sent to the same "free" worker (herding), and a
worker that failed fast looked fast. The policy below follows the load balancers that
solved this — Envoy's least-request (power of two choices), Finagle/Linkerd's peak-EWMA
(and its failure penalty), Prequal (requests in flight plus latency; a hot/cold rule
before the cost), the Gateway API Inference Extension's picker (old metrics count as
saturated) and Petals' doubling bans.

The rule, for one request (``order``; discovery already applied the ``RMA-Region``,
``RMA-GPU`` and ``RMA-Min-GPU-Memory-GB`` filters and its own failure back-off):

1. **Held: never.** A worker that answered ``429``/``503`` with ``Retry-After`` is left
   out until that time (bounded by ``RETRY_AFTER_MAX_S``). When every candidate is held
   the router answers ``503`` with the shortest remaining hold as its ``Retry-After``.
2. **Tiers, lexicographic (Prequal's hot/cold).** *Cold*: has room. *Hot*: its
   estimated load (below) has no free slot (``>= capacity``), or it said "full" within
   ``BUSY_HOLD_S``, or this router alone already holds ``capacity`` requests there. *Banned*: failed within its ban. A hot worker gets
   nothing while a cold one exists; a banned one only when nothing else is left.
3. **Two choices.** Among the cold workers, two distinct ones are drawn at random,
   weighted toward discovery's rank (weight ``RANK_DECAY ** rank``: region, GPU class
   and record age still count a little), and the one of lower **cost** goes first. The
   rest follow by cost (retries), then the hot ones by cost, then the banned ones.
4. **Cost** (milliseconds of expected wait, Linkerd's ``rtt x (pending + 1)`` per slot)::

       w     = exp(-age / max(LOAD_TAU_S, ewma))
       load  = prior + (reported - prior) * w       prior = STALE_PRIOR * capacity
       busy  = load + outstanding
       cost  = (busy + 1) / capacity * (ewma_ms + BASE_MS)

   ``outstanding``: this router's requests at the worker now, known exactly, added to
   the others' load as last reported (which may count some of ours again: an error on
   the side of spreading). ``reported`` is
   ``inflight + queue`` of the freshest of record and ``RMA-Load`` header
   (:mod:`agent.router.freshload`), less the answer's own request for a header (the
   gateway stamps it while that request is still counted; it is leaving). A report is
   trusted as it is when new and fades toward ``prior`` (half full) as it ages, over a
   worker's own time scale (its latency, at least ``LOAD_TAU_S``): by then the requests
   it counted have left and others arrived. So an old "idle" is never believed (the
   Inference Extension counts old metrics as saturated), and an old "full" does not
   shut a worker out forever when nobody sends there to hear otherwise. ``capacity``
   is the report's (the record's, or 1, when unknown). ``ewma_ms``: a **peak-EWMA** of this worker's time to
   response headers for this service: a sample above the estimate replaces it at once,
   one below is averaged in with weight ``1 - exp(-dt / EWMA_TAU_S)``, and with no
   samples it decays toward 0 with the same time constant (so a worker that was slow
   once is tried again later). A worker never measured for this service counts as the
   mean of those that were in the same call (neither shunned nor flooded).
5. **Failures cost, never attract.** A failure (refused connection, timeout, reset,
   ``5xx`` other than a ``503`` with ``Retry-After``) is a latency sample of
   ``max(FAILURE_MS, 2 x ewma)`` — through the peak rule it raises the cost at once,
   however fast the failure was — and bans the worker for ``BAN_BASE_S``, doubling on
   each further failure in a row up to ``BAN_MAX_S`` (Petals: 15 s doubling; ours starts
   lower because discovery's own 15 s back-off already covers long outages). A success
   ends the streak.

Pure logic: no I/O; the clocks and the random generator are injected, so tests drive it
deterministically. Memory is bounded (``MAX_TRACKED`` workers, LRU).
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

from agent.http.load_header import Load

LOAD_TAU_S = 2.0            # a load report fades with at least this time constant ...
STALE_PRIOR = 0.5           # ... toward this share of capacity busy
BUSY_HOLD_S = 1.0           # a worker that answered "full" is hot this long
EWMA_TAU_S = 10.0           # peak-EWMA time constant (Finagle's default decay time)
BASE_MS = 1.0               # keeps load in the cost while no latency is known
FAILURE_MS = 1000.0         # the least latency sample a failure counts as
BAN_BASE_S = 1.0            # the first failure's ban; doubles per failure in a row
BAN_MAX_S = 60.0
RETRY_AFTER_MAX_S = 30.0    # a worker's Retry-After is honoured up to this long
RETRY_AFTER_STATUSES = frozenset({429, 503})
RANK_DECAY = 0.85           # P2C draw weight of discovery rank r: RANK_DECAY ** r
MAX_TRACKED = 4096          # workers (and worker-service estimates) remembered


class Candidate(Protocol):
    """What the policy reads of a routed record."""

    worker_id: bytes
    capacity: float


class SeenLoad(Protocol):
    """A worker's freshest known load (:class:`agent.router.freshload.Seen`)."""

    load: Load
    at: float
    source: str

    def age(self, now: float) -> float: ...


@dataclass
class _Latency:
    """One worker's peak-EWMA for one service (milliseconds, as of ``at``)."""

    ms: float
    at: float

    def value(self, now: float) -> float:
        """The estimate decayed to ``now`` (no sample since ``at``)."""
        return self.ms * math.exp(-max(0.0, now - self.at) / EWMA_TAU_S)

    def sample(self, ms: float, now: float) -> None:
        old = self.value(now)
        if ms >= old:                       # peak: a slow sample counts at once
            self.ms = ms
        else:
            w = math.exp(-max(0.0, now - self.at) / EWMA_TAU_S)
            self.ms = self.ms * w + ms * (1.0 - w)      # == old + (ms - old)(1 - w)
        self.at = now


@dataclass
class _Health:
    """One worker's failure streak, ban and holds (monotonic seconds)."""

    fails: int = 0
    ban_until: float = 0.0
    ban_s: float = 0.0
    hold_until: float = 0.0       # Retry-After: not chosen before this
    busy_until: float = 0.0       # said "full": hot until this


def retry_after_s(value: str | None, now_wall: float) -> float | None:
    """Seconds a ``Retry-After`` value asks for (delta-seconds or an HTTP-date), bounded
    to ``[0, RETRY_AFTER_MAX_S]``; None when absent or unreadable."""
    if value is None:
        return None
    v = value.strip()
    if v.isdigit():
        secs = float(int(v[:9]))
    else:
        try:
            secs = parsedate_to_datetime(v).timestamp() - now_wall
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return min(max(secs, 0.0), RETRY_AFTER_MAX_S)


class RoutePolicy:
    """Per-worker state and the ordering of one request's candidates (module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, rng: random.Random | None = None,
                 on_pick: Callable[[str], None] | None = None,
                 on_penalty: Callable[[str], None] | None = None) -> None:
        self.clock, self.wall = clock, wall
        self.rng = rng or random.Random()
        self._lat: OrderedDict[tuple[bytes, str], _Latency] = OrderedDict()
        self._health: OrderedDict[bytes, _Health] = OrderedDict()
        self.picks: Counter[str] = Counter()        # how the first candidate was chosen
        self.penalties: Counter[str] = Counter()    # "failure" | "retry_after" | "busy"
        self._on_pick, self._on_penalty = on_pick, on_penalty

    # ------------------------------------------------------------------ outcomes
    def _h(self, wid: bytes) -> _Health:
        h = self._health.get(wid)
        if h is None:
            h = self._health[wid] = _Health()
        self._health.move_to_end(wid)
        while len(self._health) > MAX_TRACKED:
            self._health.popitem(last=False)
        return h

    def _sample(self, wid: bytes, service: str, ms: float, now: float) -> None:
        key = (wid, service)
        est = self._lat.get(key)
        if est is None:
            self._lat[key] = _Latency(ms, now)
        else:
            est.sample(ms, now)
        self._lat.move_to_end(key)
        while len(self._lat) > MAX_TRACKED:
            self._lat.popitem(last=False)

    def _count(self, kind: str) -> None:
        self.penalties[kind] += 1
        if self._on_penalty is not None:
            self._on_penalty(kind)

    def success(self, wid: bytes, service: str, seconds: float) -> None:
        """An answer (not a failure) came after ``seconds`` to its headers."""
        now = self.clock()
        self._sample(wid, service, max(0.0, seconds) * 1000.0, now)
        h = self._health.get(wid)
        if h is not None:
            h.fails = 0

    def failure(self, wid: bytes, service: str) -> None:
        """A failed attempt: a peak sample of at least ``FAILURE_MS``, and a ban that
        doubles with each failure in a row."""
        now = self.clock()
        est = self._lat.get((wid, service))
        floor = 2.0 * est.value(now) if est is not None else 0.0
        self._sample(wid, service, max(FAILURE_MS, floor), now)
        h = self._h(wid)
        h.fails += 1
        h.ban_s = min(BAN_MAX_S, BAN_BASE_S * 2.0 ** min(h.fails - 1, 30))
        h.ban_until = now + h.ban_s
        self._count("failure")

    def hold(self, wid: bytes, seconds: float) -> None:
        """Honour a ``Retry-After``: not chosen for ``seconds`` (already bounded)."""
        h = self._h(wid)
        h.hold_until = max(h.hold_until, self.clock() + seconds)
        self._count("retry_after")

    def busy(self, wid: bytes) -> None:
        """The worker answered "full" (``RMA-Not-Processed``): hot for ``BUSY_HOLD_S``."""
        self._h(wid).busy_until = self.clock() + BUSY_HOLD_S
        self._count("busy")

    def answered(self, wid: bytes, service: str, status: int, retry_after: str | None,
                 seconds: float) -> None:
        """Learn from an answer's status line: a ``429``/``503`` with ``Retry-After``
        holds the worker; another ``5xx`` is a failure; anything else a latency sample."""
        if status in RETRY_AFTER_STATUSES:
            secs = retry_after_s(retry_after, self.wall())
            if secs is not None:
                if secs > 0:
                    self.hold(wid, secs)
                return
        if status >= 500 or status == 429:
            self.failure(wid, service)
        else:
            self.success(wid, service, seconds)

    # ------------------------------------------------------------------ cost
    def parts(self, service: str, wid: bytes, capacity: float, outstanding: int,
              seen: SeenLoad | None, neutral_ms: float | None = None) -> dict[str, Any]:
        """The cost of one more request to ``wid`` and its parts (also what
        ``?explain=1`` and the dashboard show)."""
        now, wall = self.clock(), self.wall()
        load = seen.load if seen is not None else None
        cap = load.capacity if load is not None and load.capacity > 0 else \
            (round(capacity) if math.isfinite(capacity) and capacity >= 1 else 1)
        age = seen.age(wall) if seen is not None else None
        est = self._lat.get((wid, service))
        ewma = est.value(now) if est is not None else \
            (neutral_ms if neutral_ms is not None else 0.0)
        prior = STALE_PRIOR * cap
        reported = prior
        if load is not None and age is not None:
            own = 1 if seen is not None and seen.source == "header" else 0
            w = math.exp(-age / max(LOAD_TAU_S, ewma / 1000.0))
            reported = prior + (max(0, load.busy - own) - prior) * w
        busy_est = reported + outstanding
        h = self._health.get(wid)
        penalty = max(0.0, h.ban_until - now) if h is not None else 0.0
        held = max(0.0, h.hold_until - now) if h is not None else 0.0
        hot = busy_est >= cap or \
            (h is not None and h.busy_until > now)
        return {"outstanding": outstanding,
                "inflight": load.inflight if load is not None else None,
                "queue": load.queue if load is not None else None, "capacity": cap,
                "load_age_s": round(age, 3) if age is not None else None,
                "load_est": round(busy_est, 3),
                "ewma_ms": round(ewma, 3), "measured": est is not None,
                "penalty": round(penalty, 3), "retry_after": round(held, 3),
                "hot": bool(hot),
                "cost": (busy_est + 1.0) / cap * (ewma + BASE_MS)}

    def _neutral(self, service: str, wids: Sequence[bytes]) -> float | None:
        now = self.clock()
        known = [e.value(now) for w in wids if (e := self._lat.get((w, service)))]
        return sum(known) / len(known) if known else None

    def costs(self, service: str, workers: Sequence[tuple[bytes, float]],
              outstanding: Mapping[bytes, int], seen: Callable[[bytes], SeenLoad | None]
              ) -> list[dict[str, Any]]:
        """:meth:`parts` of each (worker, record capacity), unmeasured workers counted
        at the mean of the measured ones among them."""
        neutral = self._neutral(service, [w for w, _ in workers])
        return [self.parts(service, wid, cap, outstanding.get(wid, 0), seen(wid), neutral)
                for wid, cap in workers]

    # ------------------------------------------------------------------ the order
    def order(self, service: str, records: Sequence[Any], outstanding: Mapping[bytes, int],
              seen: Callable[[bytes], SeenLoad | None]) -> list[Any]:
        """``records`` (discovery's order) in the order to try them; held workers left
        out (see the module docstring)."""
        tiers: tuple[list[tuple[float, int]], ...] = ([], [], [])
        costs = self.costs(service, [(r.worker_id, r.capacity) for r in records],
                           outstanding, seen)
        for i, p in enumerate(costs):
            if p["retry_after"] > 0:
                continue
            tiers[2 if p["penalty"] > 0 else 1 if p["hot"] else 0].append((p["cost"], i))
        cold, hot, banned = (sorted(t) for t in tiers)
        first: list[int] = []
        how = "p2c" if len(cold) >= 2 else "only" if cold else "hot" if hot else \
            "banned" if banned else ""
        if len(cold) >= 2:
            a, b = self._two([i for _, i in tiers[0]])
            cost = {i: c for c, i in cold}
            win = a if cost[a] <= cost[b] else b       # a tie: the first drawn
            first = [win]
            cold = [ci for ci in cold if ci[1] != win]
        if how:
            self.picks[how] += 1
            if self._on_pick is not None:
                self._on_pick(how)
        return [records[i] for i in first + [i for _, i in (*cold, *hot, *banned)]]

    def _two(self, idx: list[int]) -> tuple[int, int]:
        """Two distinct indices (discovery ranks), drawn with weight ``RANK_DECAY**rank``."""
        weights = [RANK_DECAY ** i for i in idx]
        a = self.rng.choices(range(len(idx)), weights)[0]
        rest = [j for j in range(len(idx)) if j != a]
        b = self.rng.choices(rest, [weights[j] for j in rest])[0]
        return idx[a], idx[b]

    def held_for(self, records: Sequence[Any]) -> float:
        """The shortest remaining hold among ``records`` (0 when none is held)."""
        now = self.clock()
        left = [h.hold_until - now for r in records
                if (h := self._health.get(r.worker_id)) is not None and h.hold_until > now]
        return min(left, default=0.0)

    def stats(self) -> dict[str, Any]:
        return {"picks": dict(self.picks), "penalties": dict(self.penalties),
                "tracked_workers": len(self._health), "latency_estimates": len(self._lat)}
