"""The RPC engine: pending calls, round-trip times, timeouts, retransmission, reply budget.

Replaces rpcudp's machinery under ``RMAProtocol`` (it keeps rpcudp's datagram format,
see ``wire``):

* **C msgpack both ways** (``_call`` replaces rpcudp's ``__getattr__`` closure): plain
  kademlia spends a quarter of its CPU in the pure-Python ``umsgpack``.
* **Adaptive timeouts.** Each peer address has a Jacobson/Karels estimator
  (RTO = SRTT + 4·RTTVAR, clamped to [``rto_min``, ``rto_max``]; an unknown peer gets the
  node-wide estimate, or ``rto_initial`` before any sample); a timeout doubles that peer's
  RTO (Karn); a reply that arrives after its timeout still feeds the estimators. A timer
  that fires late because our own loop was busy is re-armed (up to 3 times) instead of
  blaming the peer, and every timeout waits one more loop turn so a reply already in the
  socket buffer is read first. A missed reply is counted, never logged at ERROR.
  Defaults: floor 200 ms, ceiling 2 s, initial 500 ms. The floor is well above a LAN RTT
  on purpose: lookups do not wait for timeouts (crawls hedge after a few RTTs, see
  ``crawling``), so the RTO only decides when a peer is *declared* unresponsive, and a
  busy process (GC pause, a burst of announces) must not evict live contacts. At most
  ``max_inflight`` (64) requests are on the wire at once; a burst queues before its
  timers start.
* **Bounded answers**: large answers (> 1 KiB) to one source IP are limited to
  ``reply_rate`` bytes/s (2 MB/s default, loopback exempt), so the node is a poor
  reflector for spoofed-source floods.
* **Nothing a peer sends raises**: rejected datagrams are counted in ``drops[reason]``
  (exported as a Prometheus counter by the component); peer-caused log lines go through
  a token bucket per kind, so a flood produces a handful of lines, not one per datagram.

``RpcEngine`` is a mixin: the protocol class calls ``_init_rpc`` and provides ``_rpcs``
(the table of handlers, see ``wire.RpcTable``) and ``handle_call_response``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter, OrderedDict
from typing import Any

import msgpack

from agent.dht.wire import MAX_PAYLOAD, RpcTable, _norm_host, check_request, decode_datagram
from agent.ratelimit import RateLimiter, TokenBucket

log = logging.getLogger("agent.dht.protocol")  # one logger name for the whole wire

QUEUE_FULL = "queue_full"   # the result of a call refused because the wait queue is full


class _Pending:
    """One request awaiting its reply."""

    __slots__ = ("address", "datagram", "deadline", "extensions", "fut", "graced", "name",
                 "resent", "retries_left", "sent_at", "timer", "wait")

    def __init__(self, fut: asyncio.Future[Any], timer: asyncio.TimerHandle,
                 address: tuple[str, int], sent_at: float, name: str, wait: float) -> None:
        self.fut = fut
        self.timer = timer
        self.address = address
        self.sent_at = sent_at
        self.name = name
        self.wait = wait
        self.deadline = sent_at + wait
        self.extensions = 0
        self.graced = False
        self.datagram = b""
        self.retries_left = 0
        self.resent = False


class RttEstimator:
    """Jacobson/Karels smoothed RTT (RFC 6298 gains) with Karn back-off."""

    __slots__ = ("backoff", "rttvar", "srtt")

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.backoff = 1.0

    def sample(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.backoff = 1.0

    def rto(self, lo: float, hi: float, initial: float) -> float:
        if self.srtt is None:
            return min(hi, initial * self.backoff)
        return min(hi, max(lo, self.srtt + 4 * self.rttvar) * self.backoff)



class RpcEngine:
    """Send requests and match replies; dispatch validated requests to handlers."""

    _rpcs: RpcTable
    transport: Any

    def _init_rpc(self, *, rto_min: float, rto_max: float, rto_initial: float,
                  max_inflight: int, retransmits: int, reply_rate: float,
                  max_queue: int = 4096) -> None:
        self.rto_min, self.rto_max, self.rto_initial = rto_min, rto_max, rto_initial
        self.loop = asyncio.get_event_loop()
        # msg_id -> (future, timer, address, sent_at, rpc name)
        self._outstanding: dict[bytes, _Pending] = {}
        # at most max_inflight requests on the wire: a burst (a coordinator republishing
        # hundreds of records) queues here, before its timers start, instead of timing
        # out on replies that are merely queued behind it
        self._slots = asyncio.Semaphore(max_inflight)
        # ... and at most max_queue wait behind them: past that a call fails at once
        # (``(False, QUEUE_FULL)``, not held against the peer) instead of piling up
        self.max_queue = max_queue
        self._waiting = 0
        self.queued = 0
        self.timeout_extensions = 0
        self.retransmits = retransmits
        self.retransmissions = 0
        self._rtt: OrderedDict[tuple[str, int], RttEstimator] = OrderedDict()
        self._rtt_global = RttEstimator()
        self.fast_rtt: float | None = None
        self.reply_rate = reply_rate
        self._reply_buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.peer_log = RateLimiter(rate=0.1, burst=5, logger=log)
        # counters (exported by the component)
        self.drops: Counter[str] = Counter()
        self.rx: Counter[str] = Counter()
        self.tx: Counter[str] = Counter()
        self.timeouts: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.late_responses = 0
        self._late: OrderedDict[bytes, tuple[tuple[str, int], float]] = OrderedDict()

    def _alive(self, address: tuple[str, int]) -> None:
        """A reply came from ``address`` after its timeout (the liveness mixin overrides)."""

    # ================================================================ incoming
    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        try:
            self._solve_datagram(data, addr)
        except Exception as exc:  # a bug of ours must not kill the transport either
            self.drops["internal_error"] += 1
            self.peer_log(logging.WARNING, "internal", "dht: error handling datagram from %s: %r",
                          addr, exc)

    def _drop(self, reason: str, addr: Any) -> None:
        self.drops[reason] += 1
        self.peer_log(logging.DEBUG, reason, "dht: dropped datagram from %s: %s", addr, reason)

    def _solve_datagram(self, datagram: bytes, address: tuple[str, int]) -> None:
        decoded = decode_datagram(datagram)
        if isinstance(decoded, str):
            return self._drop(decoded, address)
        kind, msg_id, data = decoded
        if kind == 0:
            self._accept_request(msg_id, data, address)
        else:
            self._accept_response(msg_id, data, address)
        return None

    def _accept_request(self, msg_id: bytes, data: Any, address: tuple[str, int]) -> None:
        checked = check_request(data, self._rpcs)
        if isinstance(checked, str):
            return self._drop(checked, address)
        name, handler, args = checked
        self.rx[name] += 1
        try:
            result = handler(address, *args)
        except Exception as exc:
            self.drops["handler_error"] += 1
            self.peer_log(logging.WARNING, "handler", "dht: rpc %s from %s failed: %r",
                          name, address, exc)
            return None
        if asyncio.iscoroutine(result):
            task = self.loop.create_task(result)
            self._tasks.add(task)
            task.add_done_callback(lambda t: self._async_done(t, msg_id, address, name))
            return None
        self._respond(msg_id, result, address)
        return None

    def _async_done(self, task: asyncio.Task[Any], msg_id: bytes, address: tuple[str, int],
                    name: str) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.drops["handler_error"] += 1
            self.peer_log(logging.WARNING, "handler", "dht: rpc %s from %s failed: %r",
                          name, address, exc)
            return
        self._respond(msg_id, task.result(), address)

    def _respond(self, msg_id: bytes, result: Any, address: tuple[str, int]) -> None:
        try:
            payload = msgpack.packb(result, use_bin_type=True)
        except Exception:
            self.drops["unpackable_response"] += 1
            return
        if len(payload) > MAX_PAYLOAD:
            self.drops["response_too_big"] += 1
            return
        if len(payload) > 1024 and not self._reply_budget(address[0], len(payload)):
            self.drops["reply_rate_limited"] += 1
            return
        self._send(b"\x01" + msg_id + payload, address)

    def _reply_budget(self, host: str, size: int) -> bool:
        """Bytes of large answers per source IP (``reply_rate`` B/s, burst twice that).

        A ~60-byte find_providers request can draw an 8 KiB answer; with a spoofed source
        address that is a 100x reflector. Loopback is exempt: it cannot be spoofed from
        off the host (and the in-process tests and benchmark all live there)."""
        if host.startswith("127.") or host == "::1" or self.reply_rate <= 0:
            return True
        b = self._reply_buckets.get(host)
        if b is None:
            if len(self._reply_buckets) >= 4096:
                self._reply_buckets.popitem(last=False)
            b = self._reply_buckets[host] = TokenBucket(self.reply_rate, 2 * self.reply_rate)
        else:
            self._reply_buckets.move_to_end(host)
        return b.take(size)

    def _send(self, data: bytes, address: tuple[str, int]) -> bool:
        t = self.transport
        if t is None or t.is_closing():
            return False
        try:
            t.sendto(data, address)
        except (OSError, ValueError, TypeError):
            self.failed["send"] += 1
            return False
        return True

    def _accept_response(self, msg_id: bytes, data: Any, address: tuple[str, int]) -> None:  # type: ignore[override]
        entry = self._outstanding.get(msg_id)
        if entry is None:
            late = self._late.pop(msg_id, None)
            if late is not None:
                # answered after its timeout: not hostile, and the RTT it shows is real
                # (ids are never reused, so unlike TCP the sample is unambiguous) — feed
                # it, or the estimator would never learn that replies got slower
                self.late_responses += 1
                sent_to, sent_at = late
                if (_norm_host(address[0]), address[1]) == (_norm_host(sent_to[0]), sent_to[1]):
                    self._rtt_sample(sent_to, self.loop.time() - sent_at)
                    self._alive(sent_to)
                return None
            return self._drop("unknown_msgid", address)
        sent_to = entry.address
        if address != sent_to and ((_norm_host(address[0]), address[1])
                                   != (_norm_host(sent_to[0]), sent_to[1])):
            return self._drop("addr_mismatch", address)
        del self._outstanding[msg_id]
        entry.timer.cancel()
        if not entry.resent:  # Karn: a reply to a resent request is an ambiguous sample
            self._rtt_sample(sent_to, self.loop.time() - entry.sent_at)
        if not entry.fut.done():
            entry.fut.set_result((True, data))
        return None

    def _rtt_sample(self, address: tuple[str, int], rtt: float) -> None:
        est = self._rtt.get(address)
        if est is None:
            est = self._rtt[address] = RttEstimator()
            if len(self._rtt) > 4096:
                self._rtt.popitem(last=False)
        est.sample(rtt)
        self._rtt_global.sample(rtt)
        # a fast-moving average (gain 1/2) for hedging decisions: forgets a burst of
        # load within a few replies, where SRTT (gain 1/8) would take dozens
        self.fast_rtt = rtt if self.fast_rtt is None else 0.5 * (self.fast_rtt + rtt)

    # ================================================================ outgoing
    def rto(self, address: tuple[str, int] | None = None) -> float:
        """Current retransmission timeout for ``address`` (node-wide estimate if unknown)."""
        est = self._rtt.get(address) if address is not None else None  # type: ignore[arg-type]
        if est is None:
            est = self._rtt_global
        return est.rto(self.rto_min, self.rto_max, self.rto_initial)

    def my_id(self) -> bytes:
        """The node id we send: ours in server mode, ``b""`` in client mode."""
        return b"" if self.mode == "client" else self.source_node.id

    async def _call(self, address: tuple[str, int], name: str, *args: Any,
                    timeout: float | None = None) -> tuple[bool, Any]:  # noqa: ASYNC109 (the per-request timer, not a wrapper)
        """Send request ``name(*args)`` to ``address``; ``(True, result)`` or ``(False, None)``
        after ``timeout`` (default: the adaptive RTO of that peer)."""
        payload = msgpack.packb([name, args], use_bin_type=True)
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"rpc {name}: request of {len(payload)} bytes exceeds 8 KiB")
        if self._slots.locked():
            if self._waiting >= self.max_queue:
                self.drops["rpc_queue_full"] += 1
                return (False, QUEUE_FULL)
            self.queued += 1
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            return await self._send_and_wait(address, name, payload, timeout)
        finally:
            self._slots.release()

    async def _send_and_wait(self, address: tuple[str, int], name: str, payload: bytes,
                             timeout: float | None) -> tuple[bool, Any]:  # noqa: ASYNC109
        loop = self.loop
        msg_id = os.urandom(20)
        fut: asyncio.Future[Any] = loop.create_future()
        wait = self.rto(address) if timeout is None else timeout
        now = loop.time()
        entry = _Pending(fut, loop.call_later(wait, self._timeout, msg_id), address, now,
                         name, wait)
        self._outstanding[msg_id] = entry
        self.tx[name] += 1
        entry.datagram = b"\x00" + msg_id + payload
        if timeout is None:
            # adaptive timer: a lost datagram is sent again before the peer is called
            # unresponsive (requests are idempotent; the same msg id is reused)
            entry.retries_left = self.retransmits
        if not self._send(entry.datagram, address):
            entry.timer.cancel()
            self._outstanding.pop(msg_id, None)
            return (False, None)
        try:
            return await fut
        finally:
            if msg_id in self._outstanding:  # cancelled while waiting
                self._outstanding.pop(msg_id).timer.cancel()

    def _timeout(self, msg_id: bytes) -> None:  # type: ignore[override]
        """A request's timer fired. Before calling the peer unresponsive, make sure it is
        not our own loop that was slow: if the timer fired late (the loop was busy), or
        the reply may be sitting unread in the socket buffer, re-arm it (bounded)."""
        entry = self._outstanding.get(msg_id)
        if entry is None:
            return
        loop = self.loop
        now = loop.time()
        lag = now - entry.deadline
        if entry.extensions < 3 and lag > max(0.005, 0.25 * entry.wait):
            entry.extensions += 1
            entry.deadline = now + entry.wait
            entry.timer = loop.call_later(entry.wait, self._timeout, msg_id)
            self.timeout_extensions += 1
            return
        if not entry.graced:
            # one more loop turn: a poll phase runs before this fires again
            entry.graced = True
            entry.deadline = now
            entry.timer = loop.call_later(0, self._timeout, msg_id)
            return
        if entry.retries_left > 0 and self._send(entry.datagram, entry.address):
            # Lost request or lost reply: on a lossy path one retransmission turns a 10 %
            # datagram loss into a ~4 % request loss. Same timer again: one small request
            # is no congestion signal, and a dead peer is declared after 2 RTOs, not 3.
            entry.retries_left -= 1
            entry.resent = True
            entry.deadline = now + entry.wait
            entry.graced = False
            entry.timer = loop.call_later(entry.wait, self._timeout, msg_id)
            self.retransmissions += 1
            return
        del self._outstanding[msg_id]
        fut, address, sent_at, name = entry.fut, entry.address, entry.sent_at, entry.name
        self.timeouts[name] += 1
        self._late[msg_id] = (address, sent_at)
        if len(self._late) > 2048:
            self._late.popitem(last=False)
        est = self._rtt.get(address)
        if est is not None:
            est.backoff = min(est.backoff * 2, 64.0)
        if not fut.done():
            fut.set_result((False, None))

    def __getattr__(self, name: str) -> Any:
        # rpcudp turns *any* unknown attribute into a remote call; only our RPC names do.
        if name.startswith("_") or name.startswith("rpc_"):
            raise AttributeError(name)
        rpcs = self.__dict__.get("_rpcs")
        if rpcs is not None and name in rpcs:
            return lambda address, *args: self._call(address, name, *args)
        raise AttributeError(name)

    def close(self) -> None:
        """Fail every outstanding request and cancel handler tasks (on stop)."""
        for entry in list(self._outstanding.values()):
            entry.timer.cancel()
            if not entry.fut.done():
                entry.fut.set_result((False, None))
        self._outstanding.clear()
        for t in list(self._tasks):
            t.cancel()

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

