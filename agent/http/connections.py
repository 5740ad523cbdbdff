"""The connections one listener holds: caps, eviction, deadlines, and what was shed.

A :class:`ConnectionTable` is shared by every connection of one listener. It decides at
accept time whether a connection may stay (per-address and total caps), which held
connection to close to make room, which heads in progress to close when their memory
grows past the budget, and — from a periodic sweep — which deadlines passed. Everything it
closes is counted in ``rma_agent_http_shed_total{listener, reason}`` and said in the
journal at most once a minute per listener and reason, with how many were suppressed
(a flood must not become a log flood).

The connections themselves are :class:`agent.http.listener.GuardedHandler`; this module
only needs the small :class:`Held` interface of them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from agent.http.budget import ListenerLimits
from agent.ratelimit import RateLimiter

log = logging.getLogger("rma_agent.http")

IDLE, HEAD, ACTIVE = 0, 1, 2     # waiting for a request / a head arriving / a request in work

# reason -> (status sent before closing or 0 for none, what the journal says)
SHED_REASONS: dict[str, tuple[int, str]] = {
    "address_cap": (503, "refused new connections: one address holds its cap"),
    "total_cap": (503, "refused new connections: the listener is full of busy ones"),
    "evicted": (503, "closed idle or half-sent connections to make room"),
    "head_too_large": (431, "closed connections whose request head passed its size cap"),
    "head_memory": (503, "closed the oldest heads in progress: their memory passed the "
                         "budget"),
    "head_timeout": (408, "closed connections whose request head did not arrive in time"),
    "body_timeout": (0, "closed connections whose request body stalled"),
    "send_timeout": (0, "closed connections that stopped reading their answer"),
    # not a defence: the caller left while its upload waited; closing cancels the handler
    "peer_gone": (0, "closed connections whose caller hung up while its request waited"),
}
_QUIET_REASONS = frozenset({"peer_gone"})   # journalled at info, not as a warning


class Held(Protocol):
    """What the table needs of a connection (``GuardedHandler``)."""

    state: int
    since: float          # when it entered its state (IDLE/HEAD) or last read (ACTIVE)
    head_bytes: int
    served: int           # requests begun on this connection
    key: str

    def stalled(self, now: float, limits: ListenerLimits) -> str | None: ...
    def evictable(self) -> bool: ...
    def shed(self, status: int, message: str) -> None: ...
    def close_idle(self) -> None: ...


class ListenerMetrics:
    """The listeners' metrics, registered once per agent registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.shed = Counter("rma_agent_http_shed", "Connections a listener refused or closed "
                            "to protect itself, by reason", ["listener", "reason"],
                            registry=registry)
        self.idle_closed = Counter("rma_agent_http_idle_closed", "Kept-alive connections "
                                   "closed after the keep-alive timeout (normal)",
                                   ["listener"], registry=registry)
        self.open = Gauge("rma_agent_http_connections", "Connections a listener holds",
                          ["listener"], registry=registry)
        self.head_bytes = Gauge("rma_agent_http_head_bytes", "Bytes of request heads in "
                                "progress", ["listener"], registry=registry)
        self.limit = Gauge("rma_agent_http_connection_limit", "A listener's connection "
                           "caps", ["listener", "kind"], registry=registry)


