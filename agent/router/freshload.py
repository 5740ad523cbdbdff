"""Per worker, the freshest load this router knows: the record's or an answer's header.

Why: the load in a worker's record is up to a republish interval old (30 s by default);
every answer of the worker's gateway carries ``RMA-Load`` (:mod:`agent.http.load_header`)
as of that answer. The router keeps, per worker, whichever of the two is newer, with its
time, and orders candidates on that (:meth:`agent.router.component.RouterComponent._order`).
Both times are wall-clock seconds: a record's ``issued_at`` is the worker's clock (records
from a skewed clock are bounded by the record verification), a header's is ours when the
answer arrived.

A malformed header is ignored and counted (``malformed``), never an error: a worker's
answer is relayed whatever its load header says.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from agent.http.load_header import Load, parse_load

MAX_WORKERS = 4096          # workers remembered (least recently updated dropped first)
STATS_WORKERS = 100         # the most recently updated ones shown in stats
STALE_S = 60.0              # a load older than this says nothing about "full"


class LoadRecord(Protocol):
    """The fields of a worker record this module reads."""

    worker_id: bytes
    load: float
    capacity: float
    issued_at: float


@dataclass(frozen=True, slots=True)
class Seen:
    """One worker's freshest known load: what, when (wall clock) and from where."""

    load: Load
    at: float
    source: str             # "header" | "record"

    def age(self, now: float) -> float:
        return max(0.0, now - self.at)


def _count(x: float) -> int:
    """A record's float load/capacity as a non-negative integer (bad values -> 0)."""
    return round(x) if math.isfinite(x) and x > 0 else 0


class FreshLoads:
    """worker id -> :class:`Seen`, bounded; counts of headers seen, missing, malformed."""

    def __init__(self, max_workers: int = MAX_WORKERS) -> None:
        self._seen: OrderedDict[bytes, Seen] = OrderedDict()
        self._max = max_workers
        self.headers = 0            # well-formed headers taken in
        self.malformed = 0          # present but not by the grammar: ignored
        self.missing = 0            # answers without the header (e.g. an older worker)

    def _put(self, wid: bytes, seen: Seen) -> None:
        self._seen[wid] = seen
        self._seen.move_to_end(wid)
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)

    def header(self, wid: bytes, value: str | None, now: float) -> Load | None:
        """Take in an answer's ``RMA-Load`` value (None: absent); the parsed load."""
        if value is None:
            self.missing += 1
            return None
        load = parse_load(value)
        if load is None:
            self.malformed += 1
            return None
        self.headers += 1
        self._put(wid, Seen(load, now, "header"))
        return load

    def record(self, rec: LoadRecord) -> None:
        """Take in a record's load, unless what is known is newer."""
        old = self._seen.get(rec.worker_id)
        at = rec.issued_at
        if old is not None and old.at >= at:
            return
        if not math.isfinite(at):
            return
        cap = _count(rec.capacity)
        if old is not None and 0 < old.load.capacity < cap:
            # a record's capacity is the worker's admission limit (max_concurrency); an
            # answer's is what its server can run at once (its slots, when the gateway
            # reads them), the one that says when requests start to queue: kept
            cap = old.load.capacity
        self._put(rec.worker_id, Seen(Load(_count(rec.load), 0, cap), at, "record"))

    def get(self, wid: bytes) -> Seen | None:
        return self._seen.get(wid)

    def full(self, wid: bytes, outstanding: int, now: float) -> bool:
        """Whether a new request to ``wid`` would likely wait or be refused: its freshest
        load (if not stale) has no free slot, or this router alone already holds
        ``capacity`` requests there."""
        seen = self._seen.get(wid)
        if seen is None or seen.age(now) > STALE_S:
            return False
        load = seen.load
        return load.full or (load.capacity > 0 and outstanding >= load.capacity)

    def stats(self, now: float) -> dict[str, Any]:
        """For ``/api/dht/stats``: the counts and each known worker's load and age."""
        return {
            "headers": self.headers, "malformed": self.malformed, "missing": self.missing,
            "workers": {wid.hex(): {"inflight": s.load.inflight, "queue": s.load.queue,
                                    "capacity": s.load.capacity, "source": s.source,
                                    "age_s": round(s.age(now), 3)}
                        for wid, s in list(self._seen.items())[-STATS_WORKERS:]},
        }
