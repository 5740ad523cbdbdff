"""How starved the processes running the nodes are, and a join that paces itself by it.

Why: at N = 5,000 one process holds thousands of nodes, and a node's replies leave only
when its process's event loop gets to them. A loop that runs late by more than a peer's
RTO margin (SRTT + 4 RTTVAR: tens of ms on a WAN link with little jitter) makes every
request to that process look lost: it is retransmitted, the extra datagrams make the loop
later still, and the run measures its own overload instead of the DHT (a previous
N = 5,000 --procs 2 --wan global join logged 154,815 retransmissions and never finished).
A real agent runs one node per process and answers in well under a millisecond, so the
benchmark's figures are only the network's while the loops keep up.

* :class:`LoopMeter` — in every process that runs nodes: a 20 ms timer records how late
  it fires (the loop's lag: the wait any datagram or timer of that process saw), and the
  garbage collector's pauses (a full collection over thousands of nodes' objects stops
  the loop for up to 1.3 s; one node's process never holds that many: ``calm_gc``).
  ``take()`` returns the window's figures and starts a new one.
* :class:`Pacer` / :func:`paced` — the join and the first announce keep at most
  ``limit`` in flight (a sliding window, not waves: a wave waits for its slowest
  member) and adapt ``limit`` to the loops' lag once a second: more while the lag stays
  low, half as many when it is high. The rest of the run is paced by time already (the
  republish round spreads its announces over the interval, lookups run one at a time or
  in fixed waves).
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from scale_net import pct

LAG_PERIOD = 0.02        # s between the meter's ticks
LAG_LOW_MS = 15.0        # p99 lag under which the join admits more nodes at once
LAG_HIGH_MS = 60.0       # p99 lag over which it halves them


def calm_gc() -> None:
    """No automatic full collections in this process (young ones go on as usual).

    A full collection walks every object the process holds: with thousands of nodes'
    tables, records and futures that stopped a shard's loop for up to 1.3 s at a time
    and 17 s in all during one N = 1,000 join (measured with :class:`LoopMeter`), so
    replies left late, were retransmitted, and the join paced itself down to 5 in
    flight. A real agent's process holds one node. Cycles that survive the young
    generations are collected by the explicit ``gc.collect()`` after the join
    (``Impl.settle``), which also freezes what is left. Young collections every 20,000
    allocations instead of 700: 6.4 s of the 87 CPU s of that join were young
    collections, each walking the many objects that survive a few ms (futures, RPCs
    in flight)."""
    gc.set_threshold(20_000, 20, 1_000_000_000)


class LoopMeter:
    """Event-loop lag and GC pauses of this process (see module)."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.gc_pauses: list[float] = []
        self._gc_start = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self.started = False

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        loop = asyncio.get_running_loop()
        self._due = loop.time() + LAG_PERIOD
        self._handle = loop.call_at(self._due, self._tick)
        gc.callbacks.append(self._on_gc)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.lags.append(now - self._due)
        if len(self.lags) > 100_000:        # nobody asked for a long time: keep the tail
            del self.lags[:50_000]
        self._due = now + LAG_PERIOD
        self._handle = loop.call_at(self._due, self._tick)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start:
            self.gc_pauses.append(time.perf_counter() - self._gc_start)
            self._gc_start = 0.0

    def take(self) -> dict[str, float]:
        """This window's lag (p50, p99, max ms) and GC pauses (count, total, max ms)."""
        lags, pauses = self.lags, self.gc_pauses
        self.lags, self.gc_pauses = [], []
        return {"lag_p50_ms": pct(lags, 50) * 1e3 if lags else 0.0,
                "lag_p99_ms": pct(lags, 99) * 1e3 if lags else 0.0,
                "lag_max_ms": max(lags, default=0.0) * 1e3,
                "gc_pauses": float(len(pauses)), "gc_ms": sum(pauses) * 1e3,
                "gc_max_ms": max(pauses, default=0.0) * 1e3}


