"""Per-worker latency estimate and failure back-off, fed by caller reports and health probes.

Why both sources: outcomes (the router's, and ``POST /api/services/{name}/report`` from
callers on this box) measure what callers really see but arrive only for workers that are
used; probes cover the few top candidates of each answer before anyone uses them, so a
dead tunnel is noticed without a caller paying for it. A probe is the endpoint's ownership
proof (``GET {endpoint}/.well-known/rma-agent/proof?nonce=...``, see
:mod:`agent.discovery.ownership`): liveness, latency and ownership in one round trip.

* **Estimate:** an exponentially weighted moving average, ``ewma = 0.3*x + 0.7*ewma``; the
  first sample sets it. Unmeasured workers rank as if at 50 ms (``lat`` factor 0.5).
* **Failure:** one failed report or probe demotes the worker *at once*: it is left out of
  answers until its back-off ends. The back-off is 15 s, doubled on each consecutive
  failure up to 240 s (Petals bans a failing server for 15 s with doubling back-off).
  After it ends the worker is eligible again; one success clears the failure count.
* **Memory:** at most ``max_workers`` workers are tracked (least recently touched
  forgotten first), so reports about made-up ids cannot grow memory.
* **Probes:** only of the first few of an answer, each worker at most once per
  ``min_interval_s``, at most ``rate_per_s`` probes started per second and
  ``max_concurrency`` in flight (extra ones are skipped, not queued), 1 s timeout. A
  valid proof is a success (its round trip a latency sample); 5xx (Cloudflare's 502/530
  for a dead origin), refused connections and timeouts are failures (back-off); any other
  answer — a 404, a proof signed by another key or naming another endpoint — is a
  failed proof: the worker is held out of answers until a later check succeeds.
* **Proof failures** are not lifted by success reports: only a valid proof ends them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp

from agent.discovery.ownership import OwnershipVerifier
from agent.ratelimit import TokenBucket

log = logging.getLogger("rma_agent.discovery")

EWMA_ALPHA = 0.3
BASE_BACKOFF_S = 15.0
MAX_BACKOFF_S = 240.0
MAX_DOUBLINGS = 32           # back-off exponent cap (no float overflow after many failures)
RANK_DELTA = 0.1         # relative latency change that is worth re-ranking for ...
RANK_MIN_MS = 2.0        # ... and never less than this (it moves a score by < 0.02)


@dataclass
class WorkerHealth:
    """What is known about one worker."""

    ewma_ms: float = -1.0       # < 0: not measured yet
    samples: int = 0
    failures: int = 0           # consecutive
    banned_until: float = 0.0   # wall-clock time the back-off ends
    ranked_ms: float = -1.0     # the estimate rankings last saw (see record_success)
    proof: str = ""             # "ok" / "failed" once its endpoint's ownership was checked
    proof_failed_until: float = 0.0   # a failed proof holds the worker out until then

    @property
    def proof_failed(self) -> bool:
        """Held out now because its endpoint's ownership proof failed."""
        return self.proof == "failed" and self.proof_failed_until > time.time()


