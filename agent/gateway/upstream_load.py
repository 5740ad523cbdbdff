"""The upstream's own signal: polling a known kind's load, and merging it with ours.

Why: the gateway only knows the requests that pass through it. An inference server
knows more — requests queued behind its batch, slots taken by work that did not come
through this gateway, how many slots it has at all — and vLLM, llama.cpp, TGI and
Triton publish it (``agent.gateway.kinds``). A worker whose server holds 50 queued
requests must not look free because the gateway itself has none in flight.

**Polling.** One :class:`LoadWatch` per upstream of a known kind. The gateway's poll
loop reads them all every ``BUSY_INTERVAL`` (1 s) while it has requests in flight and
every ``IDLE_INTERVAL`` (5 s) otherwise, and at once when the first request of a burst
arrives (no sooner than ``BUSY_INTERVAL`` after the last poll). Each read has a short
timeout (``POLL_TIMEOUT``) and a bounded answer (``kinds.MAX_BYTES``); it runs beside
the requests, never in front of one. A source a server switched off (llama.cpp's
``/slots`` or ``/metrics`` answering 404/501) is asked again only every ``OFF_RETRY_S``.
A bad answer (unparseable, too big, an error status) is counted (``bad``) and ignored.

**Merging** (:func:`merge_load`; what ``RMA-Load`` and the record's load say). ``own``
is the gateway's in-flight count, ``waiting``/``running``/``slots`` the sums over the
fresh readings (a reading older than ``STALE_POLLS`` poll intervals is not used:
:meth:`LoadWatch.fresh`):

- ``queue    = waiting`` (the gateway itself never queues: it refuses when full);
- ``inflight = max(running, own - waiting)`` — the gateway's requests are among the
  server's, queued or running, so what the server does not show as queued is running;
  when the server does not say how many run (Triton), ``inflight = own``;
- ``capacity = min(worker.max_concurrency, slots)`` when every upstream of the worker
  states its slots (llama.cpp's ``/slots``), else ``worker.max_concurrency``;
- an upstream that answered a request with 503 in the last ``FULL_HOLD_S`` (Ollama's
  full queue) makes the worker full: ``queue`` is raised so that
  ``inflight + queue >= capacity``.

Without a fresh reading the load is the gateway's own: ``inflight = own, queue = 0,
capacity = max_concurrency`` (a ``generic`` upstream, or a server that stopped
answering its metrics).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import aiohttp

from agent.config.model import Upstream
from agent.gateway.kinds import MAX_BYTES, SOURCES, Reading, Source, read, source_url
from agent.http.load_header import Load

BUSY_INTERVAL = 1.0          # seconds between polls while requests are in flight
IDLE_INTERVAL = 5.0          # ... and while none are
POLL_TIMEOUT = 0.8           # per read (under BUSY_INTERVAL: a slow server skips a beat)
STALE_POLLS = 3              # a reading older than this many intervals is not used
OFF_RETRY_S = 60.0           # a source answering 404/501 is asked again after this
FULL_HOLD_S = 5.0            # a 503 from the upstream counts as "full" this long
MAX_HEADER = 999_999_999     # RMA-Load numbers have at most 9 digits


class LoadWatch:
    """One upstream's own load as last read, its age, and counts of the reads."""

    def __init__(self, service: str, upstream: Upstream) -> None:
        self.service = service
        self.upstream = upstream
        self.sources: tuple[Source, ...] = SOURCES.get(upstream.kind, ())
        self.reading: Reading | None = None
        self.at = 0.0                    # time.monotonic() of ``reading``
        self.interval = IDLE_INTERVAL    # the poll interval in effect when it was read
        self.polls = 0
        self.bad = 0                     # answers that said nothing usable
        self.errors = 0                  # no answer (refused, timed out)
        self.last_error = ""
        self.full_until = 0.0            # monotonic: a 503 seen from the upstream
        self.full_seen = 0
        self._off: dict[str, float] = {}     # source name -> monotonic time to retry

    def fresh(self, now: float, interval: float) -> Reading | None:
        """The reading if it is at most ``STALE_POLLS`` poll intervals old: the longer of
        the interval when it was read and the one now (``interval``), so a reading taken
        during a burst still counts once the gateway is idle and the next poll is an idle
        interval away, and an idle reading counts until a burst's first poll replaces it)."""
        if self.reading is None or \
                now - self.at > STALE_POLLS * max(self.interval, interval):
            return None
        return self.reading

    def saw_status(self, status: int, now: float) -> None:
        """A proxied answer's status: 503 from the server itself = its queue is full."""
        if status == 503:
            self.full_until = now + FULL_HOLD_S
            self.full_seen += 1

    def full(self, now: float) -> bool:
        return now < self.full_until

    async def poll(self, session: aiohttp.ClientSession, interval: float) -> None:
        """Read every source once; keep what they say (sources of one server merged).
        ``interval``: the poll interval now (how long the reading is good for)."""
        self.polls += 1
        now = time.monotonic()
        merged: Reading | None = None
        for source in self.sources:
            if self._off.get(source.name, 0.0) > now:
                continue
            got = await self._read(session, source, now)
            if got is not None:
                merged = got if merged is None else got.over(merged)
        if merged is not None:
            self.reading, self.at, self.interval = merged, time.monotonic(), interval

    async def _read(self, session: aiohttp.ClientSession, source: Source,
                    now: float) -> Reading | None:
        url = source_url(self.upstream, source)
        try:
            async with session.get(url, allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=POLL_TIMEOUT)) as resp:
                if source.optional and resp.status in (404, 501):
                    self._off[source.name] = now + OFF_RETRY_S
                    return None
                body = await resp.content.read(MAX_BYTES + 1)
                status = resp.status
        except asyncio.CancelledError:
            raise
        except Exception as exc:          # refused, timed out, broken: no answer
            self.errors += 1
            self.last_error = f"{source.name}: {str(exc)[:100] or type(exc).__name__}"
            return None
        got = read(source, body) if status == 200 else f"HTTP {status}"
        if isinstance(got, str):
            self.bad += 1
            self.last_error = f"{source.name}: {got}"
            return None
        return got

    def to_json(self, now: float) -> dict[str, Any]:
        return {"kind": self.upstream.kind,
                "reading": self.reading.to_json() if self.reading is not None else None,
                "age_s": round(now - self.at, 3) if self.reading is not None else None,
                "polls": self.polls, "bad": self.bad, "errors": self.errors,
                "last_error": self.last_error or None, "full": self.full(now),
                "full_seen": self.full_seen}


def merge_load(own: int, capacity: int, readings: Iterable[Reading], *,
               upstreams: int, full: bool = False) -> Load:
    """The worker's load from its own in-flight count and its servers' fresh readings
    (the rule is the module docstring's). ``upstreams``: how many upstreams the worker
    has (capacity comes from slots only when every one of them states its slots)."""
    rs = list(readings)
    waiting = sum(r.waiting or 0 for r in rs)
    runs = [r.running for r in rs if r.running is not None]
    inflight = max(sum(runs), own - waiting) if runs else own
    slots = [r.slots for r in rs if r.slots]
    if slots and len(slots) == upstreams:
        capacity = min(capacity, sum(slots))
    queue = waiting
    if full:
        queue = max(queue, capacity - inflight, 1)
    return Load(min(max(inflight, 0), MAX_HEADER), min(queue, MAX_HEADER), capacity)