def merge_lag(parts: list[dict[str, float]]) -> dict[str, float]:
    """Several processes' windows as one: the worst loop's lag, all GC pauses summed."""
    out = {k: max((p[k] for p in parts), default=0.0)
           for k in ("lag_p50_ms", "lag_p99_ms", "lag_max_ms", "gc_max_ms")}
    out["gc_pauses"] = sum(p["gc_pauses"] for p in parts)
    out["gc_ms"] = sum(p["gc_ms"] for p in parts)
    return out


class LoopHealth:
    """The driver's view: every second, every process's window, folded per phase."""

    def __init__(self, impl: Any) -> None:
        self.impl = impl
        self.phase = "join"
        self.last: dict[str, float] = {}
        self._per_phase: dict[str, dict[str, float]] = {}
        self._task: asyncio.Future[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            phase = self.phase      # the window belongs to the phase it was asked in (a
            try:                    # shard busy in the settle's collection answers late)
                self.last = await self.impl.lag()
            except RuntimeError:
                return                  # a shard ended: the run is over
            acc = self._per_phase.setdefault(phase, {})
            for k, v in self.last.items():
                if k in ("gc_pauses", "gc_ms"):
                    acc[k] = acc.get(k, 0.0) + v
                else:
                    acc[k] = max(acc.get(k, 0.0), v)
            acc["seconds_lag_over_high"] = acc.get("seconds_lag_over_high", 0.0) + (
                1.0 if self.last["lag_p99_ms"] > LAG_HIGH_MS else 0.0)

    def pop(self, phase: str) -> dict[str, float]:
        """The figures gathered while ``phase`` ran (prefixed ``loop_``)."""
        return {f"loop_{k}": v for k, v in self._per_phase.pop(phase, {}).items()}


class Pacer:
    """How many joins (or first announces) may be in flight, adapted to the loops' lag
    once a second."""

    def __init__(self, health: LoopHealth, most: int, least: int = 10) -> None:
        self.health = health
        self.most = most
        self.least = min(least, most)
        self.limit = min(most, max(self.least, most // 4))
        self._seen: dict[str, float] | None = None
        self.peak = self.limit

    def update(self) -> int:
        last = self.health.last
        if last is not self._seen and last:
            self._seen = last
            lag = last["lag_p99_ms"]
            if lag > LAG_HIGH_MS:
                self.limit = max(self.least, self.limit // 2)
            elif lag < LAG_LOW_MS:
                self.limit = min(self.most, self.limit + max(1, self.limit // 8))
            self.peak = max(self.peak, self.limit)
        return self.limit


async def paced(pacer: Pacer, items: list[Any], work: Callable[[Any], Awaitable[Any]],
                check: Callable[[], None], label: str = "") -> list[Any]:
    """``work(item)`` for every item, at most ``pacer.update()`` in flight; results in
    the items' order. ``check()`` runs before every admission round (the run's cap).
    Progress goes to stderr every 30 s (a join of thousands takes minutes)."""
    out: list[Any] = [None] * len(items)
    todo = list(range(len(items) - 1, -1, -1))
    flying: set[asyncio.Future[None]] = set()
    t0 = shown = time.monotonic()

    async def one(k: int) -> None:
        out[k] = await work(items[k])

    while todo or flying:
        check()
        while todo and len(flying) < pacer.update():
            flying.add(asyncio.ensure_future(one(todo.pop())))
        done, flying = await asyncio.wait(flying, timeout=0.5,
                                          return_when=asyncio.FIRST_COMPLETED)
        for f in done:
            f.result()
        if label and time.monotonic() - shown > 30:
            shown = time.monotonic()
            print(f"  {label}: {len(items) - len(todo) - len(flying)}/{len(items)} done in "
                  f"{shown - t0:.0f} s, {len(flying)} in flight, loop lag p99 "
                  f"{pacer.health.last.get('lag_p99_ms', 0):.0f} ms", file=sys.stderr,
                  flush=True)
    return out
