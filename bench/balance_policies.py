"""bench/balance.py's dispatch policies, open-loop workload and per-cell figures.

Each policy answers one question: for caller ``c``'s next request, where does it go and
what came back (status, attempts). Two of them are the agent's and nginx's own
dispatchers (the bench only picks the caller's URL); the other three dispatch in this
process and send straight to the workers' gateways:

* ``router``  -> ``POST <caller agent>/route/llm/...``; attempts from ``RMA-Attempts``.
* ``nginx``   -> ``POST <caller's nginx>/llm/...`` (``least_conn`` over the gateways);
  attempts from ``$upstream_addr`` (one address per try).
* ``seed``    the seed's policy, emulated: the caller's own ranking
  (``GET /api/services/llm`` on its agent: record load, refreshed every second as the
  seed's lookups were), each worker's free share lowered by this caller's outstanding
  requests there, then one of the best three drawn at random.
* ``round_robin`` per caller, the gateways in turn.
* ``oracle``  one dispatcher for every caller with exact state: its own requests in
  flight per server plus the owner's held slots read off the emulated server; a server
  with a free slot (the fastest), else the shortest expected wait (queue / (slots x
  speed)) among servers whose queue is not full.

A bench-side dispatcher retries a 503 on its next choice, at most ``MAX_ATTEMPTS`` tries
(the router's ``discovery.max_attempts`` default), as the router and nginx do.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from agent.cli.demo_inference import InferenceServer

MAX_ATTEMPTS = 3
REQUEST_TIMEOUT_S = 120.0
BODY = json.dumps({"model": "emulated/llm", "prompt": "hello", "max_tokens": 16}).encode()
STREAM_BODY = json.dumps({"model": "emulated/llm", "prompt": "hello", "max_tokens": 16,
                          "stream": True}).encode()
# when the current request's answer began (monotonic s): set by _post in the task's context
FIRST_BYTE: contextvars.ContextVar[float] = contextvars.ContextVar("first_byte",
                                                                   default=math.nan)
HEADERS = {"Content-Type": "application/json"}
PATH = "/v1/completions"
SEED_REFRESH_S = 1.0


@dataclass
class Target:
    """One worker as the bench sees it: its gateway, capacity and emulated server."""

    name: str
    gateway: str                     # http://127.0.0.1:PORT
    slots: int
    speed: float
    server: InferenceServer
    outstanding: int = 0             # oracle: its own requests in flight here

    def held(self) -> int:
        """Slots in use now: the oracle's requests and the owner's holds (read off the
        server, another thread: plain int reads)."""
        owner = max(0, self.server.pool.used - self.server.running)
        return self.outstanding + owner


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, Any]:
    """POST ``body``; the whole answer read, its first body byte's time in FIRST_BYTE."""
    async with session.post(url, data=body, headers=HEADERS) as resp:
        first = True
        async for _chunk in resp.content.iter_any():
            if first:
                FIRST_BYTE.set(time.monotonic())
                first = False
        return resp.status, resp.headers


class Policy:
    """Base: ``send(caller)`` -> (status, attempts)."""

    name = "?"
    body = BODY                      # STREAM_BODY: answers are token streams (SSE)

    def __init__(self, session: aiohttp.ClientSession, targets: Sequence[Target],
                 callers: Sequence[str]) -> None:
        self.session, self.targets, self.callers = session, list(targets), list(callers)

    async def start(self) -> None:
        """Before the cell's first request."""

    async def stop(self) -> None:
        """After the cell's last answer."""

    async def send(self, caller: int) -> tuple[int, int]:
        raise NotImplementedError

    async def _direct(self, order: list[Target], caller: int) -> tuple[int, int]:
        """Try ``order`` in turn while the answer is 503 (at most MAX_ATTEMPTS)."""
        status = 0
        for attempt, t in enumerate(order[:MAX_ATTEMPTS], 1):
            self.taken(t, caller, +1)
            try:
                status, _ = await _post(self.session, f"{t.gateway}/llm{PATH}", self.body)
            finally:
                self.taken(t, caller, -1)
            if status != 503:
                return status, attempt
        return status, min(len(order), MAX_ATTEMPTS)

    def taken(self, t: Target, caller: int, delta: int) -> None:
        """A request to ``t`` starts (+1) or ends (-1)."""


class RouterPolicy(Policy):
    name = "router"

    async def send(self, caller: int) -> tuple[int, int]:
        status, headers = await _post(self.session, f"{self.callers[caller]}/route/llm{PATH}",
                                      self.body)
        try:
            return status, int(headers.get("RMA-Attempts", "1"))
        except ValueError:
            return status, 1


class NginxPolicy(Policy):
    name = "nginx"

    def __init__(self, session: aiohttp.ClientSession, targets: Sequence[Target],
                 callers: Sequence[str], nginx: Sequence[str]) -> None:
        super().__init__(session, targets, callers)
        self.nginx = list(nginx)

    async def send(self, caller: int) -> tuple[int, int]:
        status, headers = await _post(self.session, f"{self.nginx[caller]}/llm{PATH}", self.body)
        return status, max(1, headers.get("X-Upstream-Addr", "").count(",") + 1)


