"""The RPC engine: pending calls, round-trip times, timeouts, retransmission, reply budget.

``RpcEngine`` is the datagram endpoint of a node (an ``asyncio.DatagramProtocol``) and
replaces rpcudp's machinery (it keeps rpcudp's datagram format, see ``wire``):

* **C msgpack both ways**: plain kademlia spends a quarter of its CPU in the pure-Python
  ``umsgpack``.
* **Adaptive timeouts** (``rtt.RttEstimator``, RFC 6298). Each peer address has its own
  SRTT/RTTVAR (RTO = SRTT + max(G, 4·RTTVAR), clamped to [``rto_min``, ``rto_max``]); an
  unknown peer gets the node-wide estimate, or ``rto_initial`` (1 s, RFC 6298) before any
  sample. A request with the adaptive timer is sent again once after its RTO, with the
  *same* request id (requests are idempotent, so kademlia's framing is unchanged and a
  reply to either copy completes it), and the second timer is twice the first (back-off):
  a datagram lost in a burst is not a lost request. Only when the retransmission also
  goes unanswered does the request count as lost (``(False, None)``), and that peer's RTO
  doubles until its next sample. Karn's rule: a reply to a retransmitted request is never
  sampled (it may answer either copy), also when it arrives after the timeout; a late
  reply to a request sent once is sampled (its id is unique: unambiguous), so the
  estimator learns that a path got slower. A timer that fires late because our own loop
  was busy is re-armed (up to 3 times) instead of blaming the peer, and every timeout
  waits one more loop turn so a reply already in the socket buffer is read first. A
  missed reply is counted, never logged at ERROR. Defaults: floor 200 ms, ceiling 2 s.
  The floor is well above a LAN RTT on purpose: lookups do not wait for timeouts (crawls
  hedge, see ``crawling``), so the RTO only decides when a request is *lost*, and a busy
  process (GC pause, a burst of announces) must not make live contacts look dead. At most
  ``max_inflight`` (64) requests are on the wire at once; a burst queues before its
  timers start.
* **Bounded answers**: large answers (> 1 KiB) to one source IP are limited to
  ``reply_rate`` bytes/s (2 MB/s default, loopback exempt), so the node is a poor
  reflector for spoofed-source floods.
* **Nothing a peer sends raises**: rejected datagrams are counted in ``drops[reason]``
  (exported as a Prometheus counter by the component); peer-caused log lines go through
  a token bucket per kind, so a flood produces a handful of lines, not one per datagram.

Composition: the engine is given its table of handlers (``wire.RpcTable``) and a
``WireGate`` — the policy that screens requests and replies by source address
(``flood_gate.RequestGate``; ``OPEN_GATE`` lets everything through) — in its
constructor, and ``on_late_reply`` (contact liveness forgets a peer's failures). It
knows nothing of kademlia, records or routing; ``exchange`` is the one way out.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, cast

import msgpack

from agent.dht.rtt import RttEstimator
from agent.dht.wire import (
    HEADER,
    MAX_PAYLOAD,
    RpcTable,
    _norm_host,
    check_request,
    decode_datagram,
)
from agent.ratelimit import RateLimiter, TokenBucket

log = logging.getLogger("agent.dht.protocol")  # one logger name for the whole wire

QUEUE_FULL = "queue_full"   # the result of a call refused because the wait queue is full
Address = tuple[str, int]
SUPPRESS: Any = object()     # ``WireGate.screen_reply``: send nothing


class WireGate(Protocol):
    """What the engine asks about traffic by source address (see ``flood_gate``)."""

    def inbound(self, data: Any, address: Address, size: int) -> tuple[Any, bool]:
        """A request body of ``size`` datagram bytes: (the body without any token,
        whether it carried a valid token for ``address``)."""
        ...

    def screen_reply(self, result: Any, size: int, address: Address) -> Any:
        """What to send for a handler's ``result`` (``size`` bytes on the wire):
        ``result`` itself, a replacement, or ``SUPPRESS``."""
        ...

    def replied(self, address: Address) -> None:
        """``address`` answered one of our requests (it reads datagrams sent there)."""
        ...


class _OpenGate:
    """No screening: every request is token-less, every reply goes out."""

    def inbound(self, data: Any, address: Address, size: int) -> tuple[Any, bool]:
        return data, False

    def screen_reply(self, result: Any, size: int, address: Address) -> Any:
        return result

    def replied(self, address: Address) -> None:
        return None


OPEN_GATE: WireGate = _OpenGate()


class _Pending:
    """One request awaiting its reply."""

    __slots__ = ("address", "datagram", "deadline", "extensions", "fut", "graced", "name",
                 "resent", "retries_left", "sent_at", "timer", "wait")

    def __init__(self, fut: asyncio.Future[Any], timer: asyncio.TimerHandle,
                 address: Address, sent_at: float, name: str, wait: float) -> None:
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


class RpcEngine(asyncio.DatagramProtocol):
    """Send requests and match replies; dispatch validated requests to handlers."""

    def __init__(self, handlers: RpcTable, *, gate: WireGate = OPEN_GATE,
                 rto_min: float = 0.2, rto_max: float = 2.0, rto_initial: float = 1.0,
                 max_inflight: int = 64, retransmits: int = 1,
                 reply_rate: float = 2_000_000.0,
                 on_late_reply: Callable[[Address], None] | None = None,
                 drops: Counter[str] | None = None, failed: Counter[str] | None = None
                 ) -> None:
        self.handlers = handlers
        self.gate = gate
        self.on_late_reply = on_late_reply
        self.transport: asyncio.DatagramTransport | None = None
        self.rto_min, self.rto_max, self.rto_initial = rto_min, rto_max, rto_initial
        self.loop = asyncio.get_event_loop()
        self._outstanding: dict[bytes, _Pending] = {}
        # at most max_inflight requests on the wire: a burst (a coordinator republishing
        # hundreds of records) queues here, before its timers start, instead of timing
        # out on replies that are merely queued behind it
        self._slots = asyncio.Semaphore(max_inflight)
        self.queued = 0
        self.timeout_extensions = 0
        self.retransmits = retransmits
        self.retransmissions = 0
        self._rtt: OrderedDict[Address, RttEstimator] = OrderedDict()
        self._rtt_global = RttEstimator()
        # requests on the wire that had to be retransmitted, per address: the peer
        # missed its RTO (as the lag-aware timer judges it) and has not answered since
        self._resent: Counter[Address] = Counter()
        self.fast_rtt: float | None = None
        self.reply_rate = reply_rate
        self._reply_buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.peer_log = RateLimiter(rate=0.1, burst=5, logger=log)
        # the request being dispatched carried a valid write token (see ``gate``):
        # handlers run synchronously inside ``_accept_request`` and read it there
        self.request_token_ok = False
        # counters (exported by the component)
        self.drops: Counter[str] = drops if drops is not None else Counter()
        self.failed: Counter[str] = failed if failed is not None else Counter()
        self.rx: Counter[str] = Counter()
        self.tx: Counter[str] = Counter()
        self.timeouts: Counter[str] = Counter()
        self.late_responses = 0
        self.lost = 0            # requests given up on after every retransmission
        # msg id -> (sent to, sent at, sent more than once) of requests given up on
        self._late: OrderedDict[bytes, tuple[Address, float, bool]] = OrderedDict()

    # ================================================================ incoming
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a datagram transport (selector-based ones do not subclass DatagramTransport)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        try:
            self._solve_datagram(data, addr)
        except Exception as exc:  # a bug of ours must not kill the transport either
            self.drops["internal_error"] += 1
            self.peer_log(logging.WARNING, "internal", "dht: error handling datagram from %s: %r",
                          addr, exc)

    def _drop(self, reason: str, addr: Any) -> None:
        self.drops[reason] += 1
        self.peer_log(logging.DEBUG, reason, "dht: dropped datagram from %s: %s", addr, reason)

    def _solve_datagram(self, datagram: bytes, address: Address) -> None:
        decoded = decode_datagram(datagram)
        if isinstance(decoded, str):
            return self._drop(decoded, address)
        kind, msg_id, data = decoded
        if kind == 0:
            data, self.request_token_ok = self.gate.inbound(data, address, len(datagram))
            try:
                self._accept_request(msg_id, data, address)
            finally:
                self.request_token_ok = False
        else:
            self._accept_response(msg_id, data, address)
        return None

    def _accept_request(self, msg_id: bytes, data: Any, address: Address) -> None:
        checked = check_request(data, self.handlers)
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
        self.respond(msg_id, result, address)
        return None

    def _async_done(self, task: asyncio.Task[Any], msg_id: bytes, address: Address,
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
        self.respond(msg_id, task.result(), address)

    def respond(self, msg_id: bytes, result: Any, address: Address) -> None:
        """Send ``result`` as the reply to request ``msg_id`` — what the gate lets
        through (the result, a challenge instead, or nothing), within the size limit
        and the per-IP budget of large answers."""
        try:
            payload = msgpack.packb(result, use_bin_type=True)
        except Exception:
            self.drops["unpackable_response"] += 1
            return
        reply = self.gate.screen_reply(result, HEADER + len(payload), address)
        if reply is SUPPRESS:
            return
        if reply is not result:
            payload = msgpack.packb(reply, use_bin_type=True)
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

    def _send(self, data: bytes, address: Address) -> bool:
        t = self.transport
        if t is None or t.is_closing():
            return False
        try:
            t.sendto(data, address)
        except (OSError, ValueError, TypeError):
            self.failed["send"] += 1
            return False
        return True

    def _accept_response(self, msg_id: bytes, data: Any, address: Address) -> None:
        entry = self._outstanding.get(msg_id)
        if entry is None:
            late = self._late.pop(msg_id, None)
            if late is not None:
                # answered after its timeout: not hostile. The RTT of a request sent once
                # is real (its id is unique) — fed, or the estimator would never learn
                # that replies got slower; a retransmitted one's is ambiguous (Karn)
                self.late_responses += 1
                sent_to, sent_at, resent = late
                if (_norm_host(address[0]), address[1]) == (_norm_host(sent_to[0]), sent_to[1]):
                    self.gate.replied(address)
                    if not resent:
                        self._rtt_sample(sent_to, self.loop.time() - sent_at)
                    if self.on_late_reply is not None:
                        self.on_late_reply(sent_to)
                return None
            return self._drop("unknown_msgid", address)
        sent_to = entry.address
        if address != sent_to and ((_norm_host(address[0]), address[1])
                                   != (_norm_host(sent_to[0]), sent_to[1])):
            return self._drop("addr_mismatch", address)
        # it read our random message id: the address is real
        self.gate.replied(address)
        del self._outstanding[msg_id]
        entry.timer.cancel()
        self._settled(entry)
        if not entry.resent:  # Karn: a reply to a resent request is an ambiguous sample
            self._rtt_sample(sent_to, self.loop.time() - entry.sent_at)
        if not entry.fut.done():
            entry.fut.set_result((True, data))
        return None

    def _rtt_sample(self, address: Address, rtt: float) -> None:
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
    def rto(self, address: Address | None = None) -> float:
        """Current retransmission timeout for ``address`` (node-wide estimate if unknown)."""
        est = self._rtt.get(address) if address is not None else None
        if est is None:
            est = self._rtt_global
        return est.rto(self.rto_min, self.rto_max, self.rto_initial)

    def peer_srtt(self, address: Address) -> float | None:
        """The smoothed RTT of ``address`` (seconds), None if it never answered a request
        sent once (proximity: which of equally close contacts to ask first)."""
        est = self._rtt.get(address)
        return None if est is None else est.srtt

    def peer_rto_base(self, address: Address) -> float | None:
        """``address``'s SRTT + 4·RTTVAR before clamping and back-off, None if unknown:
        how long its replies can be expected to take (``crawling``'s hedge delay)."""
        est = self._rtt.get(address)
        return None if est is None or est.srtt is None else est.base(self.rto_initial)

    @property
    def srtt(self) -> float | None:
        """The node-wide smoothed RTT (seconds), None before any sample."""
        return self._rtt_global.srtt

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    async def exchange(self, address: Address, name: str, payload: bytes,
                       timeout: float | None = None,  # noqa: ASYNC109 (the per-request timer)
                       on_wire: Callable[[], None] | None = None) -> tuple[bool, Any]:
        """Send the request ``payload`` (msgpack ``[name, args(, token)]``) to ``address``
        once one of the ``max_inflight`` slots is free; ``(True, result)``, or
        ``(False, None)`` after ``timeout`` (default: the adaptive RTO of that peer, with
        retransmission). ``on_wire`` runs when the slot is taken (the caller's queue
        accounting: from then on the call is no longer waiting)."""
        if self._slots.locked():
            self.queued += 1
        async with self._slots:
            if on_wire is not None:
                on_wire()
            return await self._send_and_wait(address, name, payload, timeout)

    async def _send_and_wait(self, address: Address, name: str, payload: bytes,
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
                gone = self._outstanding.pop(msg_id)
                gone.timer.cancel()
                self._settled(gone)

    def _timeout(self, msg_id: bytes) -> None:
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
            # datagram loss into a ~4 % request loss. The second timer is twice the first
            # (RFC 6298 back-off): loss comes in bursts, and a burst that ate the first
            # copy should be over before the second one is given up on.
            entry.retries_left -= 1
            if not entry.resent:
                self._resent[entry.address] += 1
            entry.resent = True
            entry.wait = min(self.rto_max, 2 * entry.wait)
            entry.deadline = now + entry.wait
            entry.graced = False
            entry.timer = loop.call_later(entry.wait, self._timeout, msg_id)
            self.retransmissions += 1
            return
        del self._outstanding[msg_id]
        self._settled(entry)
        fut, address, sent_at, name = entry.fut, entry.address, entry.sent_at, entry.name
        self.timeouts[name] += 1
        self._late[msg_id] = (address, sent_at, entry.resent)
        if len(self._late) > 2048:
            self._late.popitem(last=False)
        self.lost += 1
        est = self._rtt.get(address)
        if est is not None:
            est.timed_out()
        if not fut.done():
            fut.set_result((False, None))

    def _settled(self, entry: _Pending) -> None:
        """``entry`` left the wire: it no longer counts in ``retransmitting``."""
        if entry.resent:
            n = self._resent[entry.address] - 1
            if n > 0:
                self._resent[entry.address] = n
            else:
                del self._resent[entry.address]

    def retransmitting(self, address: Address) -> bool:
        """A request to ``address`` missed its RTO and is still unanswered (it was sent
        again): what a store-set lookup stops waiting for (``crawling``).
        Judged by the lag-aware timer, so a busy loop does not make live peers look so."""
        return address in self._resent

    def close(self) -> None:
        """Fail every outstanding request and cancel handler tasks (on stop)."""
        self._resent.clear()
        for entry in list(self._outstanding.values()):
            entry.timer.cancel()
            if not entry.fut.done():
                entry.fut.set_result((False, None))
        self._outstanding.clear()
        for t in list(self._tasks):
            t.cancel()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` as a task of this endpoint (cancelled by ``close``)."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def local_host(self) -> str:
        """The address the socket is bound to ("0.0.0.0" when unknown)."""
        try:
            return str(self.transport.get_extra_info("sockname")[0]) \
                if self.transport is not None else "0.0.0.0"
        except Exception:
            return "0.0.0.0"