class LatencyTracker:
    """EWMA latency and failure back-off per worker id (bounded LRU).

    ``version`` increases on every change, so rankers can keep derived columns until it
    moves. ``now`` is wall-clock time (``time.time()``), the clock records are dated in.
    """

    def __init__(self, max_workers: int = 4096, alpha: float = EWMA_ALPHA,
                 base_backoff_s: float = BASE_BACKOFF_S,
                 max_backoff_s: float = MAX_BACKOFF_S) -> None:
        self.max_workers = max_workers
        self.alpha = alpha
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.version = 0
        self._workers: OrderedDict[bytes, WorkerHealth] = OrderedDict()
        self._bans: dict[bytes, float] = {}

    def __len__(self) -> int:
        return len(self._workers)

    def _touch(self, worker_id: bytes) -> WorkerHealth:
        st = self._workers.get(worker_id)
        if st is None:
            st = WorkerHealth()
            self._workers[worker_id] = st
            while len(self._workers) > self.max_workers:
                old, _ = self._workers.popitem(last=False)
                self._bans.pop(old, None)
        else:
            self._workers.move_to_end(worker_id)
        return st

    def get(self, worker_id: bytes) -> WorkerHealth | None:
        return self._workers.get(worker_id)

    def record_success(self, worker_id: bytes, latency_ms: float | None) -> WorkerHealth:
        """A call or probe worked (in ``latency_ms`` if known): update and clear failures.

        ``version`` moves only when ranking would: a cleared failure or back-off, a first
        sample, or an estimate that moved by more than ``RANK_DELTA`` (and at least
        ``RANK_MIN_MS``) since rankings last saw it. The router reports every request it routes; re-ranking a service on each
        of thousands of successes a second would cost more than the routing itself."""
        st = self._touch(worker_id)
        changed = st.failures != 0 or st.banned_until != 0.0 or worker_id in self._bans
        if latency_ms is not None and latency_ms >= 0.0:
            st.ewma_ms = (latency_ms if st.samples == 0
                          else self.alpha * latency_ms + (1.0 - self.alpha) * st.ewma_ms)
            st.samples += 1
            if st.ranked_ms < 0.0 or \
                    abs(st.ewma_ms - st.ranked_ms) > max(RANK_DELTA * st.ranked_ms, RANK_MIN_MS):
                st.ranked_ms = st.ewma_ms
                changed = True
        st.failures = 0
        if st.proof_failed_until > time.time():
            return st          # a success report cannot lift a failed ownership proof
        st.banned_until = 0.0
        self._bans.pop(worker_id, None)
        if changed:
            self.version += 1
        return st

    def record_proof(self, worker_id: bytes, ok: bool, now: float, hold_s: float) -> bool:
        """An endpoint ownership check's result. A failure holds the worker out of
        answers for ``hold_s`` (until it is checked again); True when that is news."""
        st = self._touch(worker_id)
        if ok:
            changed = st.proof != "ok"
            st.proof = "ok"
            if st.proof_failed_until:
                st.proof_failed_until = 0.0
                if st.failures == 0:
                    st.banned_until = 0.0
                    self._bans.pop(worker_id, None)
                changed = True
            if changed:
                self.version += 1
            return False
        was_banned = st.banned_until > now
        st.proof = "failed"
        st.proof_failed_until = now + hold_s
        st.banned_until = max(st.banned_until, st.proof_failed_until)
        self._bans[worker_id] = st.banned_until
        self.version += 1
        return not was_banned

    def record_failure(self, worker_id: bytes, now: float) -> bool:
        """A call or probe failed: demote now. True if the worker was not already banned."""
        st = self._touch(worker_id)
        was_banned = st.banned_until > now
        st.failures += 1
        # the exponent is capped: 2.0 ** 1024 overflows a float (OverflowError), and a
        # worker can fail that often; 2 ** 32 times any base is past every sane cap
        doublings = min(st.failures - 1, MAX_DOUBLINGS)
        backoff = min(self.base_backoff_s * 2.0 ** doublings, self.max_backoff_s)
        st.banned_until = max(st.banned_until, now + backoff)
        self._bans[worker_id] = st.banned_until
        self.version += 1
        return not was_banned

    def forgive(self, worker_id: bytes) -> None:
        """End a worker's back-off and failure count (it moved to a new endpoint)."""
        st = self._workers.get(worker_id)
        if st is not None:
            st.failures = 0
            st.banned_until = 0.0
            st.proof = ""
            st.proof_failed_until = 0.0
        if self._bans.pop(worker_id, None) is not None or st is not None:
            self.version += 1

    def current_bans(self, now: float) -> dict[bytes, float]:
        """Worker ids inside their back-off at ``now`` (ended ones are pruned)."""
        bans = self._bans
        if bans:
            ended = [wid for wid, until in bans.items() if until <= now]
            for wid in ended:
                del bans[wid]
            if ended:
                self.version += 1
        return bans

    def is_banned(self, worker_id: bytes, now: float) -> bool:
        until = self._bans.get(worker_id)
        return until is not None and until > now

    def latency_ms(self, worker_id: bytes) -> float:
        st = self._workers.get(worker_id)
        return st.ewma_ms if st is not None else -1.0

    def stats(self, now: float) -> dict[str, int]:
        bans = self.current_bans(now)
        return {"tracked_workers": len(self._workers),
                "failing_workers": len(bans),
                "proof_failed_workers": sum(
                    1 for wid in bans
                    if (st := self._workers.get(wid)) is not None and st.proof_failed_until > now)}