class ConnectionTable:
    """The connections of one listener (``name``: "admin" or "gateway")."""

    def __init__(self, name: str, limits: ListenerLimits, metrics: ListenerMetrics) -> None:
        self.name = name
        self.limits = limits
        self.conns: set[Held] = set()
        self.idle: dict[Held, None] = {}            # IDLE or HEAD, oldest first
        self.heads: dict[Held, None] = {}           # HEAD, oldest head first
        self.by_key: dict[str, dict[Held, None]] = {}
        self.head_bytes = 0
        self.shed_counts: dict[str, int] = dict.fromkeys(SHED_REASONS, 0)
        self._journal = RateLimiter(rate=1 / 60, burst=1, logger=log)
        self._metrics = metrics
        self._shed = {r: metrics.shed.labels(name, r) for r in SHED_REASONS}
        self._idle_closed = metrics.idle_closed.labels(name)
        metrics.open.labels(name).set_function(lambda: len(self.conns))
        metrics.head_bytes.labels(name).set_function(lambda: self.head_bytes)
        metrics.limit.labels(name, "total").set(limits.max_connections)
        metrics.limit.labels(name, "per_address").set(limits.max_per_address)
        self._sweeper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ accounting
    def count(self, reason: str) -> None:
        """Count one shed connection and tell the journal (rate-limited)."""
        self.shed_counts[reason] += 1
        self._shed[reason].inc()
        level = logging.INFO if reason in _QUIET_REASONS else logging.WARNING
        self._journal(level, reason, "%s listener: %s (%d open, cap %d total, "
                      "%d per address; rma_agent_http_shed_total counts each)", self.name,
                      SHED_REASONS[reason][1], len(self.conns), self.limits.max_connections,
                      self.limits.max_per_address)

    def shed(self, conn: Held, reason: str) -> None:
        """Close ``conn`` for ``reason`` (with its status line, if it has one); it is
        forgotten at once, so a loop making room never picks it twice."""
        self.count(reason)
        self.forget(conn)
        conn.shed(SHED_REASONS[reason][0], SHED_REASONS[reason][1])

    def admit(self, conn: Held) -> str | None:
        """Take ``conn`` in, making room if needed; the shed reason when it may not stay."""
        same = self.by_key.get(conn.key)
        if same is not None and len(same) >= self.limits.max_per_address:
            victim = next((c for c in same if c.evictable()), None)
            if victim is None:
                self.count("address_cap")
                return "address_cap"
            self.shed(victim, "evicted")
        if len(self.conns) >= self.limits.max_connections:
            victim = next((c for c in self.idle if c.evictable()), None)
            if victim is None:
                self.count("total_cap")
                return "total_cap"
            self.shed(victim, "evicted")
        self.conns.add(conn)
        self.idle[conn] = None
        self.by_key.setdefault(conn.key, {})[conn] = None
        return None

    def forget(self, conn: Held) -> None:
        """``conn`` closed: drop it everywhere (idempotent)."""
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        self.idle.pop(conn, None)
        self.head_done(conn)
        same = self.by_key.get(conn.key)
        if same is not None:
            same.pop(conn, None)
            if not same:
                del self.by_key[conn.key]

    def head_started(self, conn: Held) -> None:
        self.heads[conn] = None

    def head_grew(self, conn: Held, n: int) -> None:
        """``n`` more bytes of ``conn``'s head arrived: enforce both head bounds."""
        conn.head_bytes += n
        self.head_bytes += n
        if conn.head_bytes > self.limits.max_head_bytes:
            self.shed(conn, "head_too_large")
            return
        while self.head_bytes > self.limits.heads_budget_bytes and self.heads:
            self.shed(next(iter(self.heads)), "head_memory")

    def head_done(self, conn: Held) -> None:
        if self.heads.pop(conn, ...) is not ...:
            self.head_bytes -= conn.head_bytes
        conn.head_bytes = 0

    def became_active(self, conn: Held) -> None:
        self.head_done(conn)
        self.idle.pop(conn, None)

    def became_idle(self, conn: Held) -> None:
        if conn in self.conns:
            self.idle[conn] = None           # to the end: the newest idle one

    # ------------------------------------------------------------------ deadlines
    def sweep(self, now: float) -> None:
        """Close every connection whose deadline passed."""
        lim = self.limits
        for conn in list(self.conns):
            state = conn.state
            if state == IDLE:
                if now - conn.since > (lim.keepalive_timeout if conn.served
                                       else lim.head_timeout):
                    if conn.served:
                        self._idle_closed.inc()
                        self.forget(conn)
                        conn.close_idle()
                    else:
                        self.shed(conn, "head_timeout")   # connected, never sent a head
            elif state == HEAD:
                if now - conn.since > lim.head_timeout:
                    self.shed(conn, "head_timeout")
            else:
                reason = conn.stalled(now, lim)
                if reason is not None:
                    self.shed(conn, reason)

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.limits.sweep_interval()
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep(loop.time())
            except Exception:          # a bug here must not stop the deadlines for good
                log.exception("%s listener: sweep failed", self.name)

    async def stop(self, *_: object) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
