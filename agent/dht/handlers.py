"""The answering side of every RPC: what this node does with a verified request.

* ``ping``, ``find_node`` (and ``find_value``, answered like ``find_node``: no plain values
  are held) — kademlia's, so plain kademlia peers still find nodes through us.
* **Provider RPCs**: ``announce(nodeid, key, record)`` (needs the sender's write token;
  verify, check the key is one of the record's, check this node is plausibly among the k
  closest, store) and ``find_providers(nodeid, key)`` → ``{"records": [...], "nodes":
  [...]}`` that always fits one datagram; ``list_providers`` pages through a key's
  records by worker id; ``reachable(nodeid, port)`` for ``mode = "auto"``.
* **Client mode**: a node in client mode sends ``b""`` as its node id in every request.
  Receivers answer it normally but never put it into a routing table (there is no id to
  put, and its address is not reachable anyway). Plain kademlia ``store`` is refused: any
  peer could overwrite any key with it.

Every request's claimed (id, address) is handed to contact liveness
(``liveness.ContactLiveness.welcome_sender``), which verifies it before it enters the
routing table. ``RpcHandlers`` is given the pieces it answers from in its constructor;
``table()`` is the validated RPC table the engine dispatches on (``wire.RpcTable``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import msgpack
from kademlia.node import Node

from agent.dht.flood_gate import RequestGate
from agent.dht.identity import NONCE_MAX, NONCE_MIN
from agent.dht.keys import INDEX_KEYS
from agent.dht.liveness import TOMBSTONE_WINDOW, ContactLiveness
from agent.dht.record import RecordError, WorkerRecord, decode_verified
from agent.dht.routing import RoutingTable
from agent.dht.storage import ANSWER_LIMIT, ProviderStorage
from agent.dht.wire import (
    MAX_PAYLOAD,
    RpcTable,
    _is_id,
    _is_id_prefix,
    _is_nodeid,
    _is_page,
    _is_port,
    probe_ping,
)
from agent.ratelimit import RateLimiter, TokenBucket

log = logging.getLogger("agent.dht.protocol")  # one logger name for the whole wire

PROBE_BYTES = 64               # a probe ping datagram, rounded up
SKETCH_BYTES = 200             # a 16-bucket sketch, msgpack-encoded, at most
INDEX_ANSWER_BYTES = 2048      # service names + counts in an index shard's answer
LIST_BUDGET = MAX_PAYLOAD - 128  # records in one list_providers answer
Address = tuple[str, int]


def _is_nonce(v: Any) -> bool:
    return type(v) is bytes and NONCE_MIN <= len(v) <= NONCE_MAX


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


class RpcHandlers:
    """The handlers (see module docstring). ``has_token``: the request being handled
    carried a valid write token (the engine knows while it dispatches); ``serving``:
    server mode; ``my_id``: the id we send; ``local_host``: our bound address (the
    ``reachable`` probe leaves from a fresh socket there)."""

    def __init__(self, *, router: RoutingTable, storage: ProviderStorage, source_node: Node,
                 ksize: int, max_skew: float, liveness: ContactLiveness, gate: RequestGate,
                 drops: Counter[str], has_token: Callable[[], bool],
                 serving: Callable[[], bool], my_id: Callable[[], bytes],
                 local_host: Callable[[], str],
                 prove_id: Callable[[bytes], dict[str, bytes]] | None = None) -> None:
        self.router = router
        self.storage = storage
        self.source_node = source_node
        self.ksize = ksize
        self.max_skew = max_skew
        self.liveness = liveness
        self.gate = gate
        self.drops = drops
        self._has_token = has_token
        self._serving = serving
        self._my_id = my_id
        self._local_host = local_host
        self._prove_id = prove_id
        self.peer_log = RateLimiter(rate=0.1, burst=5, logger=log)
        self._reach_bucket = TokenBucket(5.0, 10.0)
        self._reach_by_host: OrderedDict[Any, TokenBucket] = OrderedDict()

    def table(self) -> RpcTable:
        table: RpcTable = {
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
        if self._prove_id is not None:
            table["identify"] = (self.rpc_identify, (_is_nodeid, _is_nonce), 2)
        return table

    def rpc_ping(self, sender: Address, nodeid: bytes) -> bytes:
        # a ping is someone checking us (e.g. verifying us as their new contact) or a
        # newcomer joining through us as its seed: no handoff for the ping itself; an
        # unknown id's handoff waits for its join lookup (``rpc_find_node`` of its id)
        self.liveness.welcome_sender(sender, nodeid, handoff=False, first_contact=True)
        return self.source_node.id

    def rpc_identify(self, sender: Address, nodeid: bytes, nonce: bytes) -> dict[str, bytes]:
        """``{"key", "sig"}``: our public key and a signature over ``nonce`` and our node
        id (``identity.node_id_proof``): how a peer checks our id is the hash of a key we
        hold before it puts us in its routing table. Old agents do not know this RPC
        (they drop it unanswered; the asker then falls back to ``ping``).

        The asker's write token rides along, as in ``find_providers`` answers: every
        contact is verified so before it enters a table, so the asker's first announce
        to us needs no challenge round trip (a first announce took lookup + 2 RTT on a
        WAN). Older askers ignore the extra key (``proven_node_id`` reads key and sig)."""
        self.liveness.welcome_sender(sender, nodeid, handoff=False, first_contact=True)
        assert self._prove_id is not None      # registered only with a prover
        answer = dict(self._prove_id(nonce))
        answer["token"] = self.gate.token_for(sender)
        return answer

    def rpc_store(self, sender: Address, nodeid: bytes, key: bytes, value: Any) -> bool:
        # Plain kademlia values: any peer could overwrite any key. Refused, counted.
        self.drops["store_refused"] += 1
        return False

    def _neighbors(self, sender: Address, nodeid: bytes, key: bytes) -> list[tuple]:
        exclude = Node(nodeid if nodeid else bytes(20), sender[0], sender[1])
        # never a contact with an unanswered failure: the asker would wait on it
        return [(n.id, n.ip, n.port)
                for n in self.liveness.live_neighbors(Node(key), self.ksize, exclude)]

    def rpc_find_node(self, sender: Address, nodeid: bytes, key: bytes) -> list[tuple]:
        # a lookup of the sender's own id is a join (or a re-merge): see liveness
        self.liveness.welcome_sender(sender, nodeid, joining=key == nodeid)
        return self._neighbors(sender, nodeid, key)

    def rpc_find_value(self, sender: Address, nodeid: bytes, key: bytes) -> list[tuple]:
        # No plain values are held: answer like find_node (a valid kademlia reply).
        return self.rpc_find_node(sender, nodeid, key)

    def closer_count(self, key: bytes, limit: int) -> int:
        """How many known contacts are closer to ``key`` than this node (up to ``limit``)."""
        target = Node(key)
        d_self = self.source_node.distance_to(target)
        return sum(1 for n in self.router.find_neighbors(target, k=limit)
                   if n.distance_to(target) < d_self)

    def rpc_announce(self, sender: Address, nodeid: bytes, key: bytes,
                     record: bytes) -> bool | dict[str, bytes]:
        self.liveness.welcome_sender(sender, nodeid)
        if not self._serving():
            self.drops["announce_client_mode"] += 1
            return False
        if not self._has_token():
            # a write needs the token of the sender's IP (flood gate): a spoofed source
            # never sees it; a real one repeats the announce with it
            self.drops["announce_no_token"] += 1
            return self.gate.challenge(sender)
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

    def rpc_find_providers(self, sender: Address, nodeid: bytes, key: bytes,
                           page: int | None = None) -> dict[str, Any]:
        """``{"records", "nodes", "total", "pages"}``: up to 20 records (the 10 best plus
        page ``page`` of the rest, see ``ProviderStorage``), then recent tombstones while
        space remains, the k closest nodes we know, how many live records we hold and in
        how many pages. Always fits one datagram: 20 maximum-size records and 20 contacts
        take < 8 KiB; tombstones only fill what is left."""
        self.liveness.welcome_sender(sender, nodeid)
        now = time.time()
        nodes = self._neighbors(sender, nodeid, key)
        total, pages = self.storage.pages(key, ANSWER_LIMIT, now)
        budget = MAX_PAYLOAD - len(msgpack.packb(nodes, use_bin_type=True)) - 64
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
        # the asker's write token rides along (flood gate): its announces need no challenge
        answer["token"] = self.gate.token_for(sender)
        return answer

    def rpc_list_providers(self, sender: Address, nodeid: bytes, key: bytes,
                           start: bytes, end: bytes) -> dict[str, Any]:
        """``{"records", "next"}``: the records (tombstones included) of workers with
        ``start <= id < end`` in id order, as many as fit one datagram, and the id to
        continue from (``None`` when the range is done). See ``storage.range_encoded``."""
        self.liveness.welcome_sender(sender, nodeid)
        recs, nxt = self.storage.range_encoded(key, start, end, LIST_BUDGET)
        return {"records": recs, "next": nxt}

    async def rpc_reachable(self, sender: Address, nodeid: bytes,
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
        if not self.gate.budget_probe(sender, PROBE_BYTES):
            # the probe goes to the sender's IP: a spoofed asker must not make us
            # send more there than it sent us (the flood gate's byte budget)
            self.drops["reachable_budget"] += 1
            return None
        return await probe_ping((sender[0], port), self._my_id(), self._local_host())
