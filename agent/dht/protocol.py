"""The wire: kademlia's protocol made safe, fast and aware of signed provider records.

``RMAProtocol`` subclasses ``kademlia.protocol.KademliaProtocol`` and keeps rpcudp's
datagram format, so it still talks to plain kademlia peers for ping/find_node. It is cut
along its seams:

* ``wire`` — framing and validation: size limits, strict msgpack decoding, the RPC table
  check (arity, argument types). Nothing a peer sends raises; drops are counted.
* ``rpc`` — the RPC engine: pending calls, adaptive per-peer RTO, retransmission, the
  in-flight limit, the reply budget per source IP, C msgpack both ways.
* ``liveness`` — contact verification, dead-contact eviction, suspects, the bounded
  handoff to newcomers (no re-store storm).
* ``guard`` — defences against hostile peers: write tokens (BEP 5 model) required by
  ``announce``, the 3x anti-amplification budget for unproven addresses, per-peer and
  unproven-address limits on our own requests, a bounded wait queue;
* this module — the handlers and the ``call_*`` side of each RPC:

* **Provider RPCs**: ``announce(nodeid, key, record)`` (verify, check the key is one of the
  record's, check this node is plausibly among the k closest, store) and
  ``find_providers(nodeid, key)`` → ``{"records": [...], "nodes": [...]}`` that always fits
  one datagram, and ``reachable(nodeid, port)`` for ``mode = "auto"``.
* **Client mode**: a node in client mode sends ``b""`` as its node id in every request.
  Receivers answer it normally but never put it into a routing table (there is no id to
  put, and its address is not reachable anyway). Plain kademlia ``store`` is refused: any
  peer could overwrite any key with it.

Names other modules import from here (``MAX_PAYLOAD``, ``parse_nodes``, ``RttEstimator``,
...) are re-exported so callers need not know where the seams are.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

import msgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from rpcudp.protocol import RPCProtocol

from agent.dht.guard import HostileGuard
from agent.dht.keys import INDEX_KEYS
from agent.dht.liveness import (
    HANDOFF_KEYS,
    HANDOFF_RECORDS,
    SUSPECT_TTL,
    TOMBSTONE_WINDOW,
    ContactLiveness,
)
from agent.dht.record import RecordError, WorkerRecord, decode_verified
from agent.dht.routing import RoutingTable  # exact, contiguous-buffer neighbour search
from agent.dht.rpc import RpcEngine, RttEstimator
from agent.dht.storage import ANSWER_LIMIT, ProviderStorage
from agent.dht.wire import (
    HEADER,
    MAX_DATAGRAM,
    MAX_NODES_IN_ANSWER,
    MAX_PAYLOAD,
    _is_id,
    _is_id_prefix,
    _is_nodeid,
    _is_page,
    _is_port,
    all_contacts,
    parse_nodes,
    probe_ping,
)
from agent.ratelimit import TokenBucket

PROBE_BYTES = 64                    # a probe ping datagram, rounded up
SKETCH_BYTES = 200             # a 16-bucket sketch, msgpack-encoded, at most
INDEX_ANSWER_BYTES = 2048      # service names + counts in an index shard's answer
LIST_BUDGET = MAX_PAYLOAD - 128  # records in one list_providers answer


def _bounded_counts(counts: dict[str, int], limit: int) -> tuple[list[list[Any]], bool]:
    """``[[service, count], ...]`` (largest first) within ``limit`` encoded bytes, and
    whether every service fitted. A list, not a map: decoders cap maps at 16 entries."""
    out: list[list[Any]] = []
    size = 0
    for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        size += len(name.encode("utf-8")) + 8
        if size > limit:
            return out, False
        out.append([name, n])
    return out, True


__all__ = [
    "HANDOFF_KEYS", "HANDOFF_RECORDS", "HEADER", "MAX_DATAGRAM", "MAX_NODES_IN_ANSWER",
    "MAX_PAYLOAD", "SUSPECT_TTL", "TOMBSTONE_WINDOW", "RMAProtocol", "RttEstimator",
    "all_contacts", "parse_nodes", "probe_ping",
]


class RMAProtocol(HostileGuard, ContactLiveness, RpcEngine, KademliaProtocol):
    """Hardened kademlia protocol with provider-record RPCs (see module docstring)."""

    def __init__(self, source_node: Node, storage: ProviderStorage, ksize: int, *,
                 mode: str = "server", rto_min: float = 0.2, rto_max: float = 2.0,
                 rto_initial: float = 0.5, dead_after: int = 2, max_skew: float = 30.0,
                 handoff_rate: float = 20.0, reply_rate: float = 2_000_000.0,
                 max_inflight: int = 64, retransmits: int = 1) -> None:
        RPCProtocol.__init__(self, wait_timeout=rto_max)
        self.router = RoutingTable(self, ksize, source_node)
        self.storage = storage
        self.source_node = source_node
        self.ksize = ksize
        self.mode = mode
        self.max_skew = max_skew
        self._init_rpc(rto_min=rto_min, rto_max=rto_max, rto_initial=rto_initial,
                       max_inflight=max_inflight, retransmits=retransmits,
                       reply_rate=reply_rate)
        self._init_liveness(dead_after=dead_after, handoff_rate=handoff_rate)
        self._init_guard(max_inflight=max_inflight)
        self._reach_bucket = TokenBucket(5.0, 10.0)
        self._reach_by_host: OrderedDict[Any, TokenBucket] = OrderedDict()
        self._rpcs = {
            "ping": (self.rpc_ping, (_is_nodeid,), 1),
            "store": (self.rpc_store, (_is_nodeid, _is_id, lambda v: True), 3),
            "find_node": (self.rpc_find_node, (_is_nodeid, _is_id), 2),
            "find_value": (self.rpc_find_value, (_is_nodeid, _is_id), 2),
            "announce": (self.rpc_announce,
                         (_is_nodeid, _is_id, lambda v: type(v) is bytes), 3),
            "find_providers": (self.rpc_find_providers, (_is_nodeid, _is_id, _is_page), 2),
            "reachable": (self.rpc_reachable, (_is_nodeid, _is_port), 2),
            "list_providers": (self.rpc_list_providers,
                               (_is_nodeid, _is_id, _is_id_prefix, _is_id_prefix), 4),
        }

    # ================================================================ RPC handlers
    def rpc_ping(self, sender: tuple[str, int], nodeid: bytes) -> bytes:  # type: ignore[override]
        # a ping is someone checking us (e.g. verifying us as their new contact), not a
        # newcomer joining (joins look up): no handoff for it
        self._welcome_sender(sender, nodeid, handoff=False)
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
                     record: bytes) -> bool | dict[str, bytes]:
        self._welcome_sender(sender, nodeid)
        if self.mode != "server":
            self.drops["announce_client_mode"] += 1
            return False
        if not self.request_has_token():
            # a write needs the token of the sender's IP (guard): a spoofed source
            # never sees it; a real one repeats the announce with it
            self.drops["announce_no_token"] += 1
            return self.challenge(sender)
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
        answer: dict[str, Any] = {"nodes": nodes, "total": total, "pages": pages}
        if pages:
            # more records than one answer carries: the sketch lets the asker check
            # what it read elsewhere against this node's set (and marks a node that
            # answers ``list_providers``); 16 x [count, xor32] is ~150 bytes
            answer["sketch"] = self.storage.sketch(key, now)
            budget -= SKETCH_BYTES
        if key in INDEX_KEYS:
            counts, complete = _bounded_counts(self.storage.service_counts(key, now),
                                               INDEX_ANSWER_BYTES)
            answer["services"] = counts
            answer["services_complete"] = complete
            budget -= INDEX_ANSWER_BYTES
        out = []
        for r in (self.storage.get_encoded(key, ANSWER_LIMIT, now, page)
                  + self.storage.tombstones(key, since=now - TOMBSTONE_WINDOW, now=now)):
            budget -= len(r) + 3
            if budget < 0:
                break
            out.append(r)
        answer["records"] = out
        # the asker's write token rides along (guard): its announces need no challenge
        answer["token"] = self.write_tokens.issue(sender[0])
        return answer

    def rpc_list_providers(self, sender: tuple[str, int], nodeid: bytes, key: bytes,
                           start: bytes, end: bytes) -> dict[str, Any]:
        """``{"records", "next"}``: the records (tombstones included) of workers with
        ``start <= id < end`` in id order, as many as fit one datagram, and the id to
        continue from (``None`` when the range is done). See ``storage.range_encoded``."""
        self._welcome_sender(sender, nodeid)
        recs, nxt = self.storage.range_encoded(key, start, end, LIST_BUDGET)
        return {"records": recs, "next": nxt}

    async def rpc_reachable(self, sender: tuple[str, int], nodeid: bytes,
                            port: int) -> bool | None:
        """Ping ``sender_ip:port`` back; True if it answered (``mode = "auto"``).

        The ping leaves from a fresh socket (another local port), not from the DHT
        socket the asker just sent to: a NAT or stateful firewall lets replies to the
        asker's own outgoing traffic through, which would make every NAT-ed node look
        reachable. Rate-limited per source host (one probe per 2 s, burst 3) and in total
        (5/s, burst 10); when either limit is exhausted the answer is ``None``, "no
        capacity", which askers must not read as "unreachable": one source asking 50
        times a second neither uses up the probes of other askers nor turns them into
        clients."""
        host = self.router.diversity.host(sender[0], sender[1])
        bucket = self._reach_by_host.get(host)
        if bucket is None:
            bucket = self._reach_by_host[host] = TokenBucket(0.5, 3.0)
            if len(self._reach_by_host) > 4096:
                self._reach_by_host.popitem(last=False)
        if not bucket.take():
            self.drops["reachable_source_limited"] += 1
            return None
        if not self._reach_bucket.take():
            self.drops["reachable_rate_limited"] += 1
            return None
        if not self.budget_probe(sender, PROBE_BYTES):
            # the probe goes to the sender's IP: a spoofed asker must not make us
            # send more there than it sent us (guard's anti-amplification budget)
            self.drops["reachable_budget"] += 1
            return None
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

    async def call_list_providers(self, node_to_ask: Node, key: bytes, start: bytes,
                                  end: bytes) -> tuple[bool, Any]:
        result = await self._call((node_to_ask.ip, node_to_ask.port), "list_providers",
                                  self.my_id(), key, start, end)
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
            "diversity_refused": getattr(self.router, "diversity_refused", 0),
            "guard": self.guard_stats(),
            "graveyard": len(self._graveyard),
            "revived": self.revived,
        }