class Prober:
    """Cheap, bounded ownership-proof probes (``GET {endpoint}/.well-known/rma-agent/proof``)
    of an answer's top candidates."""

    def __init__(self, tracker: LatencyTracker,
                 session: Callable[[], aiohttp.ClientSession | None], *,
                 verifier: OwnershipVerifier | None = None,
                 on_failure: Callable[[bytes], None] | None = None,
                 on_result: Callable[[bool], None] | None = None,
                 top: int = 3, max_concurrency: int = 4, rate_per_s: float = 10.0,
                 min_interval_s: float = 10.0, timeout_s: float = 1.0,
                 max_remembered: int = 4096) -> None:
        self.tracker = tracker
        self._session = session
        self.verifier = verifier if verifier is not None else OwnershipVerifier(
            timeout_s=timeout_s)
        self._on_failure = on_failure
        self._on_result = on_result
        self.top = top
        self.max_concurrency = max_concurrency
        self.rate_per_s = rate_per_s
        self.min_interval_s = min_interval_s
        self.timeout_s = timeout_s
        self.max_remembered = max_remembered
        self._last: OrderedDict[bytes, float] = OrderedDict()  # monotonic time of last probe
        self._bucket = TokenBucket(rate_per_s, rate_per_s)
        self._tasks: set[asyncio.Task[None]] = set()
        self.counts = {"ok": 0, "failed": 0, "proof_failed": 0, "skipped": 0}

    def _take_token(self, mono: float) -> bool:
        return self._bucket.take(now=mono)

    def consider(self, candidates: Iterable[tuple[bytes, str, bytes]]) -> int:
        """Start probes for the first ``top`` (worker_id, endpoint, public_key) triples
        that are due.

        Never blocks and never queues: returns how many probes were started.
        """
        session = self._session()
        if session is None or session.closed:
            return 0
        mono = time.monotonic()
        started = 0
        for n, (wid, endpoint, public_key) in enumerate(candidates):
            if n >= self.top:
                break
            last = self._last.get(wid)
            if last is not None and mono - last < self.min_interval_s:
                continue
            if not endpoint.startswith(("http://", "https://")):
                continue
            if len(self._tasks) >= self.max_concurrency or not self._take_token(mono):
                self.counts["skipped"] += 1
                break
            self._last[wid] = mono
            self._last.move_to_end(wid)
            while len(self._last) > self.max_remembered:
                self._last.popitem(last=False)
            task = asyncio.get_running_loop().create_task(
                self._probe(session, wid, endpoint, public_key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started += 1
        return started

    async def _probe(self, session: aiohttp.ClientSession, wid: bytes, endpoint: str,
                     public_key: bytes) -> None:
        """One ownership proof fetch: liveness, latency and ownership in one round trip."""
        try:
            out = await self.verifier.check(session, wid, endpoint, public_key, force=True)
            kind, ms = out.kind, out.ms
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let a probe kill anything; say it once per probe
            log.debug("probe of %s failed unexpectedly: %r", endpoint, exc)
            kind, ms = "down", None
        if self._on_result is not None:
            self._on_result(kind == "ok")
        now = time.time()
        if kind == "ok":
            self.counts["ok"] += 1
            self.tracker.record_proof(wid, True, now, 0.0)
            self.tracker.record_success(wid, ms)
            return
        if kind == "bad":
            self.counts["proof_failed"] += 1
            news = self.tracker.record_proof(wid, False, now, self.verifier.reverify_s)
        else:
            self.counts["failed"] += 1
            news = self.tracker.record_failure(wid, now)
        if news and self._on_failure is not None:
            self._on_failure(wid)

    async def drain(self) -> None:
        """Wait for the probes in flight (tests; bounded by their timeout)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._tasks.clear()
