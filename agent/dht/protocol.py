"""The wire: kademlia's protocol made safe, fast and aware of signed provider records.

``RMAProtocol`` subclasses ``kademlia.protocol.KademliaProtocol`` and keeps rpcudp's
datagram format (``0x00|0x01`` + 20-byte message id + msgpack ``[name, args]`` /
result), so it still talks to plain kademlia peers for ping/find_node. What changes:

* **Nothing a peer sends raises.** Every datagram is size-checked (> 8 KiB + header is
  dropped), decoded with the C ``msgpack`` library under strict limits, and every request
  is checked against an explicit table of RPCs with arity and argument types before a
  handler runs. Anything else is dropped and counted in ``drops[reason]`` (exported as a
  Prometheus counter by the component). Peer-caused log lines go through a token bucket
  per kind, so a flood produces a handful of lines, not one per datagram.
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
* **Dead contacts leave fast**: a routing contact that misses a reply is pinged at once;
  after ``dead_after`` consecutive misses (default 2, i.e. about half a second) it is
  removed from the routing table. Crawls skip peers that failed recently
  (``is_suspect``), and any late reply clears a peer's failures.
* **No re-store storm.** ``welcome_if_new`` adds the contact and hands over only the keys
  for which the newcomer is now among the k closest *and* this node was the closest
  holder, at most ``HANDOFF_KEYS`` keys per newcomer, once per newcomer per minute, under
  a global token bucket of announce RPCs.
* **Bounded answers**: large answers (> 1 KiB) to one source IP are limited to
  ``reply_rate`` bytes/s (2 MB/s default, loopback exempt), so the node is a poor
  reflector for spoofed-source floods.
* **Provider RPCs**: ``announce(nodeid, key, record)`` (verify, check the key is one of the
  record's, check this node is plausibly among the k closest, store) and
  ``find_providers(nodeid, key)`` → ``{"records": [...], "nodes": [...]}`` that always fits
  one datagram, and ``reachable(nodeid, port)`` for ``mode = "auto"``.
* **Client mode**: a node in client mode sends ``b""`` as its node id in every request.
  Receivers answer it normally but never put it into a routing table (there is no id to
  put, and its address is not reachable anyway). Plain kademlia ``store`` is refused: any
  peer could overwrite any key with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import msgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from rpcudp.protocol import RPCProtocol

from agent.dht.record import RecordError, WorkerRecord, decode_verified
from agent.dht.routing import RoutingTable  # exact, contiguous-buffer neighbour search
from agent.dht.storage import ANSWER_LIMIT, ProviderStorage
from agent.ratelimit import RateLimiter, TokenBucket

log = logging.getLogger(__name__)

MAX_PAYLOAD = 8192                  # rpcudp's limit on the msgpack part
HEADER = 21                         # kind byte + 20-byte message id
MAX_DATAGRAM = MAX_PAYLOAD + HEADER
MAX_NODES_IN_ANSWER = 64            # longest node list we accept from a peer
TOMBSTONE_WINDOW = 600.0            # tombstones younger than this ride along in answers
HANDOFF_KEYS = 16                   # keys handed to one newcomer
HANDOFF_RECORDS = 64                # records handed to one newcomer
SUSPECT_TTL = 60.0                  # crawls skip a peer this long after a failure


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


def _norm_host(host: Any) -> Any:
    if isinstance(host, str) and host.startswith("::ffff:"):
        return host[7:]
    return host


def _is_id(v: Any) -> bool:
    return type(v) is bytes and len(v) == 20


def _is_nodeid(v: Any) -> bool:
    # 20 bytes for a server-mode sender, b"" for a client-mode sender
    return type(v) is bytes and (len(v) == 20 or len(v) == 0)


def _is_page(v: Any) -> bool:
    return type(v) is int and 0 <= v < 2**32


def _is_port(v: Any) -> bool:
    return type(v) is int and 0 < v < 65536


def parse_nodes(data: Any, limit: int = MAX_NODES_IN_ANSWER) -> list[tuple[bytes, str, int]]:
    """Validated ``(id, ip, port)`` triples out of a peer's node list; junk is skipped."""
    out: list[tuple[bytes, str, int]] = []
    if not isinstance(data, list):
        return out
    for item in data[:limit]:
        if (isinstance(item, list) and len(item) == 3 and _is_id(item[0])
                and type(item[1]) is str and 0 < len(item[1]) <= 64 and _is_port(item[2])):
            out.append((item[0], item[1], item[2]))
    return out


