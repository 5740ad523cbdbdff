"""Each worker's share of the router's connections, and hanging workers noticed early.

Why (issue 20): every routed request holds one connection of the router's pool from the
moment it is sent until its answer has been relayed. With one shared pool and no bound
per worker, a worker that accepts requests and never answers collected all of them (512)
and starved routes to every other worker. The rules:

* **Share.** A worker holds at most ``share`` of this router's requests at once
  (``POOL // 8`` = 64 of 512). A request that would go beyond is not sent there: it goes
  to the next-ranked worker, or, when none is left, is answered ``503`` at once
  (counted as ``shed``). So one worker costs callers at most its own share.
* **Overdue.** An attempt is overdue when it has waited for the worker's response headers
  longer than ``max(OVERDUE_MIN_S, OVERDUE_FACTOR x`` that worker's usual time to headers
  at this router``)``: a service known to think for a minute is not overdue at 5 s.
* **Suspect.** An honest gateway never has more requests in flight than the capacity it
  announces (``worker.max_concurrency``): the next one gets an immediate ``503`` +
  ``RMA-Not-Processed``. So when more of this router's attempts are overdue at one worker
  than ``max(capacity, SUSPECT_MIN - 1)`` (and at most its share), the worker hangs or lies
  about its capacity. The sweeper (once a second, while anything waits) reports it as
  failed — discovery backs it off (15 s, doubling) — without waiting for a single attempt
  to time out, and again every ``REPORT_EVERY_S`` while it stays so. Until then new
  requests skip it. Attempts already waiting keep waiting (a slow worker may still
  answer) within the per-attempt time budget.

Everything here is plain bookkeeping on the event loop (no locks, no I/O); memory is
bounded by the requests in flight plus ``MAX_TRACKED`` latency estimates.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

POOL = 512                 # connections in the router's pool
SHARE = POOL // 8          # the most one worker may hold
OVERDUE_MIN_S = 5.0
OVERDUE_FACTOR = 4.0
SUSPECT_MIN = 8
REPORT_EVERY_S = 15.0      # a worker still hanging is reported again this often
TTFB_ALPHA = 0.3
MAX_TRACKED = 4096


class WorkerSlots:
    """In-flight requests per worker, attempts waiting for headers, suspects."""

    def __init__(self, share: int = SHARE, overdue_min_s: float = OVERDUE_MIN_S,
                 suspect_min: int = SUSPECT_MIN) -> None:
        self.share = share
        self.overdue_min_s = overdue_min_s
        self.suspect_min = suspect_min
        self.inflight: dict[bytes, int] = {}
        # worker -> {attempt token: monotonic time it was sent}, oldest first
        self._waiting: dict[bytes, dict[int, float]] = {}
        self._capacity: dict[bytes, float] = {}
        self._ttfb: OrderedDict[bytes, float] = OrderedDict()   # EWMA seconds, LRU
        self._reported: dict[bytes, float] = {}                 # monotonic time of report
        self._tokens = itertools.count()
        self.shed = 0           # requests not sent to a worker because of its share
        self.suspects = 0       # times a worker was reported as hanging

    # ------------------------------------------------------------------ shares
    def has_room(self, wid: bytes, now: float) -> bool:
        """Whether one more request may go to ``wid``: under its share and not suspect."""
        if self.inflight.get(wid, 0) >= self.share:
            return False
        return not self._waiting.get(wid) or not self.suspect(wid, now)

    def acquire(self, wid: bytes, capacity: float) -> None:
        self.inflight[wid] = self.inflight.get(wid, 0) + 1
        self._capacity[wid] = capacity

    def release(self, wid: bytes) -> None:
        left = self.inflight.get(wid, 1) - 1
        if left > 0:
            self.inflight[wid] = left
        else:
            self.inflight.pop(wid, None)
            self._capacity.pop(wid, None)

    # ------------------------------------------------------------------ waiting for headers
    def sent(self, wid: bytes, now: float) -> int:
        """An attempt was sent: returns its token for :meth:`answered`."""
        token = next(self._tokens)
        self._waiting.setdefault(wid, {})[token] = now
        return token

    def answered(self, wid: bytes, token: int, now: float, headers: bool) -> None:
        """The attempt stopped waiting: ``headers`` when response headers arrived (its
        wait is a time-to-headers sample), else it failed or was cancelled."""
        waiting = self._waiting.get(wid)
        if waiting is None:
            return
        sent = waiting.pop(token, None)
        if not waiting:
            del self._waiting[wid]
        if headers and sent is not None:
            x = now - sent
            old = self._ttfb.get(wid)
            self._ttfb[wid] = x if old is None else TTFB_ALPHA * x + (1 - TTFB_ALPHA) * old
            self._ttfb.move_to_end(wid)
            while len(self._ttfb) > MAX_TRACKED:
                self._ttfb.popitem(last=False)

    def waiting(self, wid: bytes) -> int:
        return len(self._waiting.get(wid, ()))

    def overdue_after(self, wid: bytes) -> float:
        usual = self._ttfb.get(wid)
        return self.overdue_min_s if usual is None else \
            max(self.overdue_min_s, OVERDUE_FACTOR * usual)

    def overdue(self, wid: bytes, now: float) -> int:
        """Attempts at ``wid`` waiting for headers longer than :meth:`overdue_after`."""
        waiting = self._waiting.get(wid)
        if not waiting:
            return 0
        cutoff = now - self.overdue_after(wid)
        n = 0
        for sent in waiting.values():       # oldest first: stop at the first young one
            if sent > cutoff:
                break
            n += 1
        return n

    def suspect_at(self, wid: bytes) -> int:
        cap = self._capacity.get(wid, 0.0)
        return min(self.share, max(self.suspect_min, int(cap) + 1))

    def suspect(self, wid: bytes, now: float) -> bool:
        return self.overdue(wid, now) >= self.suspect_at(wid)

    def sweep(self, now: float) -> list[tuple[bytes, int]]:
        """Workers to report as hanging now, with their overdue count: suspect, and not
        reported in the last ``REPORT_EVERY_S``."""
        out: list[tuple[bytes, int]] = []
        for wid in list(self._waiting):
            n = self.overdue(wid, now)
            if n < self.suspect_at(wid):
                continue
            last = self._reported.get(wid)
            if last is not None and now - last < REPORT_EVERY_S:
                continue
            self._reported[wid] = now
            self.suspects += 1
            out.append((wid, n))
        for wid in [w for w, t in self._reported.items() if now - t >= REPORT_EVERY_S
                    and w not in self._waiting]:
            del self._reported[wid]
        return out

    def busy(self) -> bool:
        """Whether any attempt waits for headers (the sweeper has something to do)."""
        return bool(self._waiting)

    def stats(self, now: float) -> dict[str, int]:
        return {"worker_share": self.share, "shed": self.shed, "suspects": self.suspects,
                "workers_in_flight": len(self.inflight),
                "max_in_flight_per_worker": max(self.inflight.values(), default=0),
                "waiting_for_headers": sum(len(w) for w in self._waiting.values()),
                "overdue": sum(self.overdue(w, now) for w in self._waiting)}