class RoundRobinPolicy(Policy):
    name = "round_robin"

    async def start(self) -> None:
        n = len(self.targets)
        # callers start at different workers; one step per request, retries go on from it
        self._next = [itertools.count(c * n // max(1, len(self.callers)))
                      for c in range(len(self.callers))]

    async def send(self, caller: int) -> tuple[int, int]:
        first, n = next(self._next[caller]), len(self.targets)
        return await self._direct([self.targets[(first + i) % n] for i in range(n)], caller)


class OraclePolicy(Policy):
    name = "oracle"

    def order(self) -> list[Target]:
        """Free servers first (fastest first), then by expected wait."""
        def key(t: Target) -> tuple[int, float]:
            held = t.held()
            if held < t.slots:
                return 0, -t.speed
            queued = held - t.slots
            # a full queue answers 503: last, whatever its wait would be
            return (1 if queued < t.server.profile.queue_limit else 2,
                    (queued + 1) / (t.slots * t.speed))
        return sorted(self.targets, key=key)

    def taken(self, t: Target, caller: int, delta: int) -> None:
        t.outstanding += delta

    async def send(self, caller: int) -> tuple[int, int]:
        return await self._direct(self.order(), caller)


class SeedPolicy(Policy):
    """Random among the best three on announced load plus this caller's outstanding."""

    name = "seed"

    async def start(self) -> None:
        self._rng = random.Random(17)
        self._out: list[dict[str, int]] = [{} for _ in self.callers]
        self._views: list[list[dict[str, Any]]] = [[] for _ in self.callers]
        self._by_endpoint = {t.gateway: t for t in self.targets}
        await asyncio.gather(*(self._refresh(c) for c in range(len(self.callers))))
        self._task = asyncio.create_task(self._refresh_loop())

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _refresh(self, c: int) -> None:
        url = f"{self.callers[c]}/api/services/llm?limit=50"
        try:
            async with self.session.get(url) as resp:
                body = await resp.json()
            self._views[c] = [w for w in body.get("workers", [])
                              if w.get("endpoint") in self._by_endpoint]
        except (TimeoutError, aiohttp.ClientError, ValueError):
            pass                                       # keep the last view

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(SEED_REFRESH_S)
            await asyncio.gather(*(self._refresh(c) for c in range(len(self.callers))))

    def order(self, caller: int) -> list[Target]:
        out = self._out[caller]

        def score(w: dict[str, Any]) -> float:
            cap = float(w.get("capacity") or 0)
            if cap <= 0:
                return float(w["score"])
            load = float(w.get("load") or 0)
            free = min(1.0, max(0.0, (cap - load) / cap))
            mine = min(1.0, max(0.0, (cap - load - out.get(w["endpoint"], 0)) / cap))
            return float(w["score"]) - (free - mine)      # the free term's weight is 1.0
        ranked = sorted(self._views[caller], key=score, reverse=True)
        targets = [self._by_endpoint[w["endpoint"]] for w in ranked] or list(self.targets)
        first = self._rng.randrange(min(3, len(targets)))
        return [targets[first], *targets[:first], *targets[first + 1:]]

    def taken(self, t: Target, caller: int, delta: int) -> None:
        out = self._out[caller]
        out[t.gateway] = out.get(t.gateway, 0) + delta

    async def send(self, caller: int) -> tuple[int, int]:
        return await self._direct(self.order(caller), caller)


# ---------------------------------------------------------------------- the workload
def arrivals(rate: float, seconds: float, callers: int, seed: int) -> list[tuple[float, int]]:
    """Open-loop Poisson arrivals: (offset s, caller), each caller ``rate / callers``;
    the same for every policy of a load level (same seed)."""
    rng = random.Random(seed)
    out: list[tuple[float, int]] = []
    for c in range(callers):
        t = 0.0
        while True:
            t += rng.expovariate(rate / callers)
            if t >= seconds:
                break
            out.append((t, c))
    return sorted(out)


@dataclass
class Cell:
    """One (load, policy) run: every request's outcome."""

    latencies: list[float] = field(default_factory=list)   # s, 200 answers only
    first_byte: list[float] = field(default_factory=list)  # s to the answer's first byte
    statuses: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    sent: int = 0
    unfinished: int = 0
    start: float = 0.0
    seconds: float = 0.0


async def run_cell(policy: Policy, schedule: list[tuple[float, int]], seconds: float,
                   drain_s: float) -> Cell:
    """Send ``schedule`` through ``policy`` at its times (latency counted from the
    scheduled time: a late send is the dispatcher's delay, not hidden); wait at most
    ``drain_s`` after the last arrival for the answers."""
    cell = Cell(seconds=seconds)
    await policy.start()
    tasks: list[asyncio.Task[None]] = []

    async def one(at: float, caller: int) -> None:
        try:
            status, attempts = await policy.send(caller)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            key = type(exc).__name__
        else:
            key = str(status)
            cell.retries += max(0, attempts - 1)
            if status == 200:
                cell.latencies.append(time.monotonic() - at)
                cell.first_byte.append(FIRST_BYTE.get() - at)
        cell.statuses[key] = cell.statuses.get(key, 0) + 1

    cell.start = t0 = time.monotonic()
    for offset, caller in schedule:
        delay = t0 + offset - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(t0 + offset, caller)))
        cell.sent += 1
    _done, pending = await asyncio.wait(tasks, timeout=drain_s) if tasks else (set(), set())
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    cell.unfinished = len(pending)
    await policy.stop()
    return cell


def pct(xs: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``xs``; nan when empty."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]