class _Probe(asyncio.DatagramProtocol):
    def __init__(self, msg_id: bytes, fut: asyncio.Future[bytes]) -> None:
        self.msg_id = msg_id
        self.fut = fut

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data[:1] != b"\x01" or data[1:HEADER] != self.msg_id or self.fut.done():
            return
        try:
            self.fut.set_result(msgpack.unpackb(data[HEADER:], raw=False, max_bin_len=64,
                                                max_str_len=64, max_array_len=8, max_map_len=0))
        except Exception:
            return


async def probe_ping(address: tuple[str, int], my_id: bytes, local_host: str = "0.0.0.0",
                     wait: float = 1.0) -> bool:
    """One ping to ``address`` from a throw-away socket; True if a node id came back."""
    loop = asyncio.get_running_loop()
    msg_id = os.urandom(20)
    fut: asyncio.Future[Any] = loop.create_future()
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    bind = local_host if (":" in local_host) == (family == socket.AF_INET6) else (
        "::" if family == socket.AF_INET6 else "0.0.0.0")
    try:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Probe(msg_id, fut), local_addr=(bind, 0), family=family)
    except OSError:
        return False
    try:
        transport.sendto(b"\x00" + msg_id + msgpack.packb(["ping", [my_id]], use_bin_type=True),
                         address)
        res = await asyncio.wait_for(fut, wait)
    except (TimeoutError, OSError):
        return False
    finally:
        transport.close()
    return _is_id(res)


def all_contacts(router: Any) -> list[Node]:
    """Every contact of a routing table (routing.py's ``all_contacts`` or kademlia's buckets)."""
    fn = getattr(router, "all_contacts", None)
    if fn is not None:
        return list(fn())
    return [n for b in router.buckets for n in b.get_nodes()]


class RMAProtocol(KademliaProtocol):
    """Hardened kademlia protocol with provider-record RPCs (see module docstring)."""

    def __init__(self, source_node: Node, storage: ProviderStorage, ksize: int, *,
                 mode: str = "server", rto_min: float = 0.2, rto_max: float = 2.0,
                 rto_initial: float = 0.5, dead_after: int = 2, max_skew: float = 30.0,
                 handoff_rate: float = 200.0, reply_rate: float = 2_000_000.0,
                 max_inflight: int = 64, retransmits: int = 1) -> None:
        RPCProtocol.__init__(self, wait_timeout=rto_max)
        self.router = RoutingTable(self, ksize, source_node)
        self.storage = storage
        self.source_node = source_node
        self.ksize = ksize
        self.mode = mode
        self.rto_min, self.rto_max, self.rto_initial = rto_min, rto_max, rto_initial
        self.dead_after = dead_after
        self.max_skew = max_skew
        self.loop = asyncio.get_event_loop()
        # msg_id -> (future, timer, address, sent_at, rpc name)
        self._outstanding: dict[bytes, _Pending] = {}
        # at most max_inflight requests on the wire: a burst (a coordinator republishing
        # hundreds of records) queues here, before its timers start, instead of timing
        # out on replies that are merely queued behind it
        self._slots = asyncio.Semaphore(max_inflight)
        self.queued = 0
        self.timeout_extensions = 0
        self.retransmits = retransmits
        self.retransmissions = 0
        self._rtt: OrderedDict[tuple[str, int], RttEstimator] = OrderedDict()
        self._rtt_global = RttEstimator()
        self.fast_rtt: float | None = None
        self._fails: dict[bytes, tuple[int, float]] = {}
        self._fail_addr: dict[tuple[str, int], bytes] = {}
        self._welcomed: OrderedDict[bytes, float] = OrderedDict()
        self._handoff_bucket = TokenBucket(handoff_rate, handoff_rate)
        self._reach_bucket = TokenBucket(5.0, 10.0)
        self._verify_bucket = TokenBucket(200.0, 400.0)
        self._verifying: set[bytes] = set()
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
        self.removed_contacts = 0
        self.late_responses = 0
        self._late: OrderedDict[bytes, tuple[tuple[str, int], float]] = OrderedDict()
        self.handoffs = 0
        # name -> (handler, per-argument checks, minimum number of arguments)
        self._rpcs: dict[str, tuple[Callable[..., Any], tuple[Callable[[Any], bool], ...],
                                    int]] = {
            "ping": (self.rpc_ping, (_is_nodeid,), 1),
            "store": (self.rpc_store, (_is_nodeid, _is_id, lambda v: True), 3),
            "find_node": (self.rpc_find_node, (_is_nodeid, _is_id), 2),
            "find_value": (self.rpc_find_value, (_is_nodeid, _is_id), 2),
            "announce": (self.rpc_announce,
                         (_is_nodeid, _is_id, lambda v: type(v) is bytes), 3),
            "find_providers": (self.rpc_find_providers, (_is_nodeid, _is_id, _is_page), 2),
            "reachable": (self.rpc_reachable, (_is_nodeid, _is_port), 2),
        }

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

    def _solve_datagram(self, datagram: bytes, address: tuple[str, int]) -> None:  # type: ignore[override]
        n = len(datagram)
        if n > MAX_DATAGRAM:
            return self._drop("oversized", address)
        if n < HEADER + 1:
            return self._drop("short", address)
        kind = datagram[0]
        if kind > 1:
            return self._drop("unknown_kind", address)
        msg_id = bytes(datagram[1:HEADER])
        try:
            data = msgpack.unpackb(
                datagram[HEADER:], raw=False, use_list=True, strict_map_key=True,
                max_str_len=MAX_PAYLOAD, max_bin_len=MAX_PAYLOAD, max_array_len=1024,
                max_map_len=16, max_ext_len=0)
        except Exception:
            return self._drop("malformed", address)
        if kind == 0:
            self._accept_request(msg_id, data, address)
        else:
            self._accept_response(msg_id, data, address)
        return None

    def _accept_request(self, msg_id: bytes, data: Any, address: tuple[str, int]) -> None:  # type: ignore[override]
        if not (isinstance(data, list) and len(data) == 2 and type(data[0]) is str
                and isinstance(data[1], list)):
            return self._drop("bad_envelope", address)
        name, args = data
        entry = self._rpcs.get(name)
        if entry is None:
            return self._drop("unknown_rpc", address)
        handler, checks, min_args = entry
        if not (min_args <= len(args) <= len(checks)):
            return self._drop("bad_arity", address)
        if not _is_nodeid(args[0]):
            return self._drop("bad_nodeid", address)
        for check, arg in zip(checks, args, strict=False):
            if not check(arg):
                return self._drop("bad_args", address)
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
            self.queued += 1
        async with self._slots:
            return await self._send_and_wait(address, name, payload, timeout)

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

    # ================================================================ contacts
    def _sender(self, sender: tuple[str, int], nodeid: bytes) -> Node | None:
        if not nodeid or nodeid == self.source_node.id:
            return None
        return Node(nodeid, sender[0], sender[1])

    def _welcome_sender(self, sender: tuple[str, int], nodeid: bytes) -> None:
        """A request's claimed (id, address) is unverified: a spoofed datagram could fill
        the routing table with ids that live nowhere. Ping the address first and add the
        contact only if it answers with that id (bounded and rate-limited)."""
        if not nodeid or nodeid == self.source_node.id:
            return
        node = Node(nodeid, sender[0], sender[1])
        if not self.router.is_new_node(node) or nodeid in self._verifying:
            return
        if len(self._verifying) >= 256 or not self._verify_bucket.take():
            self.drops["contact_unverified"] += 1
            return
        self._verifying.add(nodeid)
        self._spawn(self._verify_contact(node))

    async def _verify_contact(self, node: Node) -> None:
        try:
            ok, res = await self._call((node.ip, node.port), "ping", self.my_id())
            if ok and res == node.id:
                self.welcome_if_new(node)
            elif ok:
                self.drops["contact_id_mismatch"] += 1
        finally:
            self._verifying.discard(node.id)

    def welcome_if_new(self, node: Node) -> None:
        """Add ``node`` to the routing table; hand over only the keys it now should hold.

        Fixes kademlia's storm: the replacement-cache re-welcome and the full re-store of
        every key on every new contact (see module docstring)."""
        if node.id == self.source_node.id or len(node.id) != 20:
            return
        if not self.router.is_new_node(node):
            return
        self.router.add_contact(node)
        if self.mode != "server" or not len(self.storage):
            return
        now = time.monotonic()
        last = self._welcomed.get(node.id)
        if last is not None and now - last < 60.0:
            return
        self._welcomed[node.id] = now
        if len(self._welcomed) > 4096:
            self._welcomed.popitem(last=False)
        self._handoff(node)

    def _handoff(self, node: Node) -> None:
        me = self.source_node
        budget = HANDOFF_RECORDS
        keys_sent = 0
        for key in self.storage.keys()[:256]:
            if keys_sent >= HANDOFF_KEYS or budget <= 0:
                break
            target = Node(key)
            neighbors = self.router.find_neighbors(target, k=self.ksize)
            if not any(n.id == node.id for n in neighbors):
                continue  # the newcomer is not among the k closest we know
            d_self = me.distance_to(target)
            if any(n.id != node.id and n.distance_to(target) < d_self for n in neighbors):
                continue  # a closer holder than us will hand it over
            recs = (self.storage.tombstones(key, since=time.time() - TOMBSTONE_WINDOW)
                    + self.storage.get_encoded(key, limit=budget))
            for enc in recs[:budget]:
                if not self._handoff_bucket.take():
                    return
                self._spawn(self.call_announce(node, key, enc))
                budget -= 1
                self.handoffs += 1
            keys_sent += 1

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def handle_call_response(self, result: tuple[bool, Any], node: Node) -> tuple[bool, Any]:
        """Count the outcome for ``node``; remove it after ``dead_after`` straight timeouts."""
        if not result[0]:
            fails = self._fails.get(node.id, (0, 0.0))[0] + 1
            self._fails[node.id] = (fails, time.monotonic())
            self._fail_addr[(node.ip, node.port)] = node.id
            if len(self._fails) > 8192:
                self._prune_fails()
            if fails >= self.dead_after:
                try:
                    self.router.remove_contact(node)
                    self.removed_contacts += 1
                except Exception:  # a contact not in the table
                    pass
            elif not self.router.is_new_node(node) and self._verify_bucket.take():
                # a routing contact missed a reply: ping it now rather than wait for the
                # next lookup to stumble on it (crawls skip suspects, so that may never
                # come) — a dead contact leaves after ``dead_after`` misses in a row
                self._spawn(self.call_ping(node))
            return result
        if self._fails:
            self._fails.pop(node.id, None)
        # The id came from another peer's node list: an answer from that address does not
        # prove it (a liar can pair a made-up id with an honest node's address), so a new
        # contact enters the table only after a ping answered with that very id.
        self._welcome_sender((node.ip, node.port), node.id)
        return result

    def _prune_fails(self) -> None:
        cutoff = time.monotonic() - SUSPECT_TTL
        self._fails = {k: v for k, v in self._fails.items() if v[1] >= cutoff}
        self._fail_addr = {a: i for a, i in self._fail_addr.items() if i in self._fails}

    def _alive(self, address: tuple[str, int]) -> None:
        """A (late) reply came from ``address``: whatever timed out there was our
        congestion, not a dead peer — forget its failures."""
        nid = self._fail_addr.pop(address, None)
        if nid is not None:
            self._fails.pop(nid, None)

    def is_suspect(self, node_id: bytes) -> bool:
        """Failed recently without answering since: crawls skip such peers."""
        f = self._fails.get(node_id)
        return f is not None and time.monotonic() - f[1] < SUSPECT_TTL

    def housekeeping(self) -> None:
        self._prune_fails()
        cutoff = time.monotonic() - 60.0
        while self._welcomed:
            k, t = next(iter(self._welcomed.items()))
            if t >= cutoff:
                break
            del self._welcomed[k]

    # ================================================================ RPC handlers
    def rpc_ping(self, sender: tuple[str, int], nodeid: bytes) -> bytes:  # type: ignore[override]
        self._welcome_sender(sender, nodeid)
        return self.source_node.id

    def rpc_store(self, sender: tuple[str, int], nodeid: bytes, key: bytes, value: Any) -> bool:  # type: ignore[override]
        # Plain kademlia values: any peer could overwrite any key. Refused, counted.
        self.drops["store_refused"] += 1
        return False

    def _neighbors(self, sender: tuple[str, int], nodeid: bytes, key: bytes) -> list[tuple]:
        exclude = Node(nodeid if nodeid else bytes(20), sender[0], sender[1])
        return [(n.id, n.ip, n.port)
                for n in self.router.find_neighbors(Node(key), k=self.ksize, exclude=exclude)]

    def rpc_find_node(self, sender: tuple[str, int], nodeid: bytes, key: bytes) -> list[tuple]:  # type: ignore[override]
        self._welcome_sender(sender, nodeid)
        return self._neighbors(sender, nodeid, key)

    def rpc_find_value(self, sender: tuple[str, int], nodeid: bytes, key: bytes) -> list[tuple]:  # type: ignore[override]
        # No plain values are held: answer like find_node (a valid kademlia reply).
        return self.rpc_find_node(sender, nodeid, key)

    def closer_count(self, key: bytes, limit: int) -> int:
        """How many known contacts are closer to ``key`` than this node (up to ``limit``)."""
        target = Node(key)
        d_self = self.source_node.distance_to(target)
        return sum(1 for n in self.router.find_neighbors(target, k=limit)
                   if n.distance_to(target) < d_self)

    def rpc_announce(self, sender: tuple[str, int], nodeid: bytes, key: bytes,
                     record: bytes) -> bool:
        self._welcome_sender(sender, nodeid)
        if self.mode != "server":
            self.drops["announce_client_mode"] += 1
            return False
        now = time.time()
        try:
            rec: WorkerRecord = decode_verified(record, now, self.max_skew)
        except RecordError as exc:
            self.drops["bad_record"] += 1
            self.peer_log(logging.INFO, "bad_record", "dht: refused record from %s: %s",
                          sender, exc)
            return False
        if not rec.serves(key):
            self.drops["record_wrong_key"] += 1
            return False
        # Views differ while the network settles, so allow twice k closer contacts.
        if self.closer_count(key, 2 * self.ksize) >= 2 * self.ksize:
            self.drops["announce_not_close"] += 1
            return False
        status = self.storage.put(key, rec, sender=(sender[0], sender[1]), now=now,
                                  verify=False)
        if status in ("stored", "same"):
            return True
        self.drops[f"store_{status}"] += 1
        return False

    def rpc_find_providers(self, sender: tuple[str, int], nodeid: bytes, key: bytes,
                           page: int | None = None) -> dict[str, Any]:
        """``{"records", "nodes", "total", "pages"}``: up to 20 records (the 10 best plus
        page ``page`` of the rest, see ``ProviderStorage``), then recent tombstones while
        space remains, the k closest nodes we know, how many live records we hold and in
        how many pages. Always fits one datagram: 20 maximum-size records and 20 contacts
        take < 8 KiB; tombstones only fill what is left."""
        self._welcome_sender(sender, nodeid)
        now = time.time()
        nodes = self._neighbors(sender, nodeid, key)
        total, pages = self.storage.pages(key, ANSWER_LIMIT, now)
        budget = MAX_PAYLOAD - len(msgpack.packb(nodes, use_bin_type=True)) - 64
        out = []
        for r in (self.storage.get_encoded(key, ANSWER_LIMIT, now, page)
                  + self.storage.tombstones(key, since=now - TOMBSTONE_WINDOW, now=now)):
            budget -= len(r) + 3
            if budget < 0:
                break
            out.append(r)
        return {"records": out, "nodes": nodes, "total": total, "pages": pages}

    async def rpc_reachable(self, sender: tuple[str, int], nodeid: bytes, port: int) -> bool:
        """Ping ``sender_ip:port`` back; True if it answered (``mode = "auto"``).

        The ping leaves from a fresh socket (another local port), not from the DHT
        socket the asker just sent to: a NAT or stateful firewall lets replies to the
        asker's own outgoing traffic through, which would make every NAT-ed node look
        reachable. Rate-limited: a spoofed source gets at most a few pings a second."""
        if not self._reach_bucket.take():
            self.drops["reachable_rate_limited"] += 1
            return False
        return await probe_ping((sender[0], port), self.my_id(), self._local_host())

    def _local_host(self) -> str:
        try:
            return str(self.transport.get_extra_info("sockname")[0])  # type: ignore[union-attr]
        except Exception:
            return "0.0.0.0"

    # ================================================================ calls
    async def call_ping(self, node_to_ask: Node) -> tuple[bool, Any]:
        result = await self._call((node_to_ask.ip, node_to_ask.port), "ping", self.my_id())
        return self.handle_call_response(result, node_to_ask)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        result = await self._call((node_to_ask.ip, node_to_ask.port), "find_node",
                                  self.my_id(), node_to_find.id)
        return self.handle_call_response(result, node_to_ask)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        return await self.call_find_node(node_to_ask, node_to_find)

    async def call_store(self, node_to_ask: Node, key: bytes, value: Any) -> tuple[bool, Any]:
        # Plain values are not part of this network (peers refuse them); never sent.
        return (False, None)

    async def call_announce(self, node_to_ask: Node, key: bytes,
                            record: bytes) -> tuple[bool, Any]:
        result = await self._call((node_to_ask.ip, node_to_ask.port), "announce",
                                  self.my_id(), key, record)
        return self.handle_call_response(result, node_to_ask)

    async def call_find_providers(self, node_to_ask: Node, key: bytes,
                                  page: int | None = None) -> tuple[bool, Any]:
        args = (self.my_id(), key) if page is None else (self.my_id(), key, page)
        result = await self._call((node_to_ask.ip, node_to_ask.port), "find_providers", *args)
        return self.handle_call_response(result, node_to_ask)

    # ================================================================ stats
    def stats(self) -> dict[str, Any]:
        srtt = self._rtt_global.srtt
        return {
            "drops": dict(self.drops),
            "rpc": {"sent": dict(self.tx), "received": dict(self.rx),
                    "timeouts": dict(self.timeouts), "failed": dict(self.failed)},
            "timeouts": sum(self.timeouts.values()),
            "rtt_ms": None if srtt is None else round(srtt * 1000, 3),
            "rto_ms": round(self.rto() * 1000, 3),
            "outstanding": len(self._outstanding),
            "removed_contacts": self.removed_contacts,
            "late_responses": self.late_responses,
            "timeout_extensions": self.timeout_extensions,
            "retransmissions": self.retransmissions,
            "queued_requests": self.queued,
            "handoffs": self.handoffs,
        }
